//! AVX2 kernels of the K-quants: `maddubs` of unsigned weight quants with signed activation
//! bytes, `madd` by the sub-block scales; the integer sums are those of the scalar kernel in
//! [`super`], and the float steps per super-block the same, so they agree bit for bit.
#![cfg(target_arch = "x86_64")]
use half::f16;

use super::blocks::{finish, Q45Block};
use super::QK_K;
use crate::quant::act::TokenPtrs;
use crate::quant::TILE_T;

/// Horizontal sum of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32(v: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Eight i32 from the 8 f32 at `p` (16-value sums: exact integers).
///
/// # Safety
/// 8 f32 are readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sums8(p: *const f32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the 8 f32.
    unsafe { _mm256_cvtps_epi32(_mm256_loadu_ps(p)) }
}

/// # Safety
/// `row` holds `nsb` Q4_K (or, with `Q5`, Q5_K) super-blocks and every token of `toks`
/// `nsb · 256` values (with `nsb · 16` sums and `nsb` scales); the CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
pub(super) unsafe fn q45k_avx2<const T: usize, const Q5: bool>(
    row: &[u8],
    nsb: usize,
    toks: &TokenPtrs<T>,
    out: &mut [f32; TILE_T],
) {
    use std::arch::x86_64::*;
    for sb in 0..nsb {
        // SAFETY: super-block `sb` is inside `row`.
        let b = unsafe { Q45Block::<Q5>::read(row.as_ptr().add(sb * Q45Block::<Q5>::BYTES)) };
        // Min j weighs 16-sums 2j and 2j + 1; `hadd` below pairs them in the order
        // 0, 1, 4, 5, 2, 3, 6, 7.
        let mins = _mm256_permutevar8x32_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.mn.as_ptr().cast())),
            _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7),
        );
        let mut acc = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            // SAFETY: j < 4.
            let (lo, hi) = unsafe { b.chunk(j) };
            let s_lo = _mm256_set1_epi16(b.sc[2 * j] as i16);
            let s_hi = _mm256_set1_epi16(b.sc[2 * j + 1] as i16);
            for t in 0..T {
                // SAFETY: values sb·256 + 64j .. +64 of token t's row.
                let (a0, a1) = unsafe {
                    let a = toks.qs[t].add(sb * QK_K + 64 * j);
                    (
                        _mm256_loadu_si256(a.cast()),
                        _mm256_loadu_si256(a.add(32).cast()),
                    )
                };
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), s_lo);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), s_hi);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(p0, p1));
            }
        }
        let (dw, dmin) = b.scales();
        for t in 0..T {
            // SAFETY: `t < T`, and the caller guarantees `nsb` super-blocks per token.
            let (bs, da) = unsafe { toks.block(t, sb) };
            // Integer arithmetic on exact sums: the scalar kernel's msum, in any order.
            // SAFETY: `bs` holds 16 f32.
            let pairs = unsafe { _mm256_hadd_epi32(sums8(bs.as_ptr()), sums8(bs.as_ptr().add(8))) };
            let msum = hsum_i32(_mm256_mullo_epi32(pairs, mins));
            out[t] = finish(out[t], dw, dmin, da, hsum_i32(acc[t]), msum);
        }
    }
}

/// # Safety
/// As [`q45k_avx2`], for Q6_K super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
pub(super) unsafe fn q6k_avx2<const T: usize>(
    row: &[u8],
    nsb: usize,
    toks: &TokenPtrs<T>,
    out: &mut [f32; TILE_T],
) {
    use std::arch::x86_64::*;
    let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    for sb in 0..nsb {
        let blk = row.as_ptr().wrapping_add(sb * 210);
        // SAFETY: the 16 scales sit at 192 .. 208 of the super-block.
        let scales = unsafe { std::slice::from_raw_parts(blk.add(192).cast::<i8>(), 16) };
        // The 16 scales as i32, for the offset term 32 · Σ sc·s.
        // SAFETY: the same 16 bytes, 8 at a time.
        let (sc_lo, sc_hi) = unsafe {
            (
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(192).cast())),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(200).cast())),
            )
        };
        let mut acc = [_mm256_setzero_si256(); T];
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
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), hb(h)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), hb(_mm256_srli_epi16::<2>(h))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    hb(_mm256_srli_epi16::<4>(h)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    hb(_mm256_srli_epi16::<6>(h)),
                ),
            ];
            // Values 0..16 of group g take scale 8n + 2g, values 16..32 scale 8n + 2g + 1.
            let s: [__m256i; 4] = std::array::from_fn(|g| {
                let j = 8 * n + 2 * g;
                _mm256_set_m128i(
                    _mm_set1_epi16(scales[j + 1] as i16),
                    _mm_set1_epi16(scales[j] as i16),
                )
            });
            for t in 0..T {
                for g in 0..4 {
                    // SAFETY: values sb·256 + 128n + 32g .. +32 of token t's row.
                    let av = unsafe {
                        _mm256_loadu_si256(toks.qs[t].add(sb * QK_K + 128 * n + 32 * g).cast())
                    };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], av), s[g]);
                    acc[t] = _mm256_add_epi32(acc[t], p);
                }
            }
        }
        // SAFETY: d closes the super-block at 208.
        let dw = unsafe { f16::from_bits(blk.add(208).cast::<u16>().read_unaligned()).to_f32() };
        for t in 0..T {
            // SAFETY: `t < T`, and the caller guarantees `nsb` super-blocks per token.
            let (bs, da) = unsafe { toks.block(t, sb) };
            // SAFETY: `bs` holds 16 f32.
            let (s_lo, s_hi) = unsafe { (sums8(bs.as_ptr()), sums8(bs.as_ptr().add(8))) };
            let m = _mm256_add_epi32(
                _mm256_mullo_epi32(s_lo, sc_lo),
                _mm256_mullo_epi32(s_hi, sc_hi),
            );
            let msum = 32 * hsum_i32(m);
            out[t] = finish(out[t], dw, dw, da, hsum_i32(acc[t]), msum);
        }
    }
}
