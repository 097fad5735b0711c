//! swapd's quantized matmul (`QLinear`) against candle's `QMatMul` at SmolLM2-135M's real
//! shapes: hidden 576, intermediate 1536, 9 query / 3 key-value heads of 64, vocabulary
//! 49152 (the tied Q8_0 output head); decode (m = 1) and prefill (m = 64, 273) rows; and
//! Gemma 3 270M's Q4_K_M formats at its shapes (Q5_0 gate/up 2048×640, Q4_K attn_output
//! 640×1024, Q6_K ffn_down 640×2048).
//! Both sides take an f32 tensor and return one (activation quantization included).
//! Throughput is in FLOP (2·m·n·k per product): criterion's "elem/s" reads as FLOP/s.
//!
//! `cargo bench --bench qmatmul` (threads: `RAYON_NUM_THREADS`, as candle).
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use swapd::quant::{Isa, QLinear};

fn weights(n: usize, k: usize, dtype: GgmlDType) -> QTensor {
    let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

fn bench(c: &mut Criterion) {
    // (name, n, k, dtype, token counts)
    let shapes: [(&str, usize, usize, GgmlDType, &[usize]); 10] = [
        ("attn_q/o 576x576", 576, 576, GgmlDType::Q4_1, &[1, 64, 273]),
        ("attn_k/v 192x576", 192, 576, GgmlDType::Q4_1, &[1, 64, 273]),
        (
            "ffn_gate/up 1536x576",
            1536,
            576,
            GgmlDType::Q4_1,
            &[1, 64, 273],
        ),
        (
            "ffn_down 576x1536",
            576,
            1536,
            GgmlDType::Q4_1,
            &[1, 64, 273],
        ),
        ("output 49152x576 q8_0", 49152, 576, GgmlDType::Q8_0, &[1]),
        (
            "gemma3 ffn_gate 2048x640 q5_0",
            2048,
            640,
            GgmlDType::Q5_0,
            &[1, 64],
        ),
        (
            "gemma3 attn_output 640x1024 q4_k",
            640,
            1024,
            GgmlDType::Q4K,
            &[1, 64],
        ),
        (
            "ffn_gate/up 1536x576 q5_1 (smollm2 q5_k_m)",
            1536,
            576,
            GgmlDType::Q5_1,
            &[1, 64],
        ),
        (
            "ffn_down 576x1536 q5_k (smollm2 q5_k_m)",
            576,
            1536,
            GgmlDType::Q5K,
            &[1, 64],
        ),
        (
            "gemma3 ffn_down 640x2048 q6_k",
            640,
            2048,
            GgmlDType::Q6K,
            &[1, 64],
        ),
    ];
    let isas: Vec<Isa> = Isa::supported()
        .into_iter()
        .filter(|i| *i != Isa::Scalar)
        .collect();
    for (name, n, k, dtype, ms) in shapes {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(20)
            .warm_up_time(std::time::Duration::from_millis(500))
            .measurement_time(std::time::Duration::from_secs(2));
        let candle = QMatMul::from_qtensor(weights(n, k, dtype)).unwrap();
        let ours: Vec<(Isa, QLinear)> = isas
            .iter()
            .map(|&isa| {
                let l = QLinear::from_qtensor_with_isa(weights(n, k, dtype), isa).unwrap();
                (isa, l)
            })
            .collect();
        for &m in ms {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_with_input(BenchmarkId::new("candle", m), &x, |b, x| {
                b.iter(|| candle.forward(x).unwrap())
            });
            for (isa, l) in &ours {
                let id = BenchmarkId::new(format!("swapd-{isa:?}").to_lowercase(), m);
                group.bench_with_input(id, &x, |b, x| b.iter(|| l.forward(x).unwrap()));
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
