//! AVX-512 VNNI kernels over the 16-row packed layout: one 512-bit vector holds sub-block `j`
//! (4 values) of 16 rows; `vpdpbusd` multiplies unsigned by signed bytes and adds groups of
//! four straight into i32 lanes, one lane per row.
#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::act::{Acts, TokenPtrs};
use super::Tile;
use super::{check_group, Format, BLOCK};

const R: usize = 16;

/// Bytes ahead of the block in use that the kernels ask the cache for: at 8 tokens a block's
/// arithmetic takes about as long as its bytes take to come from memory, and the hardware
/// prefetcher alone left the loads waiting (measured with `swapd bench decode --batch 8`).
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the `len` bytes `PREFETCH_AHEAD` past `blk` to be brought into L1. A prefetch
/// never faults, so it may run past the end of the weights.
#[inline(always)]
fn prefetch(blk: *const u8, len: usize) {
    let at = blk.wrapping_add(PREFETCH_AHEAD);
    let mut off = 0;
    while off < len {
        // SAFETY: a prefetch is only a hint: it reads nothing the program sees and cannot
        // fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off).cast()) };
        off += 64;
    }
}

/// Rows `0..16` of the group `g` (`nb` packed blocks) against tokens `t0 .. t0 + nt`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
pub(crate) unsafe fn kernel(
    format: Format,
    g: &[u8],
    nb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    tile: &mut Tile,
) {
    check_group(format, R, g, nb, acts, t0, nt, super::WIDE_T);
    // SAFETY: the caller guarantees the CPU features; the asserts above establish the bounds
    // each kernel relies on.
    unsafe {
        match format {
            Format::Q4_1 => by_tokens_wide!(nt, q4::<true, false>(g, nb, acts, t0, tile)),
            Format::Q5_1 => by_tokens_wide!(nt, q4::<true, true>(g, nb, acts, t0, tile)),
            Format::Q4_0 => by_tokens_wide!(nt, q4::<false, false>(g, nb, acts, t0, tile)),
            Format::Q5_0 => by_tokens_wide!(nt, q4::<false, true>(g, nb, acts, t0, tile)),
            Format::Q8_0 => by_tokens_wide!(nt, q8_0(g, nb, acts, t0, tile)),
            Format::Q4K | Format::Q5K | Format::Q6K => unreachable!("K-quants run in kquant"),
        }
    }
}

/// Byte `p` of a 16-row vector belongs to row `p / 4`: the shuffle that spreads one byte per
/// row (the same 16 in every 128-bit lane) to that row's four lanes.
static HB_SPREAD: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut p = 0;
    while p < 64 {
        a[p] = (p / 4) as u8;
        p += 1;
    }
    a
};

/// Broadcast of activation bytes `4j .. 4j+4` at `p`.
///
/// # Safety
/// `p .. p + 4j + 4` must be readable.
#[inline(always)]
pub(crate) unsafe fn bcast4(p: *const u8, j: usize) -> __m512i {
    // SAFETY: the caller guarantees the 4 bytes are readable; the read is unaligned.
    unsafe { _mm512_set1_epi32(p.add(4 * j).cast::<i32>().read_unaligned()) }
}

/// The 256 bytes at `p` as four 64-byte chunks: their low nibbles as vectors `0..4`, their
/// high nibbles as vectors `4..8` (the packed Q4_x layout of a 32-value block of 16 rows).
///
/// # Safety
/// 256 bytes are readable at `p`; the CPU has AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn nibbles(p: *const u8) -> [__m512i; 8] {
    let mask = _mm512_set1_epi8(0x0F);
    // SAFETY: the caller guarantees the 256 bytes.
    let c: [__m512i; 4] =
        std::array::from_fn(|c| unsafe { _mm512_loadu_si512(p.add(64 * c).cast()) });
    std::array::from_fn(|j| {
        let v = if j < 4 {
            c[j]
        } else {
            _mm512_srli_epi16::<4>(c[j - 4])
        };
        _mm512_and_si512(v, mask)
    })
}

/// `Σ w·a` of 16 rows over a 32-value block: the unsigned vectors `w` against the signed
/// activation bytes at `a`, in two `vpdpbusd` chains (half the latency of one).
///
/// # Safety
/// 32 bytes are readable at `a`; the CPU has AVX-512 F and VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
pub(crate) unsafe fn dot32(w: &[__m512i; 8], a: *const u8) -> __m512i {
    let zero = _mm512_setzero_si512();
    // SAFETY: the caller guarantees the 32 bytes.
    unsafe {
        let mut s0 = _mm512_dpbusd_epi32(zero, w[0], bcast4(a, 0));
        let mut s1 = _mm512_dpbusd_epi32(zero, w[1], bcast4(a, 1));
        s0 = _mm512_dpbusd_epi32(s0, w[2], bcast4(a, 2));
        s1 = _mm512_dpbusd_epi32(s1, w[3], bcast4(a, 3));
        s0 = _mm512_dpbusd_epi32(s0, w[4], bcast4(a, 4));
        s1 = _mm512_dpbusd_epi32(s1, w[5], bcast4(a, 5));
        s0 = _mm512_dpbusd_epi32(s0, w[6], bcast4(a, 6));
        s1 = _mm512_dpbusd_epi32(s1, w[7], bcast4(a, 7));
        _mm512_add_epi32(s0, s1)
    }
}

