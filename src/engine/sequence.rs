//! A sequence: everything one generation request owns while its version's scheduler runs it
//! (sampler, UTF-8 and stop-string stream, counters, deadline, lease, admission place, KV
//! cache and the messages its client has not taken yet). The weights are the version's.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::admission::Ticket;
use super::{Finish, FinishReason, GenEvent, GenerateRequest, Prepared};
use crate::error::{Error, Result};
use crate::model::kv::{KvCache, StepItem};
use crate::model::llm::{Llm, PREFILL_CHUNK};
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::stream::{StopMatcher, Utf8Stream};
use crate::model::{LoadedModel, ModelError};
use crate::registry::Lease;

/// A validated request, before it has a running slot.
pub(crate) struct Plan {
    pub(crate) lease: Lease,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_new: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    return_ids: bool,
    pub(crate) deadline: Option<Instant>,
    admitted_at: Instant,
}

impl Plan {
    pub(crate) fn new(
        lease: Lease,
        prompt: Prepared,
        req: &GenerateRequest,
        deadline: Option<Instant>,
        admitted_at: Instant,
    ) -> Result<Self> {
        if !matches!(lease.model, LoadedModel::Llm(_)) {
            return Err(Error::Internal("generate on a non-LLM model".into()));
        }
        let d = &lease.defaults;
        let s = &req.sampling;
        let ctx = lease.context_length();
        let max_tokens = s.max_tokens.unwrap_or(d.max_tokens) as usize;
        if max_tokens == 0 || max_tokens > ctx {
            return Err(Error::InvalidArgument(format!(
                "max_tokens {max_tokens}: must be between 1 and the model's context length {ctx}"
            )));
        }
        let params = SamplingParams {
            temperature: s.temperature.unwrap_or(d.temperature) as f64,
            top_p: s.top_p.unwrap_or(d.top_p) as f64,
            top_k: s.top_k.unwrap_or(d.top_k) as usize,
            repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
            repetition_last_n: s.repetition_last_n.unwrap_or(d.repetition_last_n) as usize,
            seed: s.seed.unwrap_or_else(rand::random),
        };
        Ok(Self {
            max_new: max_tokens.min(ctx - prompt.ids.len()),
            prompt: prompt.ids,
            params,
            stop: s.stop.clone(),
            ignore_eos: s.ignore_eos,
            return_ids: req.return_token_ids,
            deadline,
            admitted_at,
            lease,
        })
    }

    /// KV tokens the sequence may need: its prompt and its most new tokens.
    pub(crate) fn kv_tokens(&self) -> usize {
        self.prompt.len() + self.max_new
    }
}

/// What a sequence's client side looks like after a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Everything sent; the sequence can take part in the next step.
    Ready,
    /// The client has not read: messages wait, and the sequence sits out of the batch.
    Parked,
    /// The last message went out.
    Done,
    /// The client went away.
    Gone,
}

pub(crate) struct Sequence {
    _ticket: Ticket,
    tx: mpsc::Sender<Result<GenEvent>>,
    pub(crate) span: tracing::Span,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// The sampled token the next decode step feeds (empty while prefilling).
    next: Vec<u32>,
    history: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    seed: u64,
    max_new: usize,
    ignore_eos: bool,
    return_ids: bool,
    deadline: Option<Instant>,
    admitted_at: Instant,
    cut: Arc<AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
    completion: usize,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// Deltas the client has not had room for.
    outbox: VecDeque<GenEvent>,
    /// Set when generation ended: sent once the outbox is empty.
    finish: Option<Finish>,
    /// KV tokens reserved for it in its scheduler's budget.
    pub(crate) reserved: usize,
    /// The version it runs on. Last: fields drop in order, so its KV cache (device memory on
    /// a GPU) is gone before this, perhaps the version's last holder, lets the version go and
    /// the free phase measure what came back.
    pub(crate) lease: Lease,
}

/// Deltas the channel holds before a sequence is parked; one more place is kept for the
/// last message (the summary or an error), so ending a stream never waits for its client.
pub(crate) const STREAM_BUFFER: usize = 32;

