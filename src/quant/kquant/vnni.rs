//! The AVX-512 kernel of Q5_K (Q4_K and Q6_K run in [`super::tiled`]'s tiles there):
//! `vpmaddubsw` multiplies 64 unsigned weight quants with 64 signed activation bytes a time
//! into i16 pairs, and `vpmaddwd` scales pairs of pairs by their sub-block's scale into i32
//! lanes (two one-uop steps, where `vpdpbusd` and a 32-bit
//! multiply by the scale took three and a long latency). The 16 i32 lanes of a super-block
//! fold to the eight of the scalar and AVX2 kernels in [`super`] (lane `l` plus lane `8 + l`),
//! and join the f32 lanes by the AVX2 kernels' steps, so all three agree bit for bit
//! ([`super::blocks::Lanes`]). (The machines with these kernels have VNNI, which the
//! 32-value formats' kernels use.)
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::avx2::{q45_mins, q45_msum, reduce8, step45};
use super::blocks::Q45Block;
use super::QK_K;
use crate::quant::act::TokenPtrs;
use crate::quant::TILE_T;

/// Lane `l` plus lane `8 + l`: the eight lanes the other kernels keep.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
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
    let mut lanes = [_mm256_setzero_ps(); T];
    for sb in 0..nsb {
        // SAFETY: super-block `sb` is inside `row`.
        let b = unsafe { Q45Block::<Q5>::read(row.as_ptr().add(sb * Q45Block::<Q5>::BYTES)) };
        let mins = q45_mins(&b.mn);
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
            // SAFETY: `bs` holds 16 f32.
            let msum = unsafe { q45_msum(bs, mins) };
            lanes[t] = step45(lanes[t], dw, dmin, da, fold(acc[t]), msum);
        }
    }
    for t in 0..T {
        out[t] = reduce8(lanes[t]);
    }
}
