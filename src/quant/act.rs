//! Activation quantization: every input row is cut into 32-value blocks, each stored as 32
//! signed bytes and a scale, as llama.cpp's `quantize_row_q8_1` / `quantize_row_q8_0` do:
//! `d = amax / 127`, `q = round(x / d)` (ties to even), `d` kept at f16 precision.
//!
//! The scalar and SIMD quantizers produce bit-identical results, so every kernel sees the
//! same activations and kernels can be compared exactly on their integer work.
use half::f16;

use super::{Isa, BLOCK};

/// Values per K-quant super-block (and per Q8_K activation block).
pub const QK_K: usize = 256;

/// What is stored next to each block's scale, and how its bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    /// Q8_1: `s = f16(d · Σq)`, for weights with an offset (Q4_1).
    Q8_1,
    /// Q8_0: `s = Σq` (exact), for Q4_0 (which subtracts 8 from every weight) and Q8_0.
    Q8_0,
    /// Q8_0 stored as `q + 128` (unsigned), for VNNI's unsigned × signed products.
    Q8_0Unsigned,
    /// Q8_K, for the K-quants: 256-value blocks with an f32 scale (`d`, one per 256) and
    /// the exact sum of every 16 quants (`s`, sixteen per 256); see `kquant`.
    Q8K,
}

impl ActKind {
    /// Values per scale.
    pub fn block(self) -> usize {
        match self {
            ActKind::Q8K => QK_K,
            _ => BLOCK,
        }
    }

    /// Values per stored sum.
    fn sum_block(self) -> usize {
        match self {
            ActKind::Q8K => 16,
            _ => BLOCK,
        }
    }
}

/// Quantized activations: `m` rows of `k` values.
#[derive(Clone, Debug)]
pub struct Acts {
    kind: ActKind,
    m: usize,
    k: usize,
    /// `m · k` quantized values (`i8`, or `q + 128` for [`ActKind::Q8_0Unsigned`]).
    qs: Vec<u8>,
    /// `m · k / 32` block scales, rounded to f16 precision.
    d: Vec<f32>,
    /// `m · k / 32` per-block sums (see [`ActKind`]).
    s: Vec<f32>,
}

impl Acts {
    /// An empty buffer, to be filled by [`Acts::quantize_into`].
    pub fn new(kind: ActKind) -> Self {
        Self {
            kind,
            m: 0,
            k: 0,
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
        }
    }

    /// Quantizes `x` (`m` rows of `k` values, `k` a multiple of 32).
    pub fn quantize(kind: ActKind, x: &[f32], m: usize, k: usize, isa: Isa) -> Self {
        let mut a = Self::new(kind);
        a.quantize_into(x, m, k, isa);
        a
    }

    /// Quantizes `x` into this buffer, reusing its allocations. Rows are quantized each on
    /// their own, so a batch's rows go across the pool when there are enough of them: on a
    /// batched step this was the largest piece of serial work left between the products.
    pub fn quantize_into(&mut self, x: &[f32], m: usize, k: usize, isa: Isa) {
        let qk = self.kind.block();
        assert!(k.is_multiple_of(qk), "k = {k} is not a multiple of {qk}");
        assert_eq!(x.len(), m * k, "activations are not {m} × {k}");
        #[cfg(target_arch = "x86_64")]
        let simd = matches!(isa, Isa::Avx2 | Isa::Avx512);
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        if simd {
            assert!(isa.is_supported(), "{isa:?} is not supported by this CPU");
        }
        let (nd, ns) = (k / qk, k / self.kind.sum_block());
        self.m = m;
        self.k = k;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nd, 0.0);
        self.s.resize(m * ns, 0.0);
        let kind = self.kind;
        if m < 2 || m * k < QUANTIZE_PARALLEL_MIN {
            quantize_rows(kind, simd, x, &mut self.qs, &mut self.d, &mut self.s);
            return;
        }
        let rows: Vec<std::sync::Mutex<RowParts<'_>>> = self
            .qs
            .chunks_exact_mut(k)
            .zip(self.d.chunks_exact_mut(nd))
            .zip(self.s.chunks_exact_mut(ns))
            .map(|((q, d), s)| std::sync::Mutex::new((q, d, s)))
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(m, |range| {
            for t in range {
                let mut row = rows[t].lock().expect("each row runs once");
                let (q, d, s) = &mut *row;
                quantize_rows(kind, simd, &x[t * k..][..k], q, d, s);
            }
        });
    }

    pub fn kind(&self) -> ActKind {
        self.kind
    }

    /// Rows.
    pub fn m(&self) -> usize {
        self.m
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The quantized values of row `t`.
    pub fn qs_row(&self, t: usize) -> &[u8] {
        &self.qs[t * self.k..(t + 1) * self.k]
    }

    /// The block scales of row `t`.
    pub fn d_row(&self, t: usize) -> &[f32] {
        let nb = self.k / self.kind.block();
        &self.d[t * nb..(t + 1) * nb]
    }

    /// The block sums of row `t`.
    pub fn s_row(&self, t: usize) -> &[f32] {
        let nb = self.k / self.kind.sum_block();
        &self.s[t * nb..(t + 1) * nb]
    }
}