impl Sequence {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plan: Plan,
        ticket: Ticket,
        tx: mpsc::Sender<Result<GenEvent>>,
        span: tracing::Span,
        cut: Arc<AtomicBool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        let reserved = plan.kv_tokens();
        let cache = llm_of(&plan.lease)
            .map(|l| l.new_cache(reserved))
            .unwrap_or_else(|| KvCache::new(0, 1, 0, true));
        Self {
            _ticket: ticket,
            tx,
            span,
            fed: 0,
            next: Vec::new(),
            history: plan.prompt.clone(),
            cache,
            sampler: Sampler::new(&plan.params),
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(plan.stop),
            seed: plan.params.seed,
            max_new: plan.max_new,
            ignore_eos: plan.ignore_eos,
            return_ids: plan.return_ids,
            deadline: plan.deadline,
            admitted_at: plan.admitted_at,
            prompt: plan.prompt,
            lease: plan.lease,
            cut,
            metrics,
            completion: 0,
            first_token_at: None,
            last_token_at: None,
            outbox: VecDeque::new(),
            finish: None,
            reserved,
        }
    }

    /// Whether its prompt is still being fed.
    pub(crate) fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// Whether it can take part in a step: not parked, not finished.
    pub(crate) fn runnable(&self) -> bool {
        self.outbox.is_empty() && self.finish.is_none()
    }

    /// Tokens it feeds in its next step: one decode token, or its next prompt chunk (cut at
    /// multiples of [`PREFILL_CHUNK`] from the start, the same cuts as alone).
    pub(crate) fn next_tokens(&self) -> usize {
        if self.prefilling() {
            PREFILL_CHUNK.min(self.prompt.len() - self.fed)
        } else {
            self.next.len()
        }
    }

    /// Its part of the next step.
    pub(crate) fn item(&mut self) -> StepItem<'_> {
        if self.prefilling() {
            let end = (self.fed + PREFILL_CHUNK).min(self.prompt.len());
            StepItem {
                ids: &self.prompt[self.fed..end],
                logits: end == self.prompt.len(),
                cache: &mut self.cache,
            }
        } else {
            StepItem {
                ids: &self.next,
                logits: true,
                cache: &mut self.cache,
            }
        }
    }

    /// Takes the step's result: `logits` for its next token when it asked for them.
    pub(crate) fn stepped(&mut self, fed: usize, logits: Option<Tensor>, llm: &Llm) -> Result<()> {
        if self.prefilling() {
            self.fed += fed;
        }
        match logits {
            Some(l) => self.on_logits(&l, llm),
            None => Ok(()),
        }
    }

    fn on_logits(&mut self, logits: &Tensor, llm: &Llm) -> Result<()> {
        let token =
            self.sampler
                .sample(logits, &self.history)
                .map_err(|e| ModelError::Inference {
                    model: self.lease.name.clone(),
                    reason: e.to_string(),
                })?;
        self.completion += 1;
        let now = Instant::now();
        if self.first_token_at.is_none() {
            self.metrics.first_token(
                &self.lease.name,
                now.duration_since(self.admitted_at),
                self.prompt.len(),
            );
        }
        self.metrics.token(
            &self.lease.name,
            self.last_token_at.map(|t| now.duration_since(t)),
        );
        self.last_token_at = Some(now);
        self.first_token_at.get_or_insert(now);
        self.history.push(token);
        if !self.ignore_eos && llm.tokenizer.end_of_generation.contains(&token) {
            self.end(FinishReason::Eos, None);
            return Ok(());
        }
        let check = self
            .stops
            .push(&self.utf8.push(llm.tokenizer.token_bytes(token)));
        if !check.emit.is_empty() || self.return_ids {
            self.outbox.push_back(GenEvent::Delta {
                text: check.emit,
                token_ids: if self.return_ids {
                    vec![token]
                } else {
                    Vec::new()
                },
            });
        }
        if check.matched.is_some() {
            self.end(FinishReason::Stop, check.matched);
        } else if self.completion >= self.max_new {
            self.end(FinishReason::Length, None);
        } else {
            self.next = vec![token];
        }
        Ok(())
    }

    /// Generation ended: the held-back text goes out, then the summary.
    fn end(&mut self, reason: FinishReason, matched: Option<String>) {
        if reason != FinishReason::Stop {
            let mut tail = self.stops.push(&self.utf8.finish()).emit;
            tail.push_str(&self.stops.finish());
            if !tail.is_empty() {
                self.outbox.push_back(GenEvent::Delta {
                    text: tail,
                    token_ids: Vec::new(),
                });
            }
        }
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        let decode_secs = first.elapsed().as_secs_f64();
        let n = self.completion;
        self.finish = Some(Finish {
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: n,
            time_to_first_token: first.duration_since(self.admitted_at),
            tokens_per_second: if n > 1 && decode_secs > 0.0 {
                (n - 1) as f64 / decode_secs
            } else {
                0.0
            },
            seed: self.seed,
            stop: matched,
        });
        self.lease.record(true);
    }

    /// Sends what the client has room for. One place is always kept for the last message.
    pub(crate) fn flush(&mut self) -> Flow {
        if self.tx.is_closed() {
            return Flow::Gone;
        }
        while !self.outbox.is_empty() && self.tx.capacity() > 1 {
            let delta = self.outbox.pop_front().expect("not empty");
            if self.tx.try_send(Ok(delta)).is_err() {
                return Flow::Gone;
            }
        }
        if !self.outbox.is_empty() {
            return Flow::Parked;
        }
        match self.finish.take() {
            Some(f) => {
                // The last message has its place kept: this never waits.
                let _ = self.tx.try_send(Ok(GenEvent::Finished(f)));
                Flow::Done
            }
            None => Flow::Ready,
        }
    }

    /// Why this sequence must end now, if it must: the shutdown grace ended, a drain
    /// cancelled its version, or its deadline passed (while parked, waiting for its client,
    /// which is not the version's slowness; before its first step, waiting for a place).
    pub(crate) fn stopped(&self) -> Option<Error> {
        if self.cut.load(Ordering::Acquire) {
            Some(Error::ShuttingDown)
        } else if self.lease.is_cancelled() {
            Some(Error::Drained {
                model: self.lease.name.clone(),
                version: self.lease.version.clone(),
            })
        } else if self.deadline.is_none_or(|d| Instant::now() < d) {
            None
        } else if !self.outbox.is_empty() {
            Some(Error::DeadlineWaiting(
                "waiting for the client to read".into(),
            ))
        } else if self.fed == 0 {
            Some(Error::DeadlineWaiting("waiting for a batch place".into()))
        } else {
            Some(Error::DeadlineExceeded("generating".into()))
        }
    }

    /// Ends the stream with `e` (its place is kept: this never waits).
    pub(crate) fn fail(self, e: Error) {
        if e.counts_against_version() {
            self.lease.record(false);
        }
        let _ = self.tx.try_send(Err(e));
    }

    /// Whether the client went away.
    pub(crate) fn gone(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The language model a lease holds, if it holds one.
pub(crate) fn llm_of(lease: &Lease) -> Option<&Llm> {
    match &lease.model {
        LoadedModel::Llm(l) => Some(l),
        LoadedModel::Embedding(_) => None,
    }
}
