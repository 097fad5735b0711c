//! AVX2 kernels of the K-quants: `maddubs` of unsigned weight quants with signed activation
//! bytes, `madd` by the sub-block scales; each super-block's eight i32 lanes are those of the
//! scalar kernel in [`super`], and they join the f32 lanes by the same `fma`s, so the two
//! agree bit for bit ([`super::blocks::Lanes`]). The AVX-512 kernels share the per-lane
//! float steps below.
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use half::f16;

use super::blocks::Q45Block;
use super::QK_K;
use crate::quant::act::TokenPtrs;
use crate::quant::TILE_T;

/// The lanes' sum in [`super::blocks::reduce8`]'s order: halves, then pairs.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn reduce8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// Q4_K/Q5_K's min lanes: `mins` (the eight mins, permuted 0, 1, 4, 5, 2, 3, 6, 7) times the
/// pairs of 16-value sums `bs` in the order `hadd` leaves.
///
/// # Safety
/// `bs` holds 16 f32; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q45_msum(bs: &[f32], mins: __m256i) -> __m256i {
    // SAFETY: 16 f32 in `bs` (the caller's guarantee).
    let pairs = unsafe { _mm256_hadd_epi32(sums8(bs.as_ptr()), sums8(bs.as_ptr().add(8))) };
    _mm256_mullo_epi32(pairs, mins)
}

/// A Q4_K/Q5_K super-block's mins as [`q45_msum`] takes them.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q45_mins(mn: &[u8; 8]) -> __m256i {
    // SAFETY: 8 bytes.
    let m = unsafe { _mm_loadl_epi64(mn.as_ptr().cast()) };
    _mm256_permutevar8x32_epi32(
        _mm256_cvtepu8_epi32(m),
        _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7),
    )
}

/// `acc + (dw·da)·isum − (dmin·da)·msum`, lane by lane, as [`super::blocks::step45`].
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn step45(
    acc: __m256,
    dw: f32,
    dmin: f32,
    da: f32,
    isum: __m256i,
    msum: __m256i,
) -> __m256 {
    let acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(isum), acc);
    _mm256_fmadd_ps(_mm256_set1_ps(-(dmin * da)), _mm256_cvtepi32_ps(msum), acc)
}

/// Q6_K's offset lanes `sc[l]·s[l] + sc[8+l]·s[8+l]` of one token (`sc`: the 16 scales as
/// two halves of i32).
///
/// # Safety
/// `bs` holds 16 f32; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q6_msum(bs: &[f32], sc: (__m256i, __m256i)) -> __m256i {
    // SAFETY: 16 f32 in `bs` (the caller's guarantee).
    let (s_lo, s_hi) = unsafe { (sums8(bs.as_ptr()), sums8(bs.as_ptr().add(8))) };
    _mm256_add_epi32(
        _mm256_mullo_epi32(s_lo, sc.0),
        _mm256_mullo_epi32(s_hi, sc.1),
    )
}

/// `acc + (dw·da)·(isum − 32·msum)`, lane by lane, as [`super::blocks::step6`].
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn step6(acc: __m256, dw: f32, da: f32, isum: __m256i, msum: __m256i) -> __m256 {
    let v = _mm256_sub_epi32(isum, _mm256_slli_epi32::<5>(msum));
    _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(v), acc)
}

/// The 16 scales of the Q6_K super-block at `blk`, as two halves of i32.
///
/// # Safety
/// `blk` points at a whole super-block; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q6_scales(blk: *const u8) -> (__m256i, __m256i) {
    // SAFETY: the 16 scales sit at 192 .. 208 of the super-block.
    unsafe {
        (
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(192).cast())),
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(200).cast())),
        )
    }
}

/// Eight i32 from the 8 f32 at `p` (16-value sums: exact integers).
///
/// # Safety
/// 8 f32 are readable at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sums8(p: *const f32) -> __m256i {
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
    let mut lanes = [_mm256_setzero_ps(); T];
    for sb in 0..nsb {
        // SAFETY: super-block `sb` is inside `row`.
        let b = unsafe { Q45Block::<Q5>::read(row.as_ptr().add(sb * Q45Block::<Q5>::BYTES)) };
        let mins = q45_mins(&b.mn);
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
            // SAFETY: `bs` holds 16 f32.
            let msum = unsafe { q45_msum(bs, mins) };
            lanes[t] = step45(lanes[t], dw, dmin, da, acc[t], msum);
        }
    }
    for t in 0..T {
        out[t] = reduce8(lanes[t]);
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
    let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    let mut lanes = [_mm256_setzero_ps(); T];
    for sb in 0..nsb {
        let blk = row.as_ptr().wrapping_add(sb * 210);
        // SAFETY: the 16 scales sit at 192 .. 208 of the super-block.
        let scales = unsafe { std::slice::from_raw_parts(blk.add(192).cast::<i8>(), 16) };
        // The same 16 scales as i32, for the offset term.
        // SAFETY: super-block `sb` is inside `row`.
        let sc = unsafe { q6_scales(blk) };
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
            let msum = unsafe { q6_msum(bs, sc) };
            lanes[t] = step6(lanes[t], dw, da, acc[t], msum);
        }
    }
    for t in 0..T {
        out[t] = reduce8(lanes[t]);
    }
}
