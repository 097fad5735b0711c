//! The K-quants (Q4_K, Q6_K): 256-value super-blocks with per-sub-block scales, multiplied
//! with activations quantized to Q8_K (one f32 scale per 256 values and the sum of every 16
//! quants), as llama.cpp's `ggml_vec_dot_q4_K_q8_K` / `_q6_K_q8_K` do.
//!
//! GGUF layouts (one super-block of one row):
//! - Q4_K (144 bytes): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. The 12 bytes
//!   hold eight 6-bit scales `sc` and eight 6-bit mins `m`; 64-value chunk `j` takes its
//!   first 32 values from the low nibbles of `qs[32j..32j+32]` (sub-block `2j`) and the next
//!   32 from the high nibbles (sub-block `2j+1`). Value: `d·sc·q − dmin·m`.
//! - Q6_K (210 bytes): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; value `v`
//!   (`n = v/128`, `g = v%128/32`, `l = v%32`) is `d · sc[8n + 2g + l/16] · (q − 32)` with
//!   `q` 6 bits: 4 from `ql[64n + 32(g&1) + l]` (low nibble for `g < 2`, high otherwise) and
//!   2 from `qh[32n + l] >> 2g`. The scale index of a value is also its 16-value sum index.
//!
//! Rows are kept as GGUF stores them (no interleaving: a super-block's scales differ per
//! row). A kernel call takes up to `MAX_R` rows × `TILE_T` tokens and loads each weight
//! super-block once for all the tokens. The integer sums are exact and the float work per
//! super-block is the same sequence of operations in every kernel, so the scalar and SIMD
//! kernels agree bit for bit, and a row's result does not depend on the other rows or tokens.
use half::f16;

use super::act::Acts;
use super::{Format, Isa, Tile, TILE_T};

/// Values per super-block.
pub const QK_K: usize = 256;

fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Q4_K's eight (scale, min) pairs, as llama.cpp's `get_scale_min_k4`.
pub(crate) fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// The 256 quants of a Q6_K super-block (`0..64`, before the −32).
fn q6k_quants(blk: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&blk[0..128], &blk[128..192]);
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        for l in 0..32 {
            let h = qh[32 * n + l];
            let (a, b) = (ql[64 * n + l], ql[64 * n + 32 + l]);
            q[128 * n + l] = (a & 0xF) | ((h & 3) << 4);
            q[128 * n + 32 + l] = (b & 0xF) | (((h >> 2) & 3) << 4);
            q[128 * n + 64 + l] = (a >> 4) | (((h >> 4) & 3) << 4);
            q[128 * n + 96 + l] = (b >> 4) | (((h >> 6) & 3) << 4);
        }
    }
    q
}

/// Dequantizes one super-block of `format` into `out` (256 values).
pub(crate) fn dequantize_block(format: Format, blk: &[u8], out: &mut [f32]) {
    match format {
        Format::Q4K => {
            let (d, dmin) = (rd_f16(blk, 0), rd_f16(blk, 2));
            let (sc, mn) = q4k_scales(&blk[4..16]);
            let qs = &blk[16..144];
            for j in 0..4 {
                let (d1, m1) = (d * sc[2 * j] as f32, dmin * mn[2 * j] as f32);
                let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * mn[2 * j + 1] as f32);
                for l in 0..32 {
                    let q = qs[32 * j + l];
                    out[64 * j + l] = d1 * (q & 0xF) as f32 - m1;
                    out[64 * j + 32 + l] = d2 * (q >> 4) as f32 - m2;
                }
            }
        }
        Format::Q6K => {
            let d = rd_f16(blk, 208);
            let q = q6k_quants(blk);
            for (v, o) in out.iter_mut().enumerate().take(QK_K) {
                let sc = blk[192 + v / 16] as i8 as f32;
                *o = d * sc * (q[v] as i32 - 32) as f32;
            }
        }
        _ => unreachable!("{format:?} is not a K-quant"),
    }
}

/// Q8_K quantization of one 256-value block, as llama.cpp's `quantize_row_q8_K_ref`: the
/// value of largest magnitude maps to −127, `q = round(x · iscale)` (ties to even), capped at
/// 127; returns the scale (`1 / iscale`, f32) and writes the 16 sums of 16 quants.
pub(crate) fn quantize_q8k(x: &[f32], q: &mut [u8], bsums: &mut [f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0.0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8 as u8;
    }
    for (s, c) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        *s = c.iter().map(|&b| b as i8 as i32).sum::<i32>() as f32;
    }
    1.0 / iscale
}

/// The float work of one super-block, shared by every kernel: `acc + (dw·da)·isum −
/// (dmin·da)·msum`, in that order.
#[inline(always)]
pub(super) fn finish(acc: f32, dw: f32, dmin: f32, da: f32, isum: i32, msum: i32) -> f32 {
    let acc = acc + (dw * da) * isum as f32;
    acc - (dmin * da) * msum as f32
}

/// `rows` rows (`w`: row-major, `nsb` super-blocks each) against tokens `t0 .. t0 + nt`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kernel(
    format: Format,
    isa: Isa,
    w: &[u8],
    rows: usize,
    nsb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    tile: &mut Tile,
) {
    let rb = nsb * format.block_bytes();
    assert!(w.len() >= rows * rb, "rows too short");
    assert!((1..=TILE_T).contains(&nt) && t0 + nt <= acts.m());
    assert_eq!(acts.k(), nsb * QK_K, "activations have the wrong width");
    for (r, row) in w.chunks_exact(rb).take(rows).enumerate() {
        let mut out = [0f32; TILE_T];
        match isa {
            // SAFETY: `pack` refused to build a matrix for an instruction set the CPU lacks
            // (AVX-512 here includes VNNI and AVX2); the bounds were checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => unsafe {
                simd_row(format, isa, row, nsb, acts, t0, nt, &mut out)
            },
            _ => scalar_row(format, row, nsb, acts, t0, nt, &mut out),
        }
        for t in 0..nt {
            tile[t][r] = out[t];
        }
    }
}

