//! Property tests of the quantized matmul kernels (`swapd::quant`): every kernel the CPU
//! supports (scalar, AVX2, AVX-512), called explicitly, on random GGUF blocks and random
//! activations of many shapes — `k` any multiple of the 32-value block (not only of the SIMD
//! width), rows and tokens not multiples of the 8/16-row × 4-token tile — against
//! 1. a float64 product of the dequantized weights and the quantized activations, which the
//!    kernels compute up to f32 rounding (a tight bound);
//! 2. a float64 product of the dequantized weights and the original activations, within the
//!    error activation quantization can cause (derived per output below);
//! 3. candle's own `QMatMul` on the same bytes;
//! 4. the scalar kernel (same quantized activations, so only summation order differs).
use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapd::quant::{dequantize, Acts, Format, Isa, PackedMatrix, QLinear};

const FORMATS: [Format; 5] = [
    Format::Q4_1,
    Format::Q5_1,
    Format::Q4_0,
    Format::Q5_0,
    Format::Q8_0,
];

/// Random GGUF bytes for an `n × k` matrix: random scales (and mins), random quants over
/// their whole range.
fn random_weights(rng: &mut StdRng, format: Format, n: usize, k: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(n * k / 32 * format.block_bytes());
    for _ in 0..n * k / 32 {
        let d = f16::from_f32(rng.random_range(0.0005f32..0.05));
        raw.extend_from_slice(&d.to_le_bytes());
        match format {
            Format::Q4_1 | Format::Q5_1 => {
                let m = f16::from_f32(rng.random_range(-0.4f32..0.1));
                raw.extend_from_slice(&m.to_le_bytes());
                let qh = if format == Format::Q5_1 { 4 } else { 0 };
                raw.extend((0..qh + 16).map(|_| rng.random::<u8>()));
            }
            Format::Q4_0 => raw.extend((0..16).map(|_| rng.random::<u8>())),
            Format::Q5_0 => raw.extend((0..20).map(|_| rng.random::<u8>())),
            Format::Q8_0 => raw.extend((0..32).map(|_| rng.random::<u8>())),
            Format::Q4K | Format::Q5K | Format::Q6K => unreachable!("see random_k_weights"),
        }
    }
    raw
}

/// Random activations: rows of different magnitudes, some all-zero blocks, a few outliers.
fn random_acts(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * k);
    for _ in 0..m {
        let scale = 10f32.powf(rng.random_range(-2.0f32..1.5));
        for b in 0..k / 32 {
            let zero_block = rng.random_bool(0.05) && b % 3 == 1;
            for _ in 0..32 {
                let v = if zero_block {
                    0.0
                } else if rng.random_bool(0.01) {
                    scale * rng.random_range(-20.0f32..20.0)
                } else {
                    scale * rng.random_range(-1.0f32..1.0)
                };
                x.push(v);
            }
        }
    }
    x
}

/// The GGUF block values as f64 (scales are f16, so this is exact).
fn dequant_f64(format: Format, raw: &[u8], n: usize, k: usize) -> Vec<f64> {
    let bb = format.block_bytes();
    let f = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f64();
    let mut out = Vec::with_capacity(n * k);
    for blk in raw.chunks_exact(bb) {
        let d = f(blk, 0);
        match format {
            Format::Q4_1 | Format::Q4_0 => {
                let (m, qs) = match format {
                    Format::Q4_1 => (f(blk, 2), &blk[4..20]),
                    _ => (-8.0 * d, &blk[2..18]),
                };
                out.extend(qs.iter().map(|&q| d * (q & 15) as f64 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f64 + m));
            }
            Format::Q5_1 | Format::Q5_0 => {
                // ggml's dequantize_row_q5_{0,1}: bit j of qh is value j's fifth bit.
                let (m, qh, qs) = match format {
                    Format::Q5_1 => (f(blk, 2), &blk[4..8], &blk[8..24]),
                    _ => (-16.0 * d, &blk[2..6], &blk[6..22]),
                };
                let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                for j in 0..32 {
                    let nib = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
                    let q = nib as u32 | (((qh >> j) & 1) << 4);
                    out.push(d * q as f64 + m);
                }
            }
            Format::Q8_0 => out.extend(blk[2..34].iter().map(|&q| d * q as i8 as f64)),
            Format::Q4K | Format::Q5K | Format::Q6K => unreachable!("see dequant_k_f64"),
        }
    }
    out
}

