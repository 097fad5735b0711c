//! Micro-benchmarks of the serving path's fixed costs (issue 5):
//! - taking and releasing the active version (`Registry::lease` + drop), alone and while
//!   another thread swaps the active version as fast as it can;
//! - the swap itself (`Slot::activate`);
//! - choosing one token from SmolLM2-sized logits (greedy, and seeded top-p sampling with a
//!   repetition penalty);
//! - tokenizing a chat prompt and decoding the reply with the real SmolLM2 tokenizer (skipped,
//!   with a message, when `scripts/fetch-models.sh` has not been run).
//!
//! `cargo bench --bench serving`. Tiny random-weight versions stand in for the lease and swap
//! benchmarks: their cost does not depend on the weights.
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use swapd::device::Device;
use swapd::manifest::Manifest;
use swapd::model::sampling::{Sampler, SamplingParams};
use swapd::model::{self, synth, ModelKind, ModelVersion};
use swapd::registry::Registry;

/// Two versions of a tiny LLM and a registry serving the first.
fn tiny_registry(dir: &Path) -> (Arc<Registry>, [Arc<ModelVersion>; 2]) {
    let load = |seed: u64| {
        let path = dir.join(format!("v{seed}.gguf"));
        synth::write_tiny_llama_gguf(
            &path,
            &synth::TinyLlm {
                seed,
                ..Default::default()
            },
        )
        .unwrap();
        let sha = model::verify::sha256_file(&path).unwrap().0;
        let manifest = format!(
            "[[model]]\nname = \"tiny\"\nkind = \"llm\"\nsource = \"v{seed}.gguf\"\n[model.sha256]\n\"v{seed}.gguf\" = \"{sha}\"\n[model.defaults]\ncontext_length = 64\n"
        );
        let spec = Manifest::parse(&dir.join("models.toml"), &manifest)
            .unwrap()
            .models
            .remove(0);
        let files = vec![(format!("v{seed}.gguf"), path)];
        let v = model::load_version(&spec, files, &Device::cpu(), seed).unwrap();
        (spec, Arc::new(v))
    };
    let (spec, a) = load(1);
    let (_, b) = load(2);
    let registry = Arc::new(Registry::default());
    registry.slot_for(&spec).activate(a.clone());
    (registry, [a, b])
}

fn lease_and_swap(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (registry, [a, b]) = tiny_registry(dir.path());
    let mut g = c.benchmark_group("lease");
    g.bench_function("lease_and_release", |bench| {
        bench.iter(|| drop(registry.lease("tiny", ModelKind::Llm, "bench").unwrap()))
    });
    // Another thread swaps the active version back and forth without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (registry, stop, a, b) = (registry.clone(), stop.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let slot = registry.slot("tiny").unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                slot.activate(if n.is_multiple_of(2) {
                    b.clone()
                } else {
                    a.clone()
                });
                n += 1;
            }
            n
        })
    };
    g.bench_function("lease_and_release_during_swaps", |bench| {
        bench.iter(|| drop(registry.lease("tiny", ModelKind::Llm, "bench").unwrap()))
    });
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    println!("(the swapping thread made {swaps} swaps meanwhile)");
    g.finish();

    let slot = registry.slot("tiny").unwrap();
    let mut n = 0u64;
    c.bench_function("swap/activate", |bench| {
        bench.iter(|| {
            n += 1;
            slot.activate(if n.is_multiple_of(2) {
                a.clone()
            } else {
                b.clone()
            })
        })
    });
}

fn sampling(c: &mut Criterion) {
    // SmolLM2's vocabulary: 49152 logits.
    let vocab = 49152;
    let values: Vec<f32> = (0..vocab).map(|i| (i as f32 * 0.618).sin() * 8.0).collect();
    let logits = Tensor::from_vec(values, vocab, &candle_core::Device::Cpu).unwrap();
    let history: Vec<u32> = (0..64).map(|i| (i * 97) % vocab as u32).collect();
    let mut g = c.benchmark_group("sample_one_token");
    for (name, temperature, top_p, penalty) in [
        ("greedy", 0.0, 1.0, 1.0),
        ("top_p_0.9_t0.2_rep1.1", 0.2, 0.9, 1.1),
    ] {
        let params = SamplingParams {
            temperature,
            top_p,
            top_k: 0,
            repetition_penalty: penalty,
            repetition_last_n: 64,
            seed: 7,
        };
        g.bench_function(name, |bench| {
            bench.iter_batched(
                || Sampler::new(&params),
                |mut s| s.sample(&logits, &history).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    // Side by side: candle's own sampler on the same penalized logits (it sorts the whole
    // vocabulary for top-p; swapd's Sampler sorts only the nucleus's candidates).
    let penalized =
        candle_transformers::utils::apply_repeat_penalty(&logits, 1.1, &history).unwrap();
    g.bench_function("top_p_0.9_t0.2_candle_logits_processor", |bench| {
        bench.iter_batched(
            || {
                candle_transformers::generation::LogitsProcessor::from_sampling(
                    7,
                    candle_transformers::generation::Sampling::TopP {
                        p: 0.9,
                        temperature: 0.2,
                    },
                )
            },
            |mut s| s.sample(&penalized).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn tokenizer(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!("tokenizer benchmarks skipped: run scripts/fetch-models.sh first");
        return;
    }
    let llm = swapd::model::Llm::load("smollm2", &path, &candle_core::Device::Cpu, 2048).unwrap();
    let messages = vec![
        swapd::model::chat::ChatMessage {
            role: "system".into(),
            content: "You are a concise assistant. Answer in one paragraph.".into(),
        },
        swapd::model::chat::ChatMessage {
            role: "user".into(),
            content: "Explain how a model server can replace the model it serves without \
                      dropping a request, and what it must measure while doing so."
                .into(),
        },
    ];
    let prompt = llm.render_chat(&messages).unwrap();
    let ids = llm.tokenizer.encode(&prompt).unwrap();
    println!("chat prompt: {} bytes, {} tokens", prompt.len(), ids.len());
    let mut g = c.benchmark_group("tokenizer");
    g.bench_function("render_and_encode_chat", |bench| {
        bench.iter(|| {
            let p = llm.render_chat(&messages).unwrap();
            llm.tokenizer.encode(&p).unwrap()
        })
    });
    g.bench_function("decode", |bench| bench.iter(|| llm.tokenizer.decode(&ids)));
    g.finish();
}

criterion_group!(benches, lease_and_swap, sampling, tokenizer);
criterion_main!(benches);