/// One row's quants, scales and sums, handed to one pool worker.
type RowParts<'a> = (&'a mut [u8], &'a mut [f32], &'a mut [f32]);

/// Values a quantization must have for its rows to go across the pool: below this, waking
/// the pool costs about what the work does.
const QUANTIZE_PARALLEL_MIN: usize = 4096;

/// Quantizes whole rows: `x` into `qs` with their block scales `d` and sums `s` (as
/// [`Acts`] lays them out), with the AVX2 quantizer when `simd`.
fn quantize_rows(
    kind: ActKind,
    simd: bool,
    x: &[f32],
    qs: &mut [u8],
    d: &mut [f32],
    s: &mut [f32],
) {
    if kind == ActKind::Q8K {
        let blocks = x
            .chunks_exact(QK_K)
            .zip(qs.chunks_exact_mut(QK_K))
            .zip(d.iter_mut().zip(s.chunks_exact_mut(16)));
        for ((xb, qb), (d, s)) in blocks {
            *d = quantize_q8k(xb, qb, s);
        }
        return;
    }
    let blocks = x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut().zip(s.iter_mut()));
    for ((xb, qb), (d, s)) in blocks {
        let xb: &[f32; BLOCK] = xb.try_into().expect("block of 32");
        let qb: &mut [u8; BLOCK] = qb.try_into().expect("block of 32");
        #[cfg(target_arch = "x86_64")]
        let (dd, ss) = if simd {
            // SAFETY: `simd` means AVX2 or AVX-512, both of which include AVX2, and the
            // caller checked that the CPU supports it.
            unsafe { quantize_block_avx2(kind, xb, qb) }
        } else {
            quantize_block(kind, xb, qb)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (dd, ss) = {
            let _ = simd;
            quantize_block(kind, xb, qb)
        };
        *d = dd;
        *s = ss;
    }
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The scale, inverse scale and stored sum of a block, shared by both quantizers.
fn scales(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

fn finish(kind: ActKind, d: f32, sum: i32) -> (f32, f32) {
    let s = match kind {
        ActKind::Q8_1 => round_f16(d * sum as f32),
        ActKind::Q8_0 | ActKind::Q8_0Unsigned | ActKind::Q8K => sum as f32,
    };
    (round_f16(d), s)
}

/// Portable quantizer of one block: returns (scale, sum).
pub(crate) fn quantize_block(kind: ActKind, x: &[f32; BLOCK], q: &mut [u8; BLOCK]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (d, id) = scales(amax);
    let mut sum = 0i32;
    for (q, &x) in q.iter_mut().zip(x) {
        let v = ((x * id).round_ties_even() as i32).clamp(-128, 127);
        sum += v;
        *q = match kind {
            ActKind::Q8_0Unsigned => (v + 128) as u8,
            _ => v as i8 as u8,
        };
    }
    finish(kind, d, sum)
}

/// AVX2 quantizer of one block, bit-identical to [`quantize_block`] for finite inputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(kind: ActKind, x: &[f32; BLOCK], q: &mut [u8; BLOCK]) -> (f32, f32) {
    use std::arch::x86_64::*;
    // SAFETY: `x` holds 32 f32 (four unaligned 8-lane loads) and `q` 32 bytes (one unaligned
    // 32-byte store); the intrinsics need AVX2, which this function's callers guarantee.
    unsafe {
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let amax = _mm_cvtss_f32(m);
        let (d, id) = scales(amax);
        let idv = _mm256_set1_ps(id);
        let i = v.map(|v| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v, idv)))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0b01>(sum));
        let sum = _mm_cvtsi128_si32(sum);
        // Narrow i32 → i16 → i8; packs interleave 128-bit lanes, the permute undoes it.
        let w = _mm256_packs_epi32(i[0], i[1]);
        let z = _mm256_packs_epi32(i[2], i[3]);
        let b = _mm256_packs_epi16(w, z);
        let mut b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        if kind == ActKind::Q8_0Unsigned {
            b = _mm256_xor_si256(b, _mm256_set1_epi8(-128));
        }
        _mm256_storeu_si256(q.as_mut_ptr().cast(), b);
        finish(kind, d, sum)
    }
}

