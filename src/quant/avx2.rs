//! AVX2 kernels (with FMA and F16C) over the 8-row packed layout: one 256-bit vector holds
//! sub-block `j` (4 values) of 8 rows; `maddubs` against a broadcast of 4 activation bytes
//! gives 8 rows' partial dot products, and the 8 rows' block scales form one f32 vector.
#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::act::{Acts, TokenPtrs};
use super::Tile;
use super::{check_group, Format, BLOCK};

const R: usize = 8;

/// Rows `0..8` of the group `g` (`nb` packed blocks) against tokens `t0 .. t0 + nt`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
pub(crate) unsafe fn kernel(
    format: Format,
    g: &[u8],
    nb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    tile: &mut Tile,
) {
    check_group(format, R, g, nb, acts, t0, nt, super::TILE_T);
    // SAFETY: the caller guarantees the CPU features; the asserts above establish the bounds
    // each kernel relies on (`nb` packed blocks in `g`, tokens `t0..t0+nt` in `acts`).
    unsafe {
        match format {
            Format::Q4_1 => by_tokens!(nt, q4::<true, false>(g, nb, acts, t0, tile)),
            Format::Q5_1 => by_tokens!(nt, q4::<true, true>(g, nb, acts, t0, tile)),
            Format::Q4_0 => by_tokens!(nt, q4::<false, false>(g, nb, acts, t0, tile)),
            Format::Q5_0 => by_tokens!(nt, q4::<false, true>(g, nb, acts, t0, tile)),
            Format::Q8_0 => by_tokens!(nt, q8_0(g, nb, acts, t0, tile)),
            Format::Q4K | Format::Q5K | Format::Q6K => unreachable!("K-quants run in kquant"),
        }
    }
}

/// Broadcast of activation bytes `4j .. 4j+4` at `p`.
///
/// # Safety
/// `p .. p + 4j + 4` must be readable.
#[inline(always)]
unsafe fn bcast4(p: *const u8, j: usize) -> __m256i {
    // SAFETY: the caller guarantees the 4 bytes are readable; the read is unaligned.
    unsafe { _mm256_set1_epi32(p.add(4 * j).cast::<i32>().read_unaligned()) }
}