/// Per-block offsets `m` of a Q4_1 or Q5_1 matrix (0 for the other formats).
fn mins_f64(format: Format, raw: &[u8]) -> Vec<f64> {
    let bb = format.block_bytes();
    raw.chunks_exact(bb)
        .map(|b| match format {
            Format::Q4_1 | Format::Q5_1 => f16::from_le_bytes([b[2], b[3]]).to_f64(),
            _ => 0.0,
        })
        .collect()
}

fn candle_qtensor(format: Format, raw: &[u8], n: usize, k: usize) -> QTensor {
    let storage = QStorage::from_data(Cow::Borrowed(raw), &Device::Cpu, format.ggml()).unwrap();
    QTensor::new(storage, (n, k)).unwrap()
}

struct Case {
    format: Format,
    n: usize,
    k: usize,
    m: usize,
    raw: Vec<u8>,
    x: Vec<f32>,
}

impl Case {
    fn random(rng: &mut StdRng, format: Format) -> Self {
        let k = 32 * [1, 2, 3, 5, 7, 18, 31, 48][rng.random_range(0..8)];
        let n = [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100][rng.random_range(0..12)];
        let m = [1, 1, 2, 3, 4, 5, 7, 9, 13][rng.random_range(0..9)];
        let raw = random_weights(rng, format, n, k);
        let x = random_acts(rng, m, k);
        Self {
            format,
            n,
            k,
            m,
            raw,
            x,
        }
    }

    fn label(&self) -> String {
        format!("{:?} n={} k={} m={}", self.format, self.n, self.k, self.m)
    }
}

/// The exact product of the dequantized weights and the *quantized* activations `acts`
/// (with Q4_1's offset term taken against the stored block sums, as the kernels do), and a
/// bound on f32 rounding: a few ulps of the sum of absolute block terms.
fn quantized_reference(case: &Case, acts: &Acts) -> (Vec<f64>, Vec<f64>) {
    let (n, k, m) = (case.n, case.k, case.m);
    let nb = k / 32;
    let w = dequant_f64(case.format, &case.raw, n, k);
    let mins = mins_f64(case.format, &case.raw);
    let mut y = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for t in 0..m {
        let qs = acts.qs_row(t);
        let d = acts.d_row(t);
        let s = acts.s_row(t);
        let unsigned = acts.kind() == swapd::quant::ActKind::Q8_0Unsigned;
        for r in 0..n {
            let (mut acc, mut mag) = (0f64, 0f64);
            for b in 0..nb {
                let mut blk = 0f64;
                for i in 0..32 {
                    let q = if unsigned {
                        qs[b * 32 + i] as i32 - 128
                    } else {
                        qs[b * 32 + i] as i8 as i32
                    };
                    // The Q4_1 offset is applied through the stored sum below.
                    blk += (w[r * k + b * 32 + i] - mins[r * nb + b]) * q as f64;
                }
                let term = blk * d[b] as f64 + mins[r * nb + b] * s[b] as f64;
                acc += term;
                mag += (blk * d[b] as f64).abs() + (mins[r * nb + b] * s[b] as f64).abs();
            }
            y[t * n + r] = acc;
            tol[t * n + r] = 4.0 * nb as f64 * f32::EPSILON as f64 * mag + 1e-30;
        }
    }
    (y, tol)
}