/// Pointers to the quantized values, scales and sums of tokens `t0 .. t0 + T` (what the SIMD
/// kernels read through).
#[cfg(target_arch = "x86_64")]
pub(super) struct TokenPtrs<const T: usize> {
    pub(super) qs: [*const u8; T],
    pub(super) d: [*const f32; T],
    pub(super) s: [*const f32; T],
}

#[cfg(target_arch = "x86_64")]
impl<const T: usize> TokenPtrs<T> {
    pub(super) fn new(acts: &Acts, t0: usize) -> Self {
        Self {
            qs: std::array::from_fn(|t| acts.qs_row(t0 + t).as_ptr()),
            d: std::array::from_fn(|t| acts.d_row(t0 + t).as_ptr()),
            s: std::array::from_fn(|t| acts.s_row(t0 + t).as_ptr()),
        }
    }

    /// Token `t`'s sixteen 16-value sums and its scale for super-block `sb` (Q8_K).
    ///
    /// # Safety
    /// `t < T`, and super-block `sb` exists in the activations this was made from.
    #[inline(always)]
    pub(super) unsafe fn block(&self, t: usize, sb: usize) -> (&[f32], f32) {
        // SAFETY: the caller guarantees super-block `sb` of token `t` exists: 16 sums at
        // `sb · 16` and one scale at `sb`.
        unsafe {
            (
                std::slice::from_raw_parts(self.s[t].add(sb * 16), 16),
                *self.d[t].add(sb),
            )
        }
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

#[cfg(test)]
mod q8k_tests {
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

#[cfg(test)]
mod pool_tests {
    use super::*;

    /// Rows quantized across the pool (a batch past the threshold) have the bits of each row
    /// quantized alone, for every encoding and instruction set.
    #[test]
    fn rows_across_the_pool_equal_rows_alone() {
        let (m, k) = (9, 2 * QK_K);
        assert!(m * k >= QUANTIZE_PARALLEL_MIN, "the batch takes the pool");
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 97.0 - 5.0) * (1 + i % 5) as f32)
            .collect();
        for kind in [
            ActKind::Q8_1,
            ActKind::Q8_0,
            ActKind::Q8_0Unsigned,
            ActKind::Q8K,
        ] {
            for isa in Isa::supported() {
                let all = Acts::quantize(kind, &x, m, k, isa);
                for t in 0..m {
                    let one = Acts::quantize(kind, &x[t * k..][..k], 1, k, isa);
                    let ctx = format!("{kind:?} {isa:?} row {t}");
                    assert_eq!(all.qs_row(t), one.qs_row(0), "{ctx}: quants");
                    assert_eq!(bits(all.d_row(t)), bits(one.d_row(0)), "{ctx}: scales");
                    assert_eq!(bits(all.s_row(t)), bits(one.s_row(0)), "{ctx}: sums");
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