/// Portable kernel of one row: the reference the SIMD kernel is tested against.
fn scalar_row(
    format: Format,
    row: &[u8],
    nsb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    out: &mut [f32; TILE_T],
) {
    let bb = format.block_bytes();
    for sb in 0..nsb {
        let blk = &row[sb * bb..(sb + 1) * bb];
        for (t, acc) in out.iter_mut().enumerate().take(nt) {
            let a = &acts.qs_row(t0 + t)[sb * QK_K..(sb + 1) * QK_K];
            let da = acts.d_row(t0 + t)[sb];
            let bs = &acts.s_row(t0 + t)[sb * 16..(sb + 1) * 16];
            let ai = |i: usize| a[i] as i8 as i32;
            match format {
                Format::Q4K => {
                    let (sc, mn) = q4k_scales(&blk[4..16]);
                    let qs = &blk[16..144];
                    let mut isum = 0i32;
                    for j in 0..4 {
                        let (mut lo, mut hi) = (0i32, 0i32);
                        for l in 0..32 {
                            let q = qs[32 * j + l];
                            lo += (q & 0xF) as i32 * ai(64 * j + l);
                            hi += (q >> 4) as i32 * ai(64 * j + 32 + l);
                        }
                        isum += lo * sc[2 * j] as i32 + hi * sc[2 * j + 1] as i32;
                    }
                    let msum: i32 = (0..8)
                        .map(|j| mn[j] as i32 * (bs[2 * j] + bs[2 * j + 1]) as i32)
                        .sum();
                    *acc = finish(*acc, rd_f16(blk, 0), rd_f16(blk, 2), da, isum, msum);
                }
                Format::Q6K => {
                    let q = q6k_quants(blk);
                    let mut isum = 0i32;
                    let mut msum = 0i32;
                    for j in 0..16 {
                        let sc = blk[192 + j] as i8 as i32;
                        let s: i32 = (0..16).map(|i| q[16 * j + i] as i32 * ai(16 * j + i)).sum();
                        isum += s * sc;
                        msum += 32 * sc * bs[j] as i32;
                    }
                    // The −32 offset comes in as msum: Σ sc·(q − 32)·a = isum − msum.
                    let d = rd_f16(blk, 208);
                    *acc = finish(*acc, d, d, da, isum, msum);
                }
                _ => unreachable!("{format:?} is not a K-quant"),
            }
        }
    }
}

/// Raw pointers to the quantized values, scales and 16-sums of `T` tokens' rows, taken once
/// per kernel call (the bounds were checked by [`kernel`]).
#[cfg(target_arch = "x86_64")]
pub(super) struct Toks<const T: usize> {
    pub(super) qs: [*const i8; T],
    pub(super) d: [*const f32; T],
    pub(super) s: [*const f32; T],
}

#[cfg(target_arch = "x86_64")]
impl<const T: usize> Toks<T> {
    fn new(acts: &Acts, t0: usize) -> Self {
        Self {
            qs: std::array::from_fn(|t| acts.qs_row(t0 + t).as_ptr().cast()),
            d: std::array::from_fn(|t| acts.d_row(t0 + t).as_ptr()),
            s: std::array::from_fn(|t| acts.s_row(t0 + t).as_ptr()),
        }
    }
}

/// # Safety
/// The CPU supports `isa` (AVX2, or AVX-512 with VNNI); `kernel` checked the bounds.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn simd_row(
    format: Format,
    isa: Isa,
    row: &[u8],
    nsb: usize,
    acts: &Acts,
    t0: usize,
    nt: usize,
    out: &mut [f32; TILE_T],
) {
    use super::kquant_avx2::{q4k_avx2, q6k_avx2};
    use super::kquant_vnni as v;
    macro_rules! go {
        ($($f:ident)::+) => {
            match nt {
                1 => $($f)::+::<1>(row, nsb, &Toks::new(acts, t0), out),
                2 => $($f)::+::<2>(row, nsb, &Toks::new(acts, t0), out),
                3 => $($f)::+::<3>(row, nsb, &Toks::new(acts, t0), out),
                _ => $($f)::+::<4>(row, nsb, &Toks::new(acts, t0), out),
            }
        };
    }
    // SAFETY (every arm): the caller guarantees the instruction set and the bounds each
    // kernel relies on (`nsb` super-blocks in `row`, tokens `t0 .. t0 + nt` in `acts`).
    unsafe {
        match (format, isa) {
            (Format::Q4K, Isa::Avx512) => go!(v::q4k),
            (Format::Q6K, Isa::Avx512) => go!(v::q6k),
            (Format::Q4K, _) => go!(q4k_avx2),
            (Format::Q6K, _) => go!(q6k_avx2),
            _ => unreachable!("{format:?} is not a K-quant"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8k_maps_the_largest_magnitude_to_minus_127_and_sums_sixteens() {
        let mut x = vec![0.5f32; QK_K];
        x[7] = -2.0;
        let (mut q, mut bs) = (vec![0u8; QK_K], vec![0f32; 16]);
        let d = quantize_q8k(&x, &mut q, &mut bs);
        assert_eq!(q[7] as i8, -127, "the largest magnitude maps to -127");
        assert_eq!(q[0] as i8, 32);
        assert!((d - 2.0 / 127.0).abs() < 1e-9);
        assert_eq!(bs[0], (32 * 15 - 127) as f32);
        assert_eq!(bs[1], (32 * 16) as f32);
    }
}
