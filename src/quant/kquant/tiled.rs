//! Q4_K for AVX-512 VNNI in tiles of 16 interleaved rows, so that `vpdpbusd` multiplies four
//! values of 16 rows at a time with one broadcast of four activation bytes, as the 32-value
//! formats' kernels do ([`crate::quant::pack`]); the row layout of [`super`] spent more on
//! per-(row, super-block, token) bookkeeping than on the products (half candle's speed on a
//! 64-token prompt).
//!
//! A Q4_K value is `d·sc_s·q − dmin·m_s` in 32-value sub-block `s`: a Q4_1 block whose scale
//! and min are products. A tile holds one super-block of 16 rows (`TILE` bytes):
//! - `qs`, 2048 bytes: sub-block `s`, chunk `c` (`0..4`) at `(4s + c)·64`, row `r`'s 4 bytes at
//!   `+4r`: byte `i` has value `32s + 4c + i` in its low nibble, `32s + 16 + 4c + i` in its
//!   high one;
//! - `sc`, 128 bytes at `SC`: `[s][r]`, the 6-bit scales;
//! - `mn`, 256 bytes at `MN`: pair `p` (`0..4`) at `MN + 64p`, row `r`'s word at `+4r` holds
//!   `m_{2p}, m_{2p+1}` as i16, for `vpdpwssd` against the activations' 32-value sums;
//! - `d`, `dmin`: 16 f16 each at `D` and `D + 32`.
//!
//! Q6_K (`d·sc_g·(q − 32)` in 16-value group `g`) keeps its 6-bit quants as bytes (4096 of a
//! `TILE6`-byte tile, 30% more than GGUF's 210 per row, for no unpacking at all): group `g`,
//! chunk `c` at `(4g + c)·64`, row `r`'s bytes at `+4r` are values `16g + 4c .. +4`; then
//! the scales `[g][r]` (i8, 256 bytes at `SC6`) and `d` (16 f16 at `D6`). Per super-block
//! `u = Σ_g (d·sc_g)·isum_g − 32·Σ_g (d·sc_g)·b_g`, the second sum kept apart.
//!
//! Rows past `n` are zero. Per (row, token, super-block) the kernel computes
//! `u = Σ_s (d·sc_s)·isum_s − dmin·Σ_s m_s·b_s` (`isum_s` the sub-block's exact integer
//! product, `b_s` its activation sum), each step one `fma` in `s` order, then adds `u·da` to
//! the row's accumulator. The rows and tokens do not interact, so a row's bits are the same
//! in any batch; they differ from the row-layout kernels' only by summation order.
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::blocks::q4k_scales;
use super::QK_K;
use crate::quant::act::{Acts, TokenPtrs};
use crate::quant::avx512::{bcast4, dot32, nibbles, store_tile};
use crate::quant::{Format, Tile, WIDE_T};

/// Rows of a tile.
pub(crate) const R: usize = 16;
/// Bytes of one tile (one super-block of `R` rows).
pub(crate) const TILE: usize = SC + 128 + 256 + 64;
const SC: usize = 2048;
const MN: usize = SC + 128;
const D: usize = MN + 256;
/// Bytes of one Q6_K tile.
pub(crate) const TILE6: usize = D6 + 32;
const SC6: usize = 4096;
const D6: usize = SC6 + 256;

/// Bytes of one tile of `format` (Q4_K or Q6_K).
pub(crate) fn tile_bytes(format: Format) -> usize {
    match format {
        Format::Q6K => TILE6,
        _ => TILE,
    }
}

/// Repacks a Q4_K or Q6_K matrix (see [`pack`]).
pub(crate) fn pack_format(format: Format, raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    match format {
        Format::Q6K => pack6(raw, n, k),
        _ => pack(raw, n, k),
    }
}

/// [`row_into`] for either format.
pub(crate) fn row_into_format(format: Format, gdata: &[u8], r: usize, out: &mut [f32]) {
    match format {
        Format::Q6K => row_into6(gdata, r, out),
        _ => row_into(gdata, r, out),
    }
}

fn pack6(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nsb = k / QK_K;
    let mut data = vec![0u8; n.div_ceil(R) * nsb * TILE6];
    for (g, gdata) in data.chunks_exact_mut(nsb * TILE6).enumerate() {
        crate::turns::pace();
        for (sb, t) in gdata.chunks_exact_mut(TILE6).enumerate() {
            for r in 0..R.min(n - g * R) {
                let row = g * R + r;
                let blk = &raw[(row * nsb + sb) * 210..(row * nsb + sb + 1) * 210];
                let q = super::q6k_quants(blk);
                for grp in 0..16 {
                    for c in 0..4 {
                        let at = (4 * grp + c) * 64 + 4 * r;
                        t[at..at + 4].copy_from_slice(&q[16 * grp + 4 * c..16 * grp + 4 * c + 4]);
                    }
                    t[SC6 + 16 * grp + r] = blk[192 + grp];
                }
                t[D6 + 2 * r..D6 + 2 * r + 2].copy_from_slice(&blk[208..210]);
            }
        }
    }
    data
}

