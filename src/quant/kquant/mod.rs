//! The K-quants (Q4_K, Q5_K, Q6_K): 256-value super-blocks with per-sub-block scales,
//! multiplied with activations quantized to Q8_K (one f32 scale per 256 values and the sum of
//! every 16 quants), as llama.cpp's `ggml_vec_dot_q{4,5,6}_K_q8_K` do.
//!
//! GGUF layouts (one super-block of one row):
//! - Q4_K (144 bytes): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. The 12 bytes
//!   hold eight 6-bit scales `sc` and eight 6-bit mins `m`; 64-value chunk `j` takes its
//!   first 32 values from the low nibbles of `qs[32j..32j+32]` (sub-block `2j`) and the next
//!   32 from the high nibbles (sub-block `2j+1`). Value: `d·sc·q − dmin·m`.
//! - Q5_K (176 bytes): `d, dmin, scales` as Q4_K, then `qh: [u8; 32], qs: [u8; 128]`; the
//!   5-bit `q` of value `64j + l` (`l < 32`) is Q4_K's nibble plus bit `2j` of `qh[l]` as 16,
//!   and of value `64j + 32 + l` bit `2j + 1`. Same value formula.
//! - Q6_K (210 bytes): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; value `v`
//!   (`n = v/128`, `g = v%128/32`, `l = v%32`) is `d · sc[8n + 2g + l/16] · (q − 32)` with
//!   `q` 6 bits: 4 from `ql[64n + 32(g&1) + l]` (low nibble for `g < 2`, high otherwise) and
//!   2 from `qh[32n + l] >> 2g`. The scale index of a value is also its 16-value sum index.
//!
//! On AVX-512, Q4_K and Q6_K matrices are packed in 16-row tiles ([`tiled`]), where one
//! `vpdpbusd` serves 16 rows. Otherwise rows are kept as GGUF stores them, and a kernel call
//! takes up to `MAX_R` rows × `TILE_T` tokens, loading each weight super-block once for all
//! the tokens. Each super-block's integer sums are exact; they join eight f32 lanes per (row,
//! token) by the same fused multiply-adds in every row kernel, and the lanes are reduced once,
//! at the row's end ([`blocks::Lanes`]), so the scalar, AVX2 and AVX-512 Q5_K kernels agree
//! bit for bit. In every kernel a row's result does not depend on the other rows or tokens.
use half::f16;

mod avx2;
mod blocks;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tiled;
#[cfg(target_arch = "x86_64")]
mod vnni;

use super::act::Acts;
#[cfg(target_arch = "x86_64")]
use super::act::TokenPtrs;
use super::{Format, Isa, Tile, TILE_T};
use blocks::q4k_scales;

pub use super::act::QK_K;

fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// The 256 quants of a Q6_K super-block (`0..64`, before the −32).
pub(crate) fn q6k_quants(blk: &[u8]) -> [u8; QK_K] {
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

/// The 5-bit quant of value `64j + 32h + l` of a Q4_K/Q5_K super-block: its nibble, plus
/// (Q5_K) its high bit from `qh`.
#[inline(always)]
fn q45(qs: &[u8], qh: Option<&[u8]>, j: usize, h: usize, l: usize) -> u8 {
    let q = qs[32 * j + l];
    let nib = if h == 0 { q & 0xF } else { q >> 4 };
    nib | qh.map_or(0, |qh| ((qh[l] >> (2 * j + h)) & 1) << 4)
}

/// Dequantizes one super-block of `format` into `out` (256 values).
pub(crate) fn dequantize_block(format: Format, blk: &[u8], out: &mut [f32]) {
    match format {
        Format::Q4K | Format::Q5K => {
            let (d, dmin) = (rd_f16(blk, 0), rd_f16(blk, 2));
            let (sc, mn) = q4k_scales(&blk[4..16]);
            let (qh, qs) = q45_parts(format, blk);
            for j in 0..4 {
                for h in 0..2 {
                    let (ds, ms) = (d * sc[2 * j + h] as f32, dmin * mn[2 * j + h] as f32);
                    for l in 0..32 {
                        out[64 * j + 32 * h + l] = ds * q45(qs, qh, j, h, l) as f32 - ms;
                    }
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

/// A Q4_K or Q5_K super-block's high bits (Q5_K only) and nibbles.
fn q45_parts(format: Format, blk: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match format {
        Format::Q5K => (Some(&blk[16..48]), &blk[48..176]),
        _ => (None, &blk[16..144]),
    }
}

/// A K-quant matrix's packed bytes: [`tiled`]'s tiles where [`is_tiled`], else its GGUF
/// rows as they are, run in groups of `R` rows.
pub(crate) fn pack(
    format: Format,
    raw: &[u8],
    n: usize,
    k: usize,
    isa: Isa,
) -> Result<Vec<u8>, String> {
    if k == 0 || !k.is_multiple_of(QK_K) {
        return Err(format!("k = {k} is not a positive multiple of {QK_K}"));
    }
    let want = n * (k / QK_K) * format.block_bytes();
    if raw.len() != want {
        return Err(format!(
            "{format:?} {n}×{k} needs {want} bytes, got {}",
            raw.len()
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if is_tiled(format, isa) {
        return Ok(tiled::pack_format(format, raw, n, k));
    }
    let mut data = Vec::with_capacity(raw.len());
    for part in raw.chunks(1 << 20) {
        // A background load may hand the CPU to serving between megabytes.
        crate::turns::pace();
        data.extend_from_slice(part);
    }
    Ok(data)
}

/// Whether `format`'s matrices for `isa` are packed in [`tiled`]'s 16-row tiles (Q4_K and
/// Q6_K on AVX-512) rather than kept as GGUF rows.
pub(crate) fn is_tiled(format: Format, isa: Isa) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(format, Format::Q4K | Format::Q6K)
        && isa == Isa::Avx512
}

/// Tokens one kernel call takes: `WIDE_T` for the tiled kernel, else `TILE_T`.
pub(crate) fn tokens_per_call(format: Format, isa: Isa) -> usize {
    if is_tiled(format, isa) {
        super::WIDE_T
    } else {
        TILE_T
    }
}

/// One group's `rows` rows (`w`: its tiles, or its GGUF rows of `nsb` super-blocks each)
/// against tokens `t0 .. t0 + nt`.
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
    #[cfg(target_arch = "x86_64")]
    if is_tiled(format, isa) {
        // SAFETY: `pack` refused to build a matrix for an instruction set the CPU lacks.
        return unsafe { tiled::kernel(format, w, nsb, acts, t0, nt, tile) };
    }
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

/// Portable kernel of one row: the reference the SIMD kernels are tested against. It
/// computes each super-block's lane integers as [`blocks::Lanes`] defines them.
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
    let mut lanes = [[0f32; 8]; TILE_T];
    for sb in 0..nsb {
        let blk = &row[sb * bb..(sb + 1) * bb];
        for (t, acc) in lanes.iter_mut().enumerate().take(nt) {
            let a = &acts.qs_row(t0 + t)[sb * QK_K..(sb + 1) * QK_K];
            let da = acts.d_row(t0 + t)[sb];
            let bs = &acts.s_row(t0 + t)[sb * 16..(sb + 1) * 16];
            let bs = |i: usize| bs[i] as i32;
            let ai = |i: usize| a[i] as i8 as i32;
            let (mut isum, mut msum) = ([0i32; 8], [0i32; 8]);
            match format {
                Format::Q4K | Format::Q5K => {
                    let (sc, mn) = q4k_scales(&blk[4..16]);
                    let (qh, qs) = q45_parts(format, blk);
                    for (l, (is, ms)) in isum.iter_mut().zip(&mut msum).enumerate() {
                        for j in 0..4 {
                            let (mut lo, mut hi) = (0i32, 0i32);
                            for v in 4 * l..4 * l + 4 {
                                lo += q45(qs, qh, j, 0, v) as i32 * ai(64 * j + v);
                                hi += q45(qs, qh, j, 1, v) as i32 * ai(64 * j + 32 + v);
                            }
                            *is += lo * sc[2 * j] as i32 + hi * sc[2 * j + 1] as i32;
                        }
                        let j = blocks::MIN_LANE[l];
                        *ms = mn[j] as i32 * (bs(2 * j) + bs(2 * j + 1));
                    }
                    blocks::step45(acc, rd_f16(blk, 0), rd_f16(blk, 2), da, &isum, &msum);
                }
                Format::Q6K => {
                    let q = q6k_quants(blk);
                    let sc = |g: usize| blk[192 + g] as i8 as i32;
                    for (l, (is, ms)) in isum.iter_mut().zip(&mut msum).enumerate() {
                        for g in 0..8 {
                            let v0 = 32 * g + 4 * l;
                            for (v, &qv) in q.iter().enumerate().skip(v0).take(4) {
                                *is += sc(v / 16) * qv as i32 * ai(v);
                            }
                        }
                        *ms = sc(l) * bs(l) + sc(8 + l) * bs(8 + l);
                    }
                    blocks::step6(acc, rd_f16(blk, 208), da, &isum, &msum);
                }
                _ => unreachable!("{format:?} is not a K-quant"),
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(&lanes).take(nt) {
        *o = blocks::reduce8(acc);
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
    use avx2::{q45k_avx2, q6k_avx2};
    use vnni as v;
    // SAFETY (every arm): the caller guarantees the instruction set and the bounds each
    // kernel relies on (`nsb` super-blocks in `row`, tokens `t0 .. t0 + nt` in `acts`).
    unsafe {
        match (format, isa) {
            (Format::Q5K, Isa::Avx512) => by_tokens!(
                nt,
                v::q45k::<true>(row, nsb, &TokenPtrs::new(acts, t0), out)
            ),
            (Format::Q4K, _) => by_tokens!(
                nt,
                q45k_avx2::<false>(row, nsb, &TokenPtrs::new(acts, t0), out)
            ),
            (Format::Q5K, _) => by_tokens!(
                nt,
                q45k_avx2::<true>(row, nsb, &TokenPtrs::new(acts, t0), out)
            ),
            (Format::Q6K, _) => by_tokens!(nt, q6k_avx2(row, nsb, &TokenPtrs::new(acts, t0), out)),
            _ => unreachable!("{format:?} is not a K-quant"),
        }
    }
}
