//! swapd's llama forward (`model::qllama`, on the `quant` kernels) against candle-transformers'
//! `quantized_llama` on the real SmolLM2 GGUF: same greedy continuation as llama.cpp for the
//! fixture prompts, and logits close to candle's.
use std::path::PathBuf;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use serde::Deserialize;

const GGUF: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Deserialize)]
struct LlamaCppRef {
    id: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(GGUF)
}

fn logits_ours(m: &mut swapd::model::qllama::Sequential, ids: &[u32], pos: usize) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = m.forward(&x, pos).unwrap();
    l.squeeze(0).unwrap().to_vec1().unwrap()
}

fn logits_candle(
    m: &mut candle_transformers::models::quantized_llama::ModelWeights,
    ids: &[u32],
    pos: usize,
) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = m.forward(&x, pos).unwrap();
    l.squeeze(0).unwrap().to_vec1().unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// (best, second best) logit gap.
fn margin(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

#[test]
fn greedy_tokens_equal_llama_cpp_and_logits_track_candle() {
    let path = gguf();
    if !path.is_file() {
        panic!("{} is missing: run scripts/fetch-models.sh", path.display());
    }
    let load = || {
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = Content::read(&mut f).unwrap();
        (ct, f)
    };
    let (ct, mut f) = load();
    let ours = swapd::model::qllama::Sequential::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let (ct, mut f) = load();
    let theirs = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    // The weights dequantized to f32 and unquantized activations: what both approximate.
    let exact = {
        let path = path.clone();
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let m = std::thread::spawn(move || {
            let mut f = std::fs::File::open(&path).unwrap();
            let ct = Content::read(&mut f).unwrap();
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                ct,
                &mut f,
                &Device::Cpu,
            )
            .unwrap()
        })
        .join()
        .unwrap();
        std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
        m
    };
    let refs: Vec<LlamaCppRef> =
        serde_json::from_str(include_str!("fixtures/smollm2-llamacpp-reference.json")).unwrap();
    for r in &refs {
        let (mut a, mut b, mut c) = (ours.clone(), theirs.clone(), exact.clone());
        let mut la = logits_ours(&mut a, &r.prompt_ids, 0);
        let mut lb = logits_candle(&mut b, &r.prompt_ids, 0);
        let mut lc = logits_candle(&mut c, &r.prompt_ids, 0);
        for (step, &want) in r.greedy_ids.iter().take(8).enumerate() {
            let pos = r.prompt_ids.len() + step;
            let diff = la
                .iter()
                .zip(&lb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let dist = |v: &[f32]| {
                v.iter()
                    .zip(&lc)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            eprintln!(
                "   exact {} (margin {:.3}); max |Δ| to exact: ours {:.3}, candle {:.3}",
                argmax(&lc),
                margin(&lc),
                dist(&la),
                dist(&lb)
            );
            eprintln!(
                "{} step {step}: llama.cpp {want}, ours {} (margin {:.3}), candle {} (margin {:.3}), max |Δlogit| {diff:.3}",
                r.id,
                argmax(&la),
                margin(&la),
                argmax(&lb),
                margin(&lb)
            );
            assert_eq!(argmax(&la), want, "{} step {step}", r.id);
            // Quantization moves logits by well under 1 here; a broken kernel moves them a lot.
            assert!(
                dist(&la) < 2.0,
                "{} step {step}: logits far from exact",
                r.id
            );
            la = logits_ours(&mut a, &[want], pos);
            lb = logits_candle(&mut b, &[want], pos);
            lc = logits_candle(&mut c, &[want], pos);
        }
    }
}