/// Q4_1 (`OFFSET`: `d·q + m`, activations Q8_1) or Q4_0 (`d·(q − 8)`, activations Q8_0);
/// with `HB`, Q5_1 or Q5_0 (`d·(q − 16)`): Q4_1 or Q4_0 plus each value's fifth bit from
/// the packed high-bit plane.
///
/// # Safety
/// AVX2/FMA/F16C; `g` holds `nb` packed 8-row blocks; `acts` has tokens `t0 .. t0 + T` of
/// width `nb · 32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4<const T: usize, const OFFSET: bool, const HB: bool>(
    g: &[u8],
    nb: usize,
    acts: &Acts,
    t0: usize,
    tile: &mut Tile,
) {
    // Nibbles, scales, then (OFFSET) mins and (HB) the high-bit plane.
    let hb_at = if OFFSET { 20 * R } else { 18 * R };
    let pb = if HB { hb_at + 4 * R } else { hb_at };
    let tok = TokenPtrs::<T>::new(acts, t0);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    let p = g.as_ptr();
    for b in 0..nb {
        // SAFETY: block `b < nb` spans `p + b·pb .. p + (b+1)·pb`, inside `g` (asserted by
        // `kernel`): 128 bytes of nibbles, then 8 f16 scales and, with OFFSET, 8 f16 mins.
        // Token pointers index `b·32 .. b·32+32` of rows of width `nb·32`, and `b` of rows of
        // `nb` scales.
        unsafe {
            let blk = p.add(b * pb);
            let c = [
                _mm256_loadu_si256(blk.cast()),
                _mm256_loadu_si256(blk.add(32).cast()),
                _mm256_loadu_si256(blk.add(64).cast()),
                _mm256_loadu_si256(blk.add(96).cast()),
            ];
            // w[j] = sub-block j (values 4j..4j+4) of the 8 rows, as unsigned bytes 0..15.
            let mut w = [
                _mm256_and_si256(c[0], mask),
                _mm256_and_si256(c[1], mask),
                _mm256_and_si256(c[2], mask),
                _mm256_and_si256(c[3], mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(c[0]), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(c[1]), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(c[2]), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(c[3]), mask),
            ];
            if HB {
                // Chunk c's 8 high-bit bytes (one per row), spread to the row's 4 byte lanes
                // and tested against each lane's bit: 16 where set.
                let idx = _mm256_setr_epi8(
                    0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6,
                    6, 6, 7, 7, 7, 7,
                );
                let mlo = _mm256_set1_epi32(0x0804_0201);
                let mhi = _mm256_set1_epi32(0x8040_2010_u32 as i32);
                let sixteen = _mm256_set1_epi8(16);
                for c in 0..4 {
                    let x =
                        _mm256_set1_epi64x(blk.add(hb_at + 8 * c).cast::<i64>().read_unaligned());
                    let y = _mm256_shuffle_epi8(x, idx);
                    let bit =
                        |m| _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(y, m), m), sixteen);
                    w[c] = _mm256_or_si256(w[c], bit(mlo));
                    w[4 + c] = _mm256_or_si256(w[4 + c], bit(mhi));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(128).cast()));
            let mw = if OFFSET {
                _mm256_cvtph_ps(_mm_loadu_si128(blk.add(144).cast()))
            } else {
                _mm256_setzero_ps()
            };
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = tok.qs[t].add(b * BLOCK);
                // Each i16 lane is q·a over 2 values: |.| ≤ 2·15·127 = 3810, so the sum of
                // all 8 sub-blocks (≤ 30480) cannot saturate before widening to i32.
                let p01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[0], bcast4(a, 0)),
                    _mm256_maddubs_epi16(w[1], bcast4(a, 1)),
                );
                let p23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[2], bcast4(a, 2)),
                    _mm256_maddubs_epi16(w[3], bcast4(a, 3)),
                );
                let p45 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[4], bcast4(a, 4)),
                    _mm256_maddubs_epi16(w[5], bcast4(a, 5)),
                );
                let p67 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(w[6], bcast4(a, 6)),
                    _mm256_maddubs_epi16(w[7], bcast4(a, 7)),
                );
                let s32 = if HB {
                    // 5-bit quants: four sub-blocks reach 4·2·31·127 = 31496, so each half
                    // widens to i32 on its own.
                    _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones),
                        _mm256_madd_epi16(_mm256_add_epi16(p45, p67), ones),
                    )
                } else {
                    let s16 =
                        _mm256_add_epi16(_mm256_add_epi16(p01, p23), _mm256_add_epi16(p45, p67));
                    _mm256_madd_epi16(s16, ones)
                };
                let isum = _mm256_cvtepi32_ps(s32);
                let da = _mm256_set1_ps(*tok.d[t].add(b));
                let sa = _mm256_set1_ps(*tok.s[t].add(b));
                if OFFSET {
                    *acc = _mm256_fmadd_ps(isum, _mm256_mul_ps(dw, da), *acc);
                    *acc = _mm256_fmadd_ps(mw, sa, *acc);
                } else {
                    // Σ (q − 8)·a = Σ q·a − 8·Σ a (16 for Q5_0); both sums are exact.
                    let centred =
                        _mm256_fmadd_ps(sa, _mm256_set1_ps(if HB { -16.0 } else { -8.0 }), isum);
                    *acc = _mm256_fmadd_ps(centred, _mm256_mul_ps(dw, da), *acc);
                }
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row has MAX_R ≥ 8 f32.
        unsafe { _mm256_storeu_ps(row.as_mut_ptr(), acc) };
    }
}

/// Q8_0 against Q8_0 activations: `maddubs(|w|, sign(a, w))` multiplies signed by signed.
///
/// # Safety
/// As for [`q4`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const T: usize>(g: &[u8], nb: usize, acts: &Acts, t0: usize, tile: &mut Tile) {
    let pb = 36 * R;
    let tok = TokenPtrs::<T>::new(acts, t0);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    let p = g.as_ptr();
    for b in 0..nb {
        // SAFETY: block `b < nb` spans `p + b·pb .. p + (b+1)·pb`, inside `g`: 256 bytes of
        // quants then 8 f16 scales. Token pointers stay inside their rows (see `q4`).
        unsafe {
            let blk = p.add(b * pb);
            let w: [__m256i; 8] =
                std::array::from_fn(|j| _mm256_loadu_si256(blk.add(32 * j).cast()));
            let wabs = w.map(|w| _mm256_abs_epi8(w));
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(256).cast()));
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = tok.qs[t].add(b * BLOCK);
                // |w| ≤ 128 and |a| ≤ 127: a pair sums to at most 32512, no saturation.
                let part = |j: usize| {
                    let sa = _mm256_sign_epi8(bcast4(a, j), w[j]);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[j], sa), ones)
                };
                let s = _mm256_add_epi32(
                    _mm256_add_epi32(
                        _mm256_add_epi32(part(0), part(1)),
                        _mm256_add_epi32(part(2), part(3)),
                    ),
                    _mm256_add_epi32(
                        _mm256_add_epi32(part(4), part(5)),
                        _mm256_add_epi32(part(6), part(7)),
                    ),
                );
                let da = _mm256_set1_ps(*tok.d[t].add(b));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, da), *acc);
            }
        }
    }
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row has MAX_R ≥ 8 f32.
        unsafe { _mm256_storeu_ps(row.as_mut_ptr(), acc) };
    }
}
