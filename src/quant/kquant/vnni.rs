//! AVX-512 kernels of the K-quants: `vpmaddubsw` multiplies 64 unsigned weight quants with
//! 64 signed activation bytes a time into i16 pairs, and `vpmaddwd` scales pairs of pairs by
//! their sub-block's scale into i32 lanes (two one-uop steps, where `vpdpbusd` and a 32-bit
//! multiply by the scale took three and a long latency). The integer sums are exactly those
//! of the scalar and AVX2 kernels in [`super`], and the float steps per super-block are the
//! same, so all three agree bit for bit. (The machines with these kernels have VNNI, which
//! the 32-value formats' kernels use.)
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

use super::blocks::{finish, Q45Block};
use super::QK_K;
use crate::quant::act::TokenPtrs;
use crate::quant::TILE_T;

/// The 16 sums of 16 quants of one token's super-block (exact integers kept as f32).
#[inline]
#[target_feature(enable = "avx512f")]
fn sums(bs: &[f32]) -> __m512i {
    assert!(bs.len() >= 16);
    // SAFETY: 16 f32 are readable (asserted).
    unsafe { _mm512_cvtps_epi32(_mm512_loadu_ps(bs.as_ptr())) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn hsum(v: __m512i) -> i32 {
    _mm512_reduce_add_epi32(v)
}

/// # Safety
/// `row` holds `nsb` Q4_K (or, with `Q5`, Q5_K) super-blocks and every token of `toks`
/// `nsb · 256` values (with `nsb · 16` sums and `nsb` scales); the CPU has AVX-512 F/BW/VL
/// and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
pub(super) unsafe fn q45k<const T: usize, const Q5: bool>(
    row: &[u8],
    nsb: usize,
    toks: &TokenPtrs<T>,
    out: &mut [f32; TILE_T],
) {
    for sb in 0..nsb {
        // SAFETY: super-block `sb` is inside `row`.
        let b = unsafe { Q45Block::<Q5>::read(row.as_ptr().add(sb * Q45Block::<Q5>::BYTES)) };
        // Min j weighs the sums of 16-value groups 2j and 2j + 1.
        let mins = _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
            _mm512_castsi256_si512(_mm256_cvtepu8_epi32(_mm_loadl_epi64(b.mn.as_ptr().cast()))),
        );
        let mut acc = [_mm512_setzero_si512(); T];
        for j in 0..4 {
            // SAFETY: j < 4.
            let (lo, hi) = unsafe { b.chunk(j) };
            // Values 64j .. 64j + 64: sub-block 2j in the low half, 2j + 1 in the high.
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            // The scale of each i16 pair lane (sub-block 2j, then 2j + 1).
            let s = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16(b.sc[2 * j] as i16)),
                _mm256_set1_epi16(b.sc[2 * j + 1] as i16),
            );
            for t in 0..T {
                // SAFETY: values sb·256 + 64j .. +64 of token t's row.
                let a = unsafe { _mm512_loadu_si512(toks.qs[t].add(sb * QK_K + 64 * j).cast()) };
                // Pairs first (|q·a + q·a| ≤ 2·31·127), then scaled pairs of pairs: two
                // one-uop steps where `vpdpbusd` and a 32-bit multiply took three.
                let p = _mm512_madd_epi16(_mm512_maddubs_epi16(w, a), s);
                acc[t] = _mm512_add_epi32(acc[t], p);
            }
        }
        let (dw, dmin) = b.scales();
        for t in 0..T {
            // SAFETY: `t < T`, and the caller guarantees `nsb` super-blocks per token.
            let (bs, da) = unsafe { toks.block(t, sb) };
            let msum = hsum(_mm512_mullo_epi32(sums(bs), mins));
            out[t] = finish(out[t], dw, dmin, da, hsum(acc[t]), msum);
        }
    }
}

/// # Safety
/// As [`q45k`], for Q6_K super-blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
pub(super) unsafe fn q6k<const T: usize>(
    row: &[u8],
    nsb: usize,
    toks: &TokenPtrs<T>,
    out: &mut [f32; TILE_T],
) {
    let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    // Lane i of a 64-value vector belongs to 16-value group i / 4.
    let group = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for sb in 0..nsb {
        let blk = row.as_ptr().wrapping_add(sb * 210);
        // SAFETY: the 16 scales sit at 192 .. 208 of the super-block; widened to 16 i32.
        let all = unsafe { _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(192).cast())) };
        let mut acc = [_mm512_setzero_si512(); T];
        for n in 0..2 {
            // SAFETY: ql (128 bytes) at 0 and qh (64) at 128; for n < 2 these three loads
            // read 32 bytes each inside them.
            let (ql0, ql1, h) = unsafe {
                (
                    _mm256_loadu_si256(blk.add(64 * n).cast()),
                    _mm256_loadu_si256(blk.add(64 * n + 32).cast()),
                    _mm256_loadu_si256(blk.add(128 + 32 * n).cast()),
                )
            };
            let hb = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2));
            let q1 = _mm256_or_si256(_mm256_and_si256(ql0, m4), hb(h));
            let q2 = _mm256_or_si256(_mm256_and_si256(ql1, m4), hb(_mm256_srli_epi16::<2>(h)));
            let q3 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                hb(_mm256_srli_epi16::<4>(h)),
            );
            let q4 = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                hb(_mm256_srli_epi16::<6>(h)),
            );
            // Values 128n .. +64 are q1, q2 (scales 8n .. 8n+4); +64 .. +128 are q3, q4.
            let w = [
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q1), q2),
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q3), q4),
            ];
            let s = [
                _mm512_permutexvar_epi32(
                    _mm512_add_epi32(group, _mm512_set1_epi32(8 * n as i32)),
                    all,
                ),
                _mm512_permutexvar_epi32(
                    _mm512_add_epi32(group, _mm512_set1_epi32(8 * n as i32 + 4)),
                    all,
                ),
            ];
            // The same scales in both i16 halves of each lane, for `madd` of i16 pairs.
            let lo16 = _mm512_set1_epi32(0xFFFF);
            let s =
                s.map(|v| _mm512_or_si512(_mm512_and_si512(v, lo16), _mm512_slli_epi32::<16>(v)));
            for t in 0..T {
                for half in 0..2 {
                    // SAFETY: values sb·256 + 128n + 64·half .. +64 of token t's row.
                    let a = unsafe {
                        _mm512_loadu_si512(toks.qs[t].add(sb * QK_K + 128 * n + 64 * half).cast())
                    };
                    // |q·a + q·a| ≤ 2·63·127 fits an i16 pair.
                    let p = _mm512_madd_epi16(_mm512_maddubs_epi16(w[half], a), s[half]);
                    acc[t] = _mm512_add_epi32(acc[t], p);
                }
            }
        }
        // SAFETY: d closes the super-block at 208.
        let dw = unsafe { f16::from_bits(blk.add(208).cast::<u16>().read_unaligned()).to_f32() };
        for t in 0..T {
            // SAFETY: `t < T`, and the caller guarantees `nsb` super-blocks per token.
            let (bs, da) = unsafe { toks.block(t, sb) };
            let msum = 32 * hsum(_mm512_mullo_epi32(sums(bs), all));
            out[t] = finish(out[t], dw, dw, da, hsum(acc[t]), msum);
        }
    }
}