fn row_into6(gdata: &[u8], r: usize, out: &mut [f32]) {
    for (t, dst) in gdata.chunks_exact(TILE6).zip(out.chunks_exact_mut(QK_K)) {
        let d = half::f16::from_le_bytes([t[D6 + 2 * r], t[D6 + 2 * r + 1]]).to_f32();
        for grp in 0..16 {
            let sc = t[SC6 + 16 * grp + r] as i8 as f32;
            for c in 0..4 {
                for i in 0..4 {
                    let q = t[(4 * grp + c) * 64 + 4 * r + i] as i32 - 32;
                    dst[16 * grp + 4 * c + i] = d * sc * q as f32;
                }
            }
        }
    }
}

/// Repacks the GGUF bytes of an `n × k` Q4_K matrix (`k` a multiple of 256, `raw` checked
/// by the caller) into tiles: group `g`'s `k / 256` tiles, one after another.
fn pack(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nsb = k / QK_K;
    let groups = n.div_ceil(R);
    let mut data = vec![0u8; groups * nsb * TILE];
    for (g, gdata) in data.chunks_exact_mut(nsb * TILE).enumerate() {
        // A background load may hand the CPU to serving between groups.
        crate::turns::pace();
        for (sb, t) in gdata.chunks_exact_mut(TILE).enumerate() {
            for r in 0..R.min(n - g * R) {
                let row = g * R + r;
                let blk = &raw[(row * nsb + sb) * 144..(row * nsb + sb + 1) * 144];
                let (sc, mn) = q4k_scales(&blk[4..16]);
                let qs = &blk[16..144];
                // GGUF: chunk j of 32 bytes holds values 64j + l (low) and 64j + 32 + l (high).
                let q = |v: usize| {
                    let b = qs[32 * (v / 64) + v % 32];
                    if v % 64 < 32 {
                        b & 0xF
                    } else {
                        b >> 4
                    }
                };
                for s in 0..8 {
                    for c in 0..4 {
                        for i in 0..4 {
                            let lo = q(32 * s + 4 * c + i);
                            let hi = q(32 * s + 16 + 4 * c + i);
                            t[(4 * s + c) * 64 + 4 * r + i] = lo | (hi << 4);
                        }
                    }
                    t[SC + 16 * s + r] = sc[s];
                }
                for p in 0..4 {
                    let at = MN + 64 * p + 4 * r;
                    t[at..at + 2].copy_from_slice(&(mn[2 * p] as i16).to_le_bytes());
                    t[at + 2..at + 4].copy_from_slice(&(mn[2 * p + 1] as i16).to_le_bytes());
                }
                t[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[0..2]);
                t[D + 32 + 2 * r..D + 32 + 2 * r + 2].copy_from_slice(&blk[2..4]);
            }
        }
    }
    data
}

/// Row `r` of a group's tiles (`gdata`), dequantized into `out` (`k` values): the values
/// [`super::dequantize_block`] gives for the GGUF row.
fn row_into(gdata: &[u8], r: usize, out: &mut [f32]) {
    let f = |t: &[u8], at: usize| half::f16::from_le_bytes([t[at], t[at + 1]]).to_f32();
    for (t, dst) in gdata.chunks_exact(TILE).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f(t, D + 2 * r), f(t, D + 32 + 2 * r));
        for s in 0..8 {
            let p = MN + 64 * (s / 2) + 4 * r + 2 * (s % 2);
            let m = i16::from_le_bytes([t[p], t[p + 1]]) as f32;
            let (ds, ms) = (d * t[SC + 16 * s + r] as f32, dmin * m);
            for c in 0..4 {
                for i in 0..4 {
                    let b = t[(4 * s + c) * 64 + 4 * r + i];
                    dst[32 * s + 4 * c + i] = ds * (b & 0xF) as f32 - ms;
                    dst[32 * s + 16 + 4 * c + i] = ds * (b >> 4) as f32 - ms;
                }
            }
        }
    }
}

/// The 16 rows of one group (`gdata`: `nsb` tiles) against tokens `t0 .. t0 + nt`
/// (`nt <= WIDE_T`), into `tile[t][r]`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
pub(crate) unsafe fn kernel(
    format: Format,
    gdata: &[u8],
    nsb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    tile: &mut Tile,
) {
    assert!(gdata.len() >= nsb * tile_bytes(format), "group too short");
    assert!((1..=WIDE_T).contains(&nt) && t0 + nt <= acts.m());
    assert_eq!(acts.k(), nsb * QK_K, "activations have the wrong width");
    // SAFETY: the caller guarantees the CPU features; the bounds are asserted above.
    unsafe {
        match format {
            Format::Q6K => by_tokens_wide!(nt, q6k(gdata, nsb, acts, t0, tile)),
            _ => by_tokens_wide!(nt, q4k(gdata, nsb, acts, t0, tile)),
        }
    }
}