/// Writes each token's 16 row results into its row of `tile`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn store_tile<const T: usize>(tile: &mut Tile, acc: [__m512; T]) {
    for (row, acc) in tile.iter_mut().zip(acc) {
        // SAFETY: each tile row has MAX_R = 16 f32.
        unsafe { _mm512_storeu_ps(row.as_mut_ptr(), acc) };
    }
}

/// Q4_1 (`OFFSET`, activations Q8_1) or Q4_0 (activations Q8_0): weights are unsigned
/// nibbles, activations signed bytes, exactly `vpdpbusd`'s operands. With `HB`, Q5_1 or
/// Q5_0: Q4_1 or Q4_0 plus each value's fifth bit from the packed high-bit plane.
///
/// # Safety
/// AVX-512 VNNI etc.; `g` holds `nb` packed 16-row blocks; `acts` has tokens
/// `t0 .. t0 + T` of width `nb · 32`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    let mut acc = [_mm512_setzero_ps(); T];
    let p = g.as_ptr();
    for b in 0..nb {
        // SAFETY: block `b < nb` spans `p + b·pb .. p + (b+1)·pb`, inside `g` (asserted by
        // `kernel`): 256 bytes of nibbles, 16 f16 scales and, with OFFSET, 16 f16 mins.
        // Token pointers index `b·32 .. b·32+32` of rows of width `nb·32`, and `b` of rows of
        // `nb` scales.
        unsafe {
            let blk = p.add(b * pb);
            prefetch(blk, pb);
            let mut w = nibbles(blk);
            if HB {
                // Chunk c's 16 high-bit bytes (one per row) in every 128-bit lane, spread to
                // each row's 4 byte lanes and tested against each lane's bit: 16 where set.
                let idx = _mm512_loadu_si512(HB_SPREAD.as_ptr().cast());
                let mlo = _mm512_set1_epi32(0x0804_0201);
                let mhi = _mm512_set1_epi32(0x8040_2010_u32 as i32);
                let sixteen = _mm512_set1_epi8(16);
                for c in 0..4 {
                    let x = _mm512_broadcast_i32x4(_mm_loadu_si128(blk.add(hb_at + 16 * c).cast()));
                    let y = _mm512_shuffle_epi8(x, idx);
                    let lo = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(y, mlo), sixteen);
                    let hi = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(y, mhi), sixteen);
                    w[c] = _mm512_or_si512(w[c], lo);
                    w[4 + c] = _mm512_or_si512(w[4 + c], hi);
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256).cast()));
            let mw = if OFFSET {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(288).cast()))
            } else {
                _mm512_setzero_ps()
            };
            for (t, acc) in acc.iter_mut().enumerate() {
                let isum = _mm512_cvtepi32_ps(dot32(&w, tok.qs[t].add(b * BLOCK)));
                let da = _mm512_set1_ps(*tok.d[t].add(b));
                let sa = _mm512_set1_ps(*tok.s[t].add(b));
                if OFFSET {
                    *acc = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, da), *acc);
                    *acc = _mm512_fmadd_ps(mw, sa, *acc);
                } else {
                    let centred =
                        _mm512_fmadd_ps(sa, _mm512_set1_ps(if HB { -16.0 } else { -8.0 }), isum);
                    *acc = _mm512_fmadd_ps(centred, _mm512_mul_ps(dw, da), *acc);
                }
            }
        }
    }
    store_tile(tile, acc);
}

/// Q8_0 against activations stored as `a + 128` (unsigned): `vpdpbusd` gives
/// `Σ (a + 128)·w`, and subtracting `128 · Σ w` (packed with the block) leaves `Σ a·w`.
///
/// # Safety
/// As for [`q4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0<const T: usize>(g: &[u8], nb: usize, acts: &Acts, t0: usize, tile: &mut Tile) {
    let pb = 36 * R;
    let tok = TokenPtrs::<T>::new(acts, t0);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); T];
    let p = g.as_ptr();
    for b in 0..nb {
        // SAFETY: block `b < nb` spans `p + b·pb .. p + (b+1)·pb`, inside `g`: 512 bytes of
        // quants, 16 f16 scales, 16 i16 sums. Token pointers stay inside their rows.
        unsafe {
            let blk = p.add(b * pb);
            prefetch(blk, pb);
            let w: [__m512i; 8] =
                std::array::from_fn(|j| _mm512_loadu_si512(blk.add(64 * j).cast()));
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512).cast()));
            let bias = _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(_mm256_loadu_si256(
                blk.add(544).cast(),
            )));
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = tok.qs[t].add(b * BLOCK);
                let mut s0 = _mm512_dpbusd_epi32(zero, bcast4(a, 0), w[0]);
                let mut s1 = _mm512_dpbusd_epi32(zero, bcast4(a, 1), w[1]);
                s0 = _mm512_dpbusd_epi32(s0, bcast4(a, 2), w[2]);
                s1 = _mm512_dpbusd_epi32(s1, bcast4(a, 3), w[3]);
                s0 = _mm512_dpbusd_epi32(s0, bcast4(a, 4), w[4]);
                s1 = _mm512_dpbusd_epi32(s1, bcast4(a, 5), w[5]);
                s0 = _mm512_dpbusd_epi32(s0, bcast4(a, 6), w[6]);
                s1 = _mm512_dpbusd_epi32(s1, bcast4(a, 7), w[7]);
                let s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias);
                let da = _mm512_set1_ps(*tok.d[t].add(b));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, da), *acc);
            }
        }
    }
    store_tile(tile, acc);
}