/// The exact product with the original activations, and how far quantizing them can move
/// each output. Per element `|D·q − x| ≤ d/2 + 127·|D − d| ≤ d·(1/2 + 127·2⁻¹¹) ≈ 0.5620·d`,
/// where `d = amax/127` and `D = f16(d)` (relative error ≤ 2⁻¹¹), plus a hair for f32
/// rounding of `x/d`: a block adds at most `0.5635·d·Σ|w − m|`. Q4_1's offset term `m·s`
/// stands for `m·Σx`, and `|s − Σx| ≤ |s − d·Σq| + Σ|d·q − x| ≤ 2⁻¹¹·4064·d + 16·d < 18·d`;
/// 20·d leaves room for candle, which rounds `Σq` and the product to f16. f32 rounding adds
/// a few ulps of `Σ|w·x|`. `window` > 1 takes `d` as the largest over aligned runs of that
/// many blocks: candle quantizes activations per 256 values (Q8_K) for its repacked Q8_0.
fn float_reference(case: &Case, acts: &Acts, window: usize) -> (Vec<f64>, Vec<f64>) {
    let (n, k, m) = (case.n, case.k, case.m);
    let nb = k / 32;
    let w = dequant_f64(case.format, &case.raw, n, k);
    let mins = mins_f64(case.format, &case.raw);
    let mut y = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for t in 0..m {
        let x = &case.x[t * k..(t + 1) * k];
        let d = acts.d_row(t);
        for r in 0..n {
            let (mut acc, mut bound, mut mag) = (0f64, 0f64, 0f64);
            for b in 0..nb {
                let mut wabs = 0f64;
                for i in 0..32 {
                    let wi = w[r * k + b * 32 + i];
                    let xi = x[b * 32 + i] as f64;
                    acc += wi * xi;
                    mag += (wi * xi).abs();
                    wabs += (wi - mins[r * nb + b]).abs();
                }
                let w0 = b / window * window;
                let dmax = d[w0..(w0 + window).min(nb)]
                    .iter()
                    .fold(0f32, |a, &v| a.max(v));
                let db = dmax as f64 * (1.0 + 1.0 / 1024.0);
                bound += 0.5635 * db * wabs;
                bound += mins[r * nb + b].abs() * 20.0 * db;
            }
            y[t * n + r] = acc;
            tol[t * n + r] = bound + 8.0 * nb as f64 * f32::EPSILON as f64 * mag + 1e-12;
        }
    }
    (y, tol)
}

fn check_close(label: &str, what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: {what}: length");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= t,
            "{label}: {what}: output {i}: got {g}, want {w}, error {err:e} > tolerance {t:e}"
        );
    }
}

#[test]
fn activation_quantizers_agree_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(7);
    for kind in [
        swapd::quant::ActKind::Q8_1,
        swapd::quant::ActKind::Q8_0,
        swapd::quant::ActKind::Q8_0Unsigned,
    ] {
        for _ in 0..20 {
            let (m, k) = (rng.random_range(1..6), 32 * rng.random_range(1..40));
            let x = random_acts(&mut rng, m, k);
            let reference = Acts::quantize(kind, &x, m, k, Isa::Scalar);
            for isa in Isa::supported() {
                let a = Acts::quantize(kind, &x, m, k, isa);
                for t in 0..m {
                    assert_eq!(a.qs_row(t), reference.qs_row(t), "{kind:?} {isa:?} qs");
                    assert_eq!(a.d_row(t), reference.d_row(t), "{kind:?} {isa:?} d");
                    assert_eq!(a.s_row(t), reference.s_row(t), "{kind:?} {isa:?} s");
                }
            }
        }
    }
}