/// A token's four words of 32-value sums for one super-block: word `p` holds
/// `b_{2p}, b_{2p+1}` as i16 (`|b| ≤ 32·127`), from its sixteen 16-value sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn pair_sums(bs: &[f32]) -> [i32; 4] {
    assert!(bs.len() >= 16);
    // SAFETY: 16 f32 are readable (asserted).
    let s16 = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(unsafe { _mm512_loadu_ps(bs.as_ptr()) }));
    let b32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
    let mut w = [0i32; 4];
    // SAFETY: 16 bytes into the 16 of `w`.
    unsafe { _mm_storeu_si128(w.as_mut_ptr().cast(), _mm256_cvtepi32_epi16(b32)) };
    w
}

/// # Safety
/// AVX-512 VNNI etc.; `g` holds `nsb` tiles; tokens `t0 .. t0 + T` exist in `acts`, whose
/// rows are `nsb · 256` wide.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
unsafe fn q4k<const T: usize>(g: &[u8], nsb: usize, acts: &Acts, t0: usize, tile: &mut Tile) {
    let tok = TokenPtrs::<T>::new(acts, t0);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    for sb in 0..nsb {
        // SAFETY: tile `sb` spans `TILE` bytes inside `g`; token rows hold `nsb · 256`
        // values, `nsb · 16` sums and `nsb` scales (the caller's guarantee).
        unsafe {
            let blk = g.as_ptr().add(sb * TILE);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D).cast()));
            let mut u = [_mm512_setzero_ps(); T];
            for s in 0..8 {
                let w = nibbles(blk.add(256 * s));
                // d·sc_s of each row: exact (an 11-bit mantissa times 6 bits).
                let sc = _mm_loadu_si128(blk.add(SC + 16 * s).cast());
                let dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                for t in 0..T {
                    let isum = dot32(&w, tok.qs[t].add(sb * QK_K + 32 * s));
                    u[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dsc, u[t]);
                }
            }
            let mn: [__m512i; 4] =
                std::array::from_fn(|p| _mm512_loadu_si512(blk.add(MN + 64 * p).cast()));
            let ndmin = _mm512_sub_ps(
                _mm512_setzero_ps(),
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D + 32).cast())),
            );
            for t in 0..T {
                let (bs, da) = tok.block(t, sb);
                let b = pair_sums(bs);
                let mut m = _mm512_dpwssd_epi32(zero, mn[0], _mm512_set1_epi32(b[0]));
                m = _mm512_dpwssd_epi32(m, mn[1], _mm512_set1_epi32(b[1]));
                m = _mm512_dpwssd_epi32(m, mn[2], _mm512_set1_epi32(b[2]));
                m = _mm512_dpwssd_epi32(m, mn[3], _mm512_set1_epi32(b[3]));
                u[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), ndmin, u[t]);
                acc[t] = _mm512_fmadd_ps(u[t], _mm512_set1_ps(da), acc[t]);
            }
        }
    }
    store_tile(tile, acc);
}

/// # Safety
/// As [`q4k`], for Q6_K tiles.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // `t` indexes accumulators kept in registers
unsafe fn q6k<const T: usize>(g: &[u8], nsb: usize, acts: &Acts, t0: usize, tile: &mut Tile) {
    let tok = TokenPtrs::<T>::new(acts, t0);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    for sb in 0..nsb {
        // SAFETY: tile `sb` spans `TILE6` bytes inside `g`; token rows hold `nsb · 256`
        // values, `nsb · 16` sums and `nsb` scales (the caller's guarantee).
        unsafe {
            let blk = g.as_ptr().add(sb * TILE6);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D6).cast()));
            let mut u = [_mm512_setzero_ps(); T];
            let mut o = [_mm512_setzero_ps(); T];
            for grp in 0..16 {
                let at = blk.add(256 * grp);
                let w: [__m512i; 4] =
                    std::array::from_fn(|c| _mm512_loadu_si512(at.add(64 * c).cast()));
                let dsc = _mm512_mul_ps(
                    d,
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(SC6 + 16 * grp).cast(),
                    ))),
                );
                for t in 0..T {
                    let a = tok.qs[t].add(sb * QK_K + 16 * grp);
                    let mut s0 = _mm512_dpbusd_epi32(zero, w[0], bcast4(a, 0));
                    let mut s1 = _mm512_dpbusd_epi32(zero, w[1], bcast4(a, 1));
                    s0 = _mm512_dpbusd_epi32(s0, w[2], bcast4(a, 2));
                    s1 = _mm512_dpbusd_epi32(s1, w[3], bcast4(a, 3));
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    u[t] = _mm512_fmadd_ps(isum, dsc, u[t]);
                    let b = _mm512_set1_ps(*tok.s[t].add(sb * 16 + grp));
                    o[t] = _mm512_fmadd_ps(b, dsc, o[t]);
                }
            }
            for t in 0..T {
                let da = *tok.d[t].add(sb);
                u[t] = _mm512_fmadd_ps(o[t], _mm512_set1_ps(-32.0), u[t]);
                acc[t] = _mm512_fmadd_ps(u[t], _mm512_set1_ps(da), acc[t]);
            }
        }
    }
    store_tile(tile, acc);
}
