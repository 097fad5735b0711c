//! The inference engine: bounded admission (running + queued), then for generation a
//! sequence per request in the continuous batch of its version's scheduler
//! ([`scheduler`]), and for embeddings a blocking thread per call.
//!
//! - [`admission`]: requests admitted and running slots;
//! - [`sequence`]: what one generation owns (sampler, stream, counters, KV cache, outbox);
//! - [`scheduler`]: the per-version batch and its steps.
mod admission;
mod embed_batch;
pub mod scheduler;
mod sequence;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::model::chat::ChatMessage;
use crate::model::embed::EmbeddingOut;
use crate::model::{LoadedModel, ModelError, ModelVersion};
use crate::registry::Lease;

pub use admission::Ticket;
use embed_batch::EmbedBatcher;
use scheduler::Scheduler;
pub use scheduler::{BatchLimits, BatchStats};
use sequence::{Plan, Sequence, STREAM_BUFFER};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Raw(String),
    Chat(Vec<ChatMessage>),
}

/// Sampling fields as the caller sent them (range-checked); unset ones take model defaults.
#[derive(Debug, Clone, Default)]
pub struct SamplingRequest {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub repetition_last_n: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Generate past end-of-sequence tokens, up to max_tokens.
    pub ignore_eos: bool,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: String,
    pub input: PromptInput,
    pub sampling: SamplingRequest,
    pub return_token_ids: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
}

/// The summary sent last.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    pub tokens_per_second: f64,
    pub seed: u64,
    pub stop: Option<String>,
}

/// One message of a generation stream.
#[derive(Debug, Clone)]
pub enum GenEvent {
    Delta { text: String, token_ids: Vec<u32> },
    Finished(Finish),
}

/// One `T` per live version, keyed by the version's address (the weak reference tells a
/// live version from a freed one at the same address). It holds no version alive.
pub(crate) struct PerVersion<T>(Mutex<HashMap<usize, Entry<T>>>);

/// A version, weakly, and its `T`.
type Entry<T> = (Weak<ModelVersion>, Arc<T>);

impl<T> Default for PerVersion<T> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<T> PerVersion<T> {
    /// `version`'s `T`, made by `make` on first use.
    fn get_or_make(&self, version: &Arc<ModelVersion>, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let key = Arc::as_ptr(version) as usize;
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, t)) = map.get(&key) {
            if v.upgrade().is_some_and(|v| Arc::ptr_eq(&v, version)) {
                return t.clone();
            }
        }
        map.retain(|_, (v, _)| v.strong_count() > 0);
        let t = make();
        map.insert(key, (Arc::downgrade(version), t.clone()));
        t
    }

    /// Every live version with its `T`.
    fn live(&self) -> Vec<(Arc<ModelVersion>, Arc<T>)> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (v, _)| v.strong_count() > 0);
        map.values()
            .filter_map(|(v, t)| Some((v.upgrade()?, t.clone())))
            .collect()
    }
}

/// The same model failure for each of the requests a batched pass served.
pub(crate) fn each_error(e: &ModelError) -> Error {
    match e {
        ModelError::Inference { model, reason } => ModelError::Inference {
            model: model.clone(),
            reason: reason.clone(),
        }
        .into(),
        other => Error::Internal(other.to_string()),
    }
}

/// The inference engine: one per server, shared by every model.
#[derive(Clone)]
pub struct Engine {
    admission: Arc<admission::Admission>,
    /// The scheduler of every version with sequences, keyed by the version's address (the
    /// weak reference tells a live version from a freed one at the same address).
    schedulers: Arc<PerVersion<Scheduler>>,
    /// The embedding batcher of every live embedding version.
    embedders: Arc<PerVersion<EmbedBatcher>>,
    pub limits: Limits,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when the shutdown grace period is over: running generations end at their next
    /// token with UNAVAILABLE.
    cut: Arc<std::sync::atomic::AtomicBool>,
}

/// A prompt ready to generate from.
pub struct Prepared {
    pub ids: Vec<u32>,
    pub text: String,
}