#[test]
fn every_kernel_matches_float64_references_and_candle() {
    let isas = Isa::supported();
    eprintln!("instruction sets tested: {isas:?}");
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for format in FORMATS {
        for _ in 0..40 {
            let case = Case::random(&mut rng, format);
            let label = case.label();
            // candle's vec dots require an even number of blocks per row (debug-asserted).
            let candle_ok = (case.k / 32).is_multiple_of(2);
            let candle = if !candle_ok {
                Vec::new()
            } else {
                let q = candle_qtensor(format, &case.raw, case.n, case.k);
                let x = Tensor::from_slice(&case.x, (case.m, case.k), &Device::Cpu).unwrap();
                QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let mut scalar_out: Option<Vec<f32>> = None;
            for &isa in &isas {
                let label = format!("{label} {isa:?}");
                let w = PackedMatrix::pack(format, &case.raw, case.n, case.k, isa).unwrap();
                let acts = Acts::quantize(w.act_kind(), &case.x, case.m, case.k, isa);
                let got = w.matmul_quantized(&acts);
                assert_eq!(got, w.matmul(&case.x, case.m), "{label}: matmul");

                let (want, tol) = quantized_reference(&case, &acts);
                check_close(&label, "quantized-activation reference", &got, &want, &tol);

                let (want, tol) = float_reference(&case, &acts, 1);
                check_close(&label, "float64 reference", &got, &want, &tol);
                // candle's result obeys the same kind of bound around the exact product.
                let window = if format == Format::Q8_0 && case.k.is_multiple_of(256) {
                    8
                } else {
                    1
                };
                if candle_ok {
                    let (_, candle_tol) = float_reference(&case, &acts, window);
                    check_close(&label, "candle vs float64", &candle, &want, &candle_tol);
                    let both: Vec<f64> = tol.iter().zip(&candle_tol).map(|(a, b)| a + b).collect();
                    let candle64: Vec<f64> = candle.iter().map(|&v| v as f64).collect();
                    check_close(&label, "candle QMatMul", &got, &candle64, &both);
                }

                match &scalar_out {
                    None => scalar_out = Some(got),
                    Some(s) => {
                        let (_, tol) = quantized_reference(&case, &acts);
                        let s64: Vec<f64> = s.iter().map(|&v| v as f64).collect();
                        let tol2: Vec<f64> = tol.iter().map(|t| 2.0 * t).collect();
                        check_close(&label, "scalar kernel", &got, &s64, &tol2);
                    }
                }
            }
        }
    }
}

#[test]
fn large_products_split_across_threads_match_one_thread() {
    // Big enough to go through the pool, with rows not a multiple of any group size.
    let mut rng = StdRng::seed_from_u64(99);
    for format in FORMATS {
        let (n, k, m) = (1000, 576, 19);
        let raw = random_weights(&mut rng, format, n, k);
        let x = random_acts(&mut rng, m, k);
        for isa in Isa::supported() {
            let w = PackedMatrix::pack(format, &raw, n, k, isa).unwrap();
            let acts = Acts::quantize(w.act_kind(), &x, m, k, isa);
            let all = w.matmul_quantized(&acts);
            // Row by row and token by token, each a product too small to be split.
            for t in [0, 7, 18] {
                let one = Acts::quantize(w.act_kind(), &x[t * k..(t + 1) * k], 1, k, isa);
                let row = w.matmul_quantized(&one);
                assert_eq!(row, all[t * n..(t + 1) * n], "{format:?} {isa:?} token {t}");
            }
        }
    }
}

#[test]
fn dequantize_matches_candle() {
    let mut rng = StdRng::seed_from_u64(3);
    for format in FORMATS {
        let (n, k) = (5, 96);
        let raw = random_weights(&mut rng, format, n, k);
        let ours = dequantize(format, &raw, n, k);
        let theirs = candle_qtensor(format, &raw, n, k)
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ours, theirs, "{format:?}");
    }
}

/// Every row of `raw` packed for `isa` reads back as the dequantized GGUF row, bit for bit.
fn assert_rows_dequantize(isa: Isa, format: Format, raw: &[u8], n: usize, k: usize) {
    let want = dequantize(format, raw, n, k);
    let packed = PackedMatrix::pack(format, raw, n, k, isa).unwrap();
    let mut row = vec![f32::NAN; k];
    for i in 0..n {
        packed.row_into(i, &mut row);
        assert_eq!(
            row,
            want[i * k..(i + 1) * k],
            "{isa:?} {format:?} {n}×{k} row {i}"
        );
    }
}

#[test]
fn packed_rows_dequantize_to_the_gguf_values() {
    // The embedding lookup reads rows straight from a packed matrix: each must equal the
    // dequantized GGUF row bit for bit, for every layout (rows per group differ by ISA) and
    // for rows in a last, partial group.
    let mut rng = StdRng::seed_from_u64(5);
    for isa in Isa::supported() {
        for format in FORMATS {
            for (n, k) in [(1, 32), (7, 64), (17, 96), (37, 160)] {
                let raw = random_weights(&mut rng, format, n, k);
                assert_rows_dequantize(isa, format, &raw, n, k);
            }
        }
    }
}

#[test]
fn packed_k_quant_rows_dequantize_to_the_gguf_values() {
    // As above for the K-quants, whose AVX-512 Q4_K and Q6_K matrices are 16-row tiles.
    let mut rng = StdRng::seed_from_u64(6);
    for isa in Isa::supported() {
        for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
            for (n, k) in [(1, 256), (17, 512), (33, 768)] {
                let raw = random_k_weights(&mut rng, format, n, k);
                assert_rows_dequantize(isa, format, &raw, n, k);
            }
        }
    }
}

