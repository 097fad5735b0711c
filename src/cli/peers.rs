//! `swapd bench decode` and `swapd bench membw`: the measurements the peer comparison
//! (`scripts/bench-peers.sh`) needs from swapd's side, in the same shape as its llama.cpp
//! script prints, so one run can set them side by side.
//!
//! Each round runs two fresh generations, greedy, past end-of-sequence:
//! - `long`: the long prompt, then `decode_tokens` more: prefill tokens/s is prompt tokens ÷
//!   time to the first token, and decode tokens/s after it is tokens ÷ time from the first to
//!   the last token;
//! - `short`: a short prompt, then `decode_tokens` more: plain decode tokens/s (llama-bench's
//!   `tg`).
//!
//! Engines: `server` (a running swapd over gRPC, as a client sees it), `local` (swapd's model
//! code in this process: the same load, session and greedy step the server runs, without the
//! server or gRPC), `candle` (candle-transformers' `quantized_llama` with candle's kernels).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::client::{channel, Conn};
use crate::proto::{self, inference_client::InferenceClient};

/// About 245 tokens of English prose (`benches/data/long-prompt.txt`): the prefill prompt.
pub const LONG_PROMPT: &str = include_str!("../../benches/data/long-prompt.txt");

/// The decode prompt.
pub const SHORT_PROMPT: &str = "Once upon a time";

#[derive(Debug, clap::Args)]
pub struct DecodeBench {
    /// `server` (gRPC to --server), `local` (swapd's model code in-process) or `candle`
    /// (candle-transformers' quantized_llama in-process).
    #[arg(long, default_value = "local")]
    pub engine: String,
    #[command(flatten)]
    pub conn: Conn,
    /// The served model's name (engine `server`).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// The GGUF (engines `local` and `candle`).
    #[arg(
        long,
        default_value = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub gguf: PathBuf,
    /// Tokens decoded after the first one, per generation.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Measured rounds (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Engine `local` only: decode this many sequences in lockstep through the batch step
    /// (each fed the short prompt alone first) instead of the two single-stream generations.
    #[arg(long)]
    pub batch: Option<usize>,
}

/// One generation as timed: when each token arrived, seconds after the request started.
struct Timed {
    prompt_tokens: usize,
    token_times: Vec<f64>,
    ids: Vec<u32>,
}

impl Timed {
    fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.token_times[0]
    }
    fn decode_tok_s(&self) -> f64 {
        let n = self.token_times.len() - 1;
        n as f64 / (self.token_times[n] - self.token_times[0])
    }
}

#[derive(Debug, Serialize)]
pub struct Round {
    pub prefill_tok_s: f64,
    pub decode_after_prompt_tok_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub engine: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub short_prompt_tokens: usize,
    pub decode_tokens: usize,
    /// The first tokens generated after the short prompt (greedy), to check the engines agree.
    pub first_ids: Vec<u32>,
    pub rounds: Vec<Round>,
    pub median: Round,
}

/// A generation engine for the benchmark.
enum Engine {
    Server(InferenceClient<tonic::transport::Channel>, String),
    Local(crate::model::llm::Llm),
    Candle(
        candle_transformers::models::quantized_llama::ModelWeights,
        crate::model::tokenizer::GgufTokenizer,
    ),
}