impl Engine {
    pub fn new(limits: Limits, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics,
            cut: Default::default(),
            admission: admission::Admission::new(limits.max_concurrent, limits.max_queue),
            schedulers: Default::default(),
            embedders: Default::default(),
            limits,
        }
    }

    /// Takes a place in admission or fails fast with [`Error::Overloaded`].
    pub fn admit(&self) -> Result<Ticket> {
        self.admission.admit().map_err(|why| {
            self.metrics.rejected();
            Error::Overloaded(why)
        })
    }

    /// Requests admitted right now (running or queued).
    pub fn admitted(&self) -> usize {
        self.admission.admitted()
    }

    /// (running, queued) requests right now.
    pub fn load(&self) -> (usize, usize) {
        self.admission.load()
    }

    /// The batch limits every version's scheduler runs with.
    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_batch: self.limits.max_batch,
            step_tokens: self.limits.step_tokens,
            kv_cache_tokens: self.limits.kv_cache_tokens,
        }
    }

    /// `(model, version, stats)` of every live version's scheduler.
    pub fn batches(&self) -> Vec<(String, String, Arc<BatchStats>)> {
        self.schedulers
            .live()
            .into_iter()
            .map(|(v, s)| (v.name.clone(), v.version.clone(), s.stats.clone()))
            .collect()
    }

    /// The scheduler of `version`, made on first use.
    fn scheduler(&self, version: &Arc<ModelVersion>) -> Arc<Scheduler> {
        self.schedulers.get_or_make(version, || {
            Scheduler::new(
                self.batch_limits(),
                self.metrics.clone(),
                format!("{}-{}", version.name, version.version),
            )
        })
    }

    /// Ends every running generation at its next token (the shutdown grace period is over).
    pub fn cut_all(&self) {
        self.cut.store(true, Ordering::Release);
    }

    /// Renders and tokenizes `input` on a blocking thread; checks it fits the context.
    pub async fn prepare(
        &self,
        version: Arc<ModelVersion>,
        input: PromptInput,
    ) -> Result<Prepared> {
        tokio::task::spawn_blocking(move || prepare_blocking(&version, input))
            .await
            .map_err(|e| Error::Internal(format!("tokenizer thread: {e}")))?
    }

    /// Starts generating once a running slot is free: the request's sequence joins the
    /// batch of the version its lease pinned. The receiver yields deltas then one
    /// `Finished`, or an error; dropping it ends the sequence at its scheduler's next step.
    pub fn generate(
        &self,
        lease: Lease,
        ticket: Ticket,
        prompt: Prepared,
        req: &GenerateRequest,
        deadline: Option<Instant>,
        admitted_at: Instant,
    ) -> Result<mpsc::Receiver<Result<GenEvent>>> {
        let plan = Plan::new(lease, prompt, req, deadline, admitted_at)?;
        let budget = self.limits.kv_cache_tokens;
        if plan.kv_tokens() > budget {
            return Err(Error::InvalidArgument(format!(
                "the prompt and max_tokens need {} KV cache tokens; the budget of a version \
                 is {budget} (kv_cache_tokens)",
                plan.kv_tokens()
            )));
        }
        let scheduler = self.scheduler(plan.lease.version());
        // One more place than the deltas may fill: the last message always fits.
        let (tx, rx) = mpsc::channel(STREAM_BUFFER + 1);
        let mut ticket = ticket;
        let span = tracing::Span::current();
        let (cut, metrics) = (self.cut.clone(), self.metrics.clone());
        tokio::spawn(async move {
            // Waiting for a running slot is nothing the version did: no failure here counts
            // against it. A client that leaves while queued gives its place back at once.
            let waited = tokio::select! {
                r = ticket.run_slot(plan.deadline) => r,
                _ = tx.closed() => return,
            };
            if let Err(e) = waited {
                let _ = tx.try_send(Err(e));
                return;
            }
            scheduler.submit(Sequence::new(plan, ticket, tx, span, cut, metrics));
        });
        Ok(rx)
    }

    /// Embeds `texts` with the leased model: with calls to the same version that arrive
    /// within `embed_queue_delay_us`, in one forward pass ([`embed_batch`]); on its own
    /// when the delay is 0.
    pub async fn embed(
        &self,
        lease: Lease,
        mut ticket: Ticket,
        texts: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<(Lease, Vec<EmbeddingOut>)> {
        // Waiting for a running slot is nothing the version did: not counted against it.
        ticket.run_slot(deadline).await?;
        if !matches!(lease.model, LoadedModel::Embedding(_)) {
            return Err(Error::Internal("embed on a non-embedding model".into()));
        }
        if self.limits.embed_queue_delay_us > 0 {
            let batcher = self.embedders.get_or_make(lease.version(), || {
                EmbedBatcher::new(
                    Duration::from_micros(self.limits.embed_queue_delay_us),
                    self.limits.max_embed_batch,
                    self.metrics.clone(),
                )
            });
            let rx = batcher.join(lease.version(), texts);
            let answer = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), rx)
                    .await
                    .map_err(|_| Error::DeadlineExceeded("embedding".into()))?,
                None => rx.await,
            };
            let out = answer.map_err(|_| Error::Internal("the embedding batch ended".into()))?;
            drop(ticket);
            return match out {
                Ok(v) => {
                    lease.record(true);
                    Ok((lease, v))
                }
                Err(e) => {
                    if e.counts_against_version() {
                        lease.record(false);
                    }
                    Err(e)
                }
            };
        }
        tokio::task::spawn_blocking(move || {
            let _ticket = ticket;
            let LoadedModel::Embedding(m) = &lease.model else {
                return Err(Error::Internal("embed on a non-embedding model".into()));
            };
            match m.embed(&texts) {
                Ok(out) => {
                    lease.record(true);
                    Ok((lease, out))
                }
                Err(e) => {
                    let e = Error::from(e);
                    if e.counts_against_version() {
                        lease.record(false);
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("embedding panicked: {}", crate::panic::of_join(e))))?
    }
}

fn prepare_blocking(version: &ModelVersion, input: PromptInput) -> Result<Prepared> {
    let LoadedModel::Llm(llm) = &version.model else {
        return Err(Error::Internal("prepare on a non-LLM model".into()));
    };
    let text = match input {
        PromptInput::Raw(t) => t,
        PromptInput::Chat(messages) => {
            llm.render_chat(&messages)
                .map_err(|reason| ModelError::ChatTemplate {
                    model: version.name.clone(),
                    reason,
                })?
        }
    };
    let ids = llm
        .tokenizer
        .encode(&text)
        .map_err(|reason| ModelError::Tokenizer {
            model: version.name.clone(),
            reason,
        })?;
    if ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt encodes to no tokens".into(),
        ));
    }
    if ids.len() >= llm.context_length {
        return Err(Error::PromptTooLong {
            model: version.name.clone(),
            tokens: ids.len(),
            max: llm.context_length,
        });
    }
    Ok(Prepared { ids, text })
}