#[test]
fn qlinear_forward_shapes_fallback_and_forward_many() {
    let mut rng = StdRng::seed_from_u64(11);
    let (k, m) = (96, 5);
    let x = random_acts(&mut rng, m, k);
    let xt = Tensor::from_slice(&x, (1, m, k), &Device::Cpu).unwrap();
    for isa in Isa::supported() {
        let layers: Vec<(QLinear, PackedMatrix)> = [(Format::Q4_1, 24), (Format::Q8_0, 9)]
            .into_iter()
            .map(|(format, n)| {
                let raw = random_weights(&mut rng, format, n, k);
                let q = candle_qtensor(format, &raw, n, k);
                let l = QLinear::from_qtensor_with_isa(q, isa).unwrap();
                assert!(l.is_native());
                (l, PackedMatrix::pack(format, &raw, n, k, isa).unwrap())
            })
            .collect();
        let refs: Vec<&QLinear> = layers.iter().map(|(l, _)| l).collect();
        let many = QLinear::forward_many(&refs, &xt).unwrap();
        for ((l, p), y) in layers.iter().zip(&many) {
            assert_eq!(y.dims(), &[1, m, p.n()]);
            let want = p.matmul(&x, m);
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(y, want, "{isa:?} forward_many");
            let single = l.forward(&xt).unwrap();
            let single = single.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(single, want, "{isa:?} forward");
        }
    }
    // Formats without a kernel here (Q2_K) go to candle's QMatMul, unchanged.
    let w = Tensor::from_slice(&random_acts(&mut rng, 8, 256), (8, 256), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q2K).unwrap();
    let x = Tensor::from_slice(&random_acts(&mut rng, 2, 256), (2, 256), &Device::Cpu).unwrap();
    let l = QLinear::from_qtensor(QTensor::quantize(&w, GgmlDType::Q2K).unwrap()).unwrap();
    assert!(!l.is_native());
    let want = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
    let got = l.forward(&x).unwrap();
    assert_eq!(
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap()
    );
}

/// Q5_0's values `q − 16` fit a signed byte, so a Q5_0 matrix is also a Q8_0 matrix with
/// the same scales; both kernels' integer sums are exact, so the Q5_0 kernel must give the
/// Q8_0 kernel's bits on every instruction set (the path Q5_0 ran on before it had its own).
#[test]
fn q5_0_gives_the_bits_of_the_same_values_in_q8_0() {
    let mut rng = StdRng::seed_from_u64(5);
    for isa in Isa::supported() {
        for (n, k, m) in [(9, 96, 1), (33, 640, 5), (16, 32, 9)] {
            let raw = random_weights(&mut rng, Format::Q5_0, n, k);
            let mut wide = Vec::with_capacity(raw.len() / 22 * 34);
            for b in raw.chunks_exact(22) {
                wide.extend_from_slice(&b[0..2]);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                wide.extend((0..32).map(|j| {
                    let nib = if j < 16 {
                        b[6 + j] & 15
                    } else {
                        b[6 + j - 16] >> 4
                    };
                    ((nib | ((((qh >> j) & 1) as u8) << 4)) as i8 - 16) as u8
                }));
            }
            assert_eq!(
                dequantize(Format::Q5_0, &raw, n, k),
                dequantize(Format::Q8_0, &wide, n, k)
            );
            let x = random_acts(&mut rng, m, k);
            let ours = PackedMatrix::pack(Format::Q5_0, &raw, n, k, isa).unwrap();
            let q8 = PackedMatrix::pack(Format::Q8_0, &wide, n, k, isa).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(
                bits(ours.matmul(&x, m)),
                bits(q8.matmul(&x, m)),
                "{isa:?} {n}x{k}, {m} tokens"
            );
            assert_eq!(
                ours.storage_bytes(),
                n.div_ceil(isa.rows()) * k / 32 * 22 * isa.rows()
            );
        }
    }
}

/// Batch invariance, the property continuous batching rests on: a row's result is the same
/// bits whether it is multiplied alone or as any row of a batch of up to 16 (every kernel,
/// every format, shapes off the block, SIMD and tile widths), and whatever the other rows
/// hold. A sequence's logits then never depend on what it was batched with.
#[test]
fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
    let mut rng = StdRng::seed_from_u64(0xba7c);
    for isa in Isa::supported() {
        for format in FORMATS {
            for _ in 0..12 {
                let k = 32 * [1, 2, 3, 5, 18, 31][rng.random_range(0..6)];
                let n = [1, 7, 9, 16, 17, 33, 100][rng.random_range(0..7)];
                let b = rng.random_range(1..=16);
                let raw = random_weights(&mut rng, format, n, k);
                let w = PackedMatrix::pack(format, &raw, n, k, isa).unwrap();
                let x = random_acts(&mut rng, b, k);
                let batched = w.matmul(&x, b);
                for (r, row) in x.chunks_exact(k).enumerate() {
                    let alone = w.matmul(row, 1);
                    let label = format!("{isa:?} {format:?} n={n} k={k} batch={b} row={r}");
                    let got: Vec<u32> = batched[r * n..(r + 1) * n]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    let want: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got, want,
                        "{label}: a batched row differs from the row alone"
                    );
                }
            }
        }
    }
}

