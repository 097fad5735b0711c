//! End to end on SmolLM2-135M-Instruct Q4_1, as llama-bench measures: prefill of a
//! 273-token prompt in one forward pass (pp273), and greedy decode of 64 tokens from a
//! one-token prompt (tg64); plus decode of 64 tokens right after the 273-token prompt, where
//! attention over the longer cache costs more. candle-transformers' `quantized_llama`
//! (candle's kernels) and swapd's `model::qllama` (swapd's kernels) alternate in one run, so
//! both see the same machine state; prints tokens/s per round, medians and ratios.
//!
//! `cargo bench --bench decode` — threads: `RAYON_NUM_THREADS` (candle's pool, used by both);
//! rounds: `DECODE_BENCH_ROUNDS` (default 5); `DECODE_BENCH_ONLY=swapd|candle` runs one side
//! alone (for a profiler).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Result, Tensor};

const GGUF: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPT_TOKENS: usize = 273;
const DECODE_TOKENS: usize = 64;

const TEXT: &str = swapd::cli::peers::LONG_PROMPT;

trait Model {
    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor>;
}

impl Model for candle_transformers::models::quantized_llama::ModelWeights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        candle_transformers::models::quantized_llama::ModelWeights::forward(self, x, pos)
    }
}

impl Model for swapd::model::qllama::Sequential {
    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        swapd::model::qllama::Sequential::forward(self, x, pos)
    }
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .squeeze(0)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

/// Tokens/s of one fresh session: (prefill of `prompt`, decode of 64 after it, ids).
fn run(model: &mut dyn Model, prompt: &[u32]) -> (f64, f64, Vec<u32>) {
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let t = Instant::now();
    let logits = model.forward(&x, 0).unwrap();
    let mut next = argmax(&logits);
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let mut ids = vec![next];
    let t = Instant::now();
    for i in 0..DECODE_TOKENS {
        let x = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x, prompt.len() + i).unwrap();
        next = argmax(&logits);
        ids.push(next);
    }
    let decode = DECODE_TOKENS as f64 / t.elapsed().as_secs_f64();
    (prefill, decode, ids)
}

/// (pp273, tg64, decode after the long prompt) tokens/s, and the ids decoded after it.
fn measure(model: &dyn Fn() -> Box<dyn Model>, prompt: &[u32]) -> ([f64; 3], Vec<u32>) {
    let (pp, tg_long, ids) = run(&mut *model(), prompt);
    let (_, tg, _) = run(&mut *model(), &prompt[..1]);
    ([pp, tg, tg_long], ids)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; no other arguments are taken.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(GGUF);
    let rounds: usize = std::env::var("DECODE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let open = || {
        let mut f = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", path.display()));
        let ct = Content::read(&mut f).unwrap();
        (ct, f)
    };
    let (ct, _) = open();
    let tok = swapd::model::tokenizer::GgufTokenizer::from_gguf(&ct).unwrap();
    let mut prompt = Vec::new();
    while prompt.len() < PROMPT_TOKENS {
        prompt.extend(tok.encode(TEXT).unwrap());
    }
    prompt.truncate(PROMPT_TOKENS);

    let (ct, mut f) = open();
    let candle = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let (ct, mut f) = open();
    let ours = swapd::model::qllama::Sequential::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    println!(
        "SmolLM2-135M Q4_1: prefill {PROMPT_TOKENS} tokens in one pass, decode {DECODE_TOKENS}; \
         {} threads; kernels: {:?}",
        candle_core::utils::get_num_threads(),
        swapd::quant::Isa::best()
    );
    let only = std::env::var("DECODE_BENCH_ONLY").ok();
    let candle_model = || Box::new(candle.clone()) as Box<dyn Model>;
    let our_model = || Box::new(ours.clone()) as Box<dyn Model>;
    // Warm up (pool threads, caches, lazily built tables).
    if only.as_deref() != Some("swapd") {
        run(&mut *candle_model(), &prompt[..16]);
    }
    if only.as_deref() != Some("candle") {
        run(&mut *our_model(), &prompt[..16]);
    }
    let show = |v: &[f64; 3]| {
        format!(
            "pp{PROMPT_TOKENS} {:7.1}  tg{DECODE_TOKENS} {:6.1}  tg{DECODE_TOKENS}@{PROMPT_TOKENS} {:6.1}",
            v[0], v[1], v[2]
        )
    };
    if let Some(only) = only {
        // One side alone, e.g. under a profiler.
        for round in 0..rounds {
            let (v, _) = match only.as_str() {
                "candle" => measure(&candle_model, &prompt),
                _ => measure(&our_model, &prompt),
            };
            println!("round {round}: {only} {}", show(&v));
        }
        return;
    }
    let mut results = [[vec![], vec![], vec![]], [vec![], vec![], vec![]]];
    for round in 0..rounds {
        let (c, ids_c) = measure(&candle_model, &prompt);
        let (o, ids_o) = measure(&our_model, &prompt);
        let same = ids_c.iter().zip(&ids_o).take_while(|(a, b)| a == b).count();
        println!(
            "round {round}: candle {} | swapd {} | same first {same} tokens",
            show(&c),
            show(&o)
        );
        for i in 0..3 {
            results[0][i].push(c[i]);
            results[1][i].push(o[i]);
        }
    }
    let names = [
        format!("prefill pp{PROMPT_TOKENS}"),
        format!("decode tg{DECODE_TOKENS}"),
        format!("decode tg{DECODE_TOKENS} after {PROMPT_TOKENS}"),
    ];
    for (i, name) in names.iter().enumerate() {
        let c = median(&mut results[0][i]);
        let o = median(&mut results[1][i]);
        println!(
            "median {name:>22}: candle {c:7.1} tok/s, swapd {o:7.1} tok/s, ×{:.2}",
            o / c
        );
    }
}