impl Engine {
    async fn open(b: &DecodeBench) -> Result<Self> {
        Ok(match b.engine.as_str() {
            "server" => Engine::Server(
                InferenceClient::new(channel(&b.conn).await?),
                b.model.clone(),
            ),
            "local" => Engine::Local(
                crate::model::llm::Llm::load(
                    "bench",
                    &b.gguf,
                    &Device::Cpu,
                    crate::model::qllama::MAX_SEQ_LEN,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            "candle" => {
                let (ct, mut f) = read_gguf(&b.gguf)?;
                let tok = crate::model::tokenizer::GgufTokenizer::from_gguf(&ct)
                    .map_err(anyhow::Error::msg)?;
                let w = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                    ct,
                    &mut f,
                    &Device::Cpu,
                )?;
                Engine::Candle(w, tok)
            }
            other => bail!("--engine `{other}`: expected server, local or candle"),
        })
    }

    /// A fresh greedy generation of `1 + n` tokens after `prompt`, ignoring end-of-sequence.
    async fn generate(&mut self, prompt: &str, n: usize) -> Result<Timed> {
        let t = Instant::now();
        let mut token_times = Vec::with_capacity(n + 1);
        let mut ids = Vec::with_capacity(n + 1);
        let prompt_tokens = match self {
            Engine::Server(client, model) => {
                let req = proto::GenerateRequest {
                    model: model.clone(),
                    input: Some(proto::generate_request::Input::Prompt(prompt.into())),
                    sampling: Some(proto::SamplingParams {
                        max_tokens: Some(n as u32 + 1),
                        temperature: Some(0.0),
                        repetition_penalty: Some(1.0),
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    return_token_ids: true,
                };
                let mut stream = client.generate(req).await?.into_inner();
                let mut prompt_tokens = 0;
                while let Some(m) = stream.message().await? {
                    match m.event {
                        Some(proto::generate_response::Event::Delta(d)) => {
                            for id in d.token_ids {
                                token_times.push(t.elapsed().as_secs_f64());
                                ids.push(id);
                            }
                        }
                        Some(proto::generate_response::Event::Finished(f)) => {
                            prompt_tokens = f.prompt_tokens as usize;
                        }
                        _ => {}
                    }
                }
                prompt_tokens
            }
            Engine::Local(llm) => {
                let prompt = llm.tokenizer.encode(prompt).map_err(anyhow::Error::msg)?;
                let mut session = llm.session();
                let mut next = prompt.clone();
                for _ in 0..=n {
                    let logits = session.feed(&next, &mut || true)?.context("no logits")?;
                    let id = logits.argmax(0)?.to_scalar::<u32>()?;
                    token_times.push(t.elapsed().as_secs_f64());
                    ids.push(id);
                    next = vec![id];
                }
                prompt.len()
            }
            Engine::Candle(weights, tok) => {
                let prompt = tok.encode(prompt).map_err(anyhow::Error::msg)?;
                let mut model = weights.clone();
                let mut next = prompt.clone();
                let mut pos = 0;
                for _ in 0..=n {
                    let x = Tensor::new(next.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                    let logits = model.forward(&x, pos)?.squeeze(0)?;
                    pos += next.len();
                    let id = logits.argmax(0)?.to_scalar::<u32>()?;
                    token_times.push(t.elapsed().as_secs_f64());
                    ids.push(id);
                    next = vec![id];
                }
                prompt.len()
            }
        };
        if token_times.len() != n + 1 {
            bail!("{} tokens came back, {} expected", token_times.len(), n + 1);
        }
        Ok(Timed {
            prompt_tokens,
            token_times,
            ids,
        })
    }
}

fn read_gguf(path: &Path) -> Result<(candle_core::quantized::gguf_file::Content, std::fs::File)> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("{} (run scripts/fetch-models.sh)", path.display()))?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((ct, f))
}

/// Bytes of the GGUF's tensors as stored (quantized): what one decode step reads, since every
/// matrix is multiplied once per token (the embedding table too, as the tied output layer).
pub fn quantized_weight_bytes(path: &Path) -> Result<u64> {
    let (ct, _) = read_gguf(path)?;
    Ok(ct
        .tensor_infos
        .values()
        .map(crate::model::llm::stored_bytes)
        .sum())
}

/// What `swapd bench decode` prints: the single-stream report, or with `--batch` the
/// batched one.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum DecodeOutcome {
    Single(DecodeReport),
    Batched(super::batched::BatchedReport),
}

pub async fn decode_bench(b: DecodeBench) -> Result<DecodeOutcome> {
    if b.rounds == 0 || b.decode_tokens == 0 {
        bail!("--rounds and --decode-tokens must be positive");
    }
    let mut engine = Engine::open(&b).await?;
    if let Some(batch) = b.batch {
        let Engine::Local(llm) = &engine else {
            bail!("--batch needs --engine local");
        };
        let report = super::batched::run(llm, SHORT_PROMPT, batch, b.decode_tokens, b.rounds)?;
        return Ok(DecodeOutcome::Batched(report));
    }
    // Warm-up: thread pools, caches, lazily built tables.
    engine.generate(SHORT_PROMPT, 8).await?;
    let (mut rounds, mut prompt_tokens, mut short_tokens, mut first_ids) = (vec![], 0, 0, vec![]);
    for _ in 0..b.rounds {
        let long = engine.generate(LONG_PROMPT, b.decode_tokens).await?;
        let short = engine.generate(SHORT_PROMPT, b.decode_tokens).await?;
        (prompt_tokens, short_tokens) = (long.prompt_tokens, short.prompt_tokens);
        first_ids = short.ids.iter().take(16).copied().collect();
        rounds.push(Round {
            prefill_tok_s: long.prefill_tok_s(),
            decode_after_prompt_tok_s: long.decode_tok_s(),
            decode_tok_s: short.decode_tok_s(),
        });
    }
    let med = |f: fn(&Round) -> f64| {
        super::stats::percentile(&mut rounds.iter().map(f).collect::<Vec<_>>(), 50.0)
    };
    let median = Round {
        prefill_tok_s: med(|r| r.prefill_tok_s),
        decode_after_prompt_tok_s: med(|r| r.decode_after_prompt_tok_s),
        decode_tok_s: med(|r| r.decode_tok_s),
    };
    Ok(DecodeOutcome::Single(DecodeReport {
        engine: b.engine,
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens,
        short_prompt_tokens: short_tokens,
        decode_tokens: b.decode_tokens,
        first_ids,
        rounds,
        median,
    }))
}

/// Read bandwidth of this machine's memory, as a decode step sees it: `threads` threads each
/// summing their share of a buffer far larger than any cache. Best of `repeats`, bytes/s.
pub fn memory_bandwidth(bytes: usize, threads: usize, repeats: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0u64, u64::wrapping_add)
        });
        let secs = t.elapsed().as_secs_f64();
        // The sum is used, so the reads cannot be optimized away.
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / secs);
    }
    best
}

/// Sums `words` in eight independent lanes (the compiler vectorizes it).
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut blocks = words.chunks_exact(8);
    for b in &mut blocks {
        for (l, w) in lanes.iter_mut().zip(b) {
            *l = l.wrapping_add(*w);
        }
    }
    let tail: u64 = blocks.remainder().iter().fold(0, |a, w| a.wrapping_add(*w));
    lanes.iter().fold(tail, |a, l| a.wrapping_add(*l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_adds_every_word_including_the_tail() {
        let v: Vec<u64> = (1..=21).collect();
        assert_eq!(sum_words(&v), 21 * 22 / 2);
        assert_eq!(sum_words(&[]), 0);
    }

    #[test]
    fn timed_rates_use_the_first_token_as_the_prefill_boundary() {
        let t = Timed {
            prompt_tokens: 100,
            token_times: vec![0.5, 0.6, 0.7, 0.9],
            ids: vec![1, 2, 3, 4],
        };
        assert!((t.prefill_tok_s() - 200.0).abs() < 1e-9);
        assert!((t.decode_tok_s() - 3.0 / 0.4).abs() < 1e-9);
    }
}
