//! `swapd bench decode --engine local --batch N`: N sequences decoding in lockstep through
//! the model's batch step (`Llm::step`), as the scheduler runs them, without the server, the
//! clients or gRPC: what one batch step costs, and how that grows with the batch.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::model::kv::StepItem;
use crate::model::llm::Llm;

#[derive(Debug, Serialize)]
pub struct BatchedReport {
    /// Sequences per step.
    pub batch: usize,
    /// Each sequence's prompt tokens (fed alone, before the timed steps).
    pub prompt_tokens: usize,
    /// Timed decode steps per round.
    pub steps: usize,
    /// Aggregate decode tokens/s of each round (batch × steps ÷ time).
    pub rounds_tok_s: Vec<f64>,
    pub median_tok_s: f64,
    /// Median milliseconds of one step.
    pub median_step_ms: f64,
}

/// `rounds` rounds (after a warm-up one) of `batch` fresh sequences, each fed `prompt`
/// alone, then `steps` greedy decode steps of all of them together.
pub fn run(
    llm: &Llm,
    prompt: &str,
    batch: usize,
    steps: usize,
    rounds: usize,
) -> Result<BatchedReport> {
    if batch == 0 || steps == 0 || rounds == 0 {
        bail!("--batch, --decode-tokens and --rounds must be positive");
    }
    let ids = llm.tokenizer.encode(prompt).map_err(anyhow::Error::msg)?;
    let mut rates = Vec::with_capacity(rounds);
    for round in 0..=rounds {
        let mut caches: Vec<_> = (0..batch)
            .map(|_| llm.new_cache(ids.len() + steps + 1))
            .collect();
        let mut next = Vec::with_capacity(batch);
        for cache in &mut caches {
            let mut item = [StepItem {
                ids: &ids,
                cache,
                logits: true,
            }];
            next.push(argmax(llm.step(&mut item)?.remove(0))?);
        }
        let t = Instant::now();
        for _ in 0..steps {
            let fed: Vec<[u32; 1]> = next.iter().map(|&id| [id]).collect();
            let mut items: Vec<StepItem<'_>> = caches
                .iter_mut()
                .zip(&fed)
                .map(|(cache, id)| StepItem {
                    ids: id,
                    cache,
                    logits: true,
                })
                .collect();
            next = llm
                .step(&mut items)?
                .into_iter()
                .map(argmax)
                .collect::<Result<_>>()?;
        }
        if round > 0 {
            rates.push((batch * steps) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let median_tok_s = super::stats::percentile(&mut rates.clone(), 50.0);
    Ok(BatchedReport {
        batch,
        prompt_tokens: ids.len(),
        steps,
        rounds_tok_s: rates,
        median_tok_s,
        median_step_ms: 1000.0 * batch as f64 / median_tok_s,
    })
}

/// The greedy token, picked as the server picks it (no penalty).
fn argmax(logits: Option<candle_core::Tensor>) -> Result<u32> {
    let logits = logits.context("a decode step gave no logits")?;
    Ok(crate::model::greedy::pick(&logits, 1.0, &[])?)
}