/// Random GGUF bytes of a K-quant `n × k` matrix: random scales, mins and quants over their
/// whole range.
fn random_k_weights(rng: &mut StdRng, format: Format, n: usize, k: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for _ in 0..n * k / 256 {
        let d = f16::from_f32(rng.random_range(0.00005f32..0.004));
        match format {
            Format::Q4K | Format::Q5K => {
                raw.extend_from_slice(&d.to_le_bytes());
                let dmin = f16::from_f32(rng.random_range(0.0f32..0.004));
                raw.extend_from_slice(&dmin.to_le_bytes());
                let qh = if format == Format::Q5K { 32 } else { 0 };
                raw.extend((0..12 + qh + 128).map(|_| rng.random::<u8>()));
            }
            Format::Q6K => {
                raw.extend((0..128 + 64 + 16).map(|_| rng.random::<u8>()));
                raw.extend_from_slice(&d.to_le_bytes());
            }
            _ => unreachable!(),
        }
    }
    raw
}

/// K-quant values as f64, written from ggml's reference `dequantize_row_q4_K` / `_q5_K` / `_q6_K`
/// (independently of the crate's own dequantizer).
fn dequant_k_f64(format: Format, raw: &[u8]) -> Vec<f64> {
    let f = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f64();
    let mut y = Vec::new();
    match format {
        Format::Q4K | Format::Q5K => {
            let q5 = format == Format::Q5K;
            for b in raw.chunks_exact(if q5 { 176 } else { 144 }) {
                let (d, dmin, s) = (f(b, 0), f(b, 2), &b[4..16]);
                let (qh, q) = if q5 {
                    (&b[16..48], &b[48..176])
                } else {
                    (&b[0..0], &b[16..144])
                };
                // ggml's `u1`/`u2` masks: bits 2j and 2j + 1 of qh[l] add 16.
                let high = |l: usize, bit: usize| -> f64 {
                    if q5 && qh[l] & (1 << bit) != 0 {
                        16.0
                    } else {
                        0.0
                    }
                };
                let scale_min = |j: usize| -> (f64, f64) {
                    if j < 4 {
                        ((s[j] & 63) as f64, (s[j + 4] & 63) as f64)
                    } else {
                        (
                            ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as f64,
                            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as f64,
                        )
                    }
                };
                for j in 0..4 {
                    let (sc1, m1) = scale_min(2 * j);
                    let (sc2, m2) = scale_min(2 * j + 1);
                    let qs = &q[32 * j..32 * j + 32];
                    y.extend(
                        qs.iter().enumerate().map(|(l, &v)| {
                            d * sc1 * ((v & 0xF) as f64 + high(l, 2 * j)) - dmin * m1
                        }),
                    );
                    y.extend(qs.iter().enumerate().map(|(l, &v)| {
                        d * sc2 * ((v >> 4) as f64 + high(l, 2 * j + 1)) - dmin * m2
                    }));
                }
            }
        }
        Format::Q6K => {
            for b in raw.chunks_exact(210) {
                let d = f(b, 208);
                let mut out = [0f64; 256];
                for n in 0..2 {
                    let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |i: usize| sc[i] as i8 as f64;
                        out[128 * n + l] = d * s(is) * q1 as f64;
                        out[128 * n + l + 32] = d * s(is + 2) * q2 as f64;
                        out[128 * n + l + 64] = d * s(is + 4) * q3 as f64;
                        out[128 * n + l + 96] = d * s(is + 6) * q4 as f64;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
        _ => unreachable!(),
    }
    y
}

#[test]
fn k_quant_kernels_match_float64_references_candle_and_each_other_bit_for_bit() {
    let isas = Isa::supported();
    let mut rng = StdRng::seed_from_u64(0x4b);
    for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
        for case_no in 0..30 {
            let k = 256 * [1, 2, 3, 4, 5, 8][rng.random_range(0..6)];
            let n = [1, 3, 7, 8, 9, 15, 17, 33, 70][rng.random_range(0..9)];
            let m = [1, 2, 3, 4, 5, 7, 9][rng.random_range(0..7)];
            let label = format!("{format:?} n={n} k={k} m={m} (case {case_no})");
            let raw = random_k_weights(&mut rng, format, n, k);
            let x = random_acts(&mut rng, m, k);
            let w64 = dequant_k_f64(format, &raw);
            // The crate's dequantizer agrees with ggml's reference exactly.
            let deq = dequantize(format, &raw, n, k);
            for (i, (&a, &b)) in deq.iter().zip(&w64).enumerate() {
                assert!((a as f64 - b).abs() <= b.abs() * 1e-6, "{label}: value {i}");
            }
            let mut first: Option<Vec<f32>> = None;
            for &isa in &isas {
                let w = PackedMatrix::pack(format, &raw, n, k, isa).unwrap();
                let acts = Acts::quantize(w.act_kind(), &x, m, k, isa);
                let got = w.matmul_quantized(&acts);
                let mut tols = vec![0f64; m * n];
                // Against the quantized activations (exact in f64) and the original ones.
                for t in 0..m {
                    let (qs, d) = (acts.qs_row(t), acts.d_row(t));
                    for r in 0..n {
                        let (mut exact, mut mag, mut fl, mut bound) = (0f64, 0f64, 0f64, 0f64);
                        for sb in 0..k / 256 {
                            let mut s = 0f64;
                            let mut wabs = 0f64;
                            for i in 0..256 {
                                let wi = w64[r * k + sb * 256 + i];
                                s += wi * qs[sb * 256 + i] as i8 as f64;
                                fl += wi * x[t * k + sb * 256 + i] as f64;
                                wabs += wi.abs();
                            }
                            exact += s * d[sb] as f64;
                            mag += (s * d[sb] as f64).abs() + wabs * 127.0 * d[sb].abs() as f64;
                            // |d·q − x| ≤ |d|/2 (+ f32 rounding of x·iscale).
                            bound += 0.5001 * d[sb].abs() as f64 * wabs;
                        }
                        let g = got[t * n + r] as f64;
                        let tol = 16.0 * f32::EPSILON as f64 * mag + 1e-30;
                        assert!(
                            (g - exact).abs() <= tol,
                            "{label} {isa:?}: [{t},{r}] {g} vs quantized-activation reference {exact} (tol {tol:e})"
                        );
                        tols[t * n + r] = tol;
                        assert!(
                            (g - fl).abs() <= bound + tol,
                            "{label} {isa:?}: [{t},{r}] {g} vs float64 reference {fl}"
                        );
                    }
                }
                // One token alone gives the bits it gets in the batch.
                let one = Acts::quantize(w.act_kind(), &x[(m - 1) * k..], 1, k, isa);
                assert_eq!(
                    w.matmul_quantized(&one),
                    got[(m - 1) * n..],
                    "{label} {isa:?}"
                );
                match &first {
                    None => first = Some(got),
                    // AVX-512's Q4_K and Q6_K kernels run 16-row tiles and sum each
                    // sub-block in float: the same products in another order, so close.
                    Some(s) if w.is_tiled() => {
                        for (i, (&a, &b)) in got.iter().zip(s).enumerate() {
                            let tol = 2.0 * tols[i];
                            let d = (a - b).abs() as f64;
                            assert!(d <= tol, "{label}: [{i}] {a} vs scalar {b} (tol {tol:e})");
                        }
                    }
                    Some(s) => assert_eq!(&got, s, "{label}: {isa:?} differs from scalar"),
                }
            }
            // candle's own kernels on the same bytes, within the activation bound.
            let q = candle_qtensor(format, &raw, n, k);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            let theirs = QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ours = first.unwrap();
            for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
                let (t, r) = (i / n, i % n);
                let wabs: f64 = w64[r * k..(r + 1) * k].iter().map(|v| v.abs()).sum();
                let amax = x[t * k..(t + 1) * k]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                let tol = 2.0 * 0.51 * (amax as f64 / 127.0) * wabs + 1e-6;
                assert!(
                    ((a - b) as f64).abs() <= tol,
                    "{label}: [{t},{r}] ours {a} vs candle {b} (tol {tol:e})"
                );
            }
        }
    }
}
