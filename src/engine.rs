//! Runs inference off the async runtime: bounded admission (running + queued), blocking
//! worker threads, token streaming with cancellation and deadlines.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::model::chat::ChatMessage;
use crate::model::embed::EmbeddingOut;
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::stream::{StopMatcher, Utf8Stream};
use crate::model::{LoadedModel, ModelError, ModelVersion};
use crate::registry::Lease;

/// Deltas buffered per stream before the generating thread waits for the client. The
/// channel holds one more message: the last one (the summary or the error) always has a
/// place, so ending a stream never waits for a client that does not read.
const STREAM_BUFFER: usize = 32;
/// How often a generation waiting for its client to read looks at its deadline, the drain
/// policy and shutdown.
const SEND_POLL: Duration = Duration::from_millis(20);

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

/// Counts requests admitted (running or waiting) and hands out running slots.
struct Admission {
    running: Arc<Semaphore>,
    admitted: AtomicUsize,
    max_admitted: usize,
    max_concurrent: usize,
}

/// A request's place in admission; dropping it frees the place (and its running slot).
pub struct Ticket {
    admission: Arc<Admission>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Ticket {
    /// Waits for a running slot, until `deadline` if one is set.
    async fn run_slot(&mut self, deadline: Option<Instant>) -> Result<()> {
        let acquire = self.admission.running.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), acquire)
                .await
                .map_err(|_| Error::DeadlineWaiting("waiting in the admission queue".into()))?,
            None => acquire.await,
        };
        self.permit = Some(permit.map_err(|_| Error::Internal("admission closed".into()))?);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The inference engine: one per server, shared by every model.
#[derive(Clone)]
pub struct Engine {
    admission: Arc<Admission>,
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
            admission: Arc::new(Admission {
                running: Arc::new(Semaphore::new(limits.max_concurrent)),
                admitted: AtomicUsize::new(0),
                max_admitted: limits.max_concurrent + limits.max_queue,
                max_concurrent: limits.max_concurrent,
            }),
            limits,
        }
    }

    /// Takes a place in admission or fails fast with [`Error::Overloaded`].
    pub fn admit(&self) -> Result<Ticket> {
        let a = &self.admission;
        let prev = a.admitted.fetch_add(1, Ordering::AcqRel);
        if prev >= a.max_admitted {
            a.admitted.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rejected();
            return Err(Error::Overloaded(format!(
                "{} requests running and {} queued (limits {} + {})",
                a.max_concurrent.min(prev),
                prev.saturating_sub(a.max_concurrent),
                a.max_concurrent,
                a.max_admitted - a.max_concurrent
            )));
        }
        Ok(Ticket {
            admission: a.clone(),
            permit: None,
        })
    }

    /// Requests admitted right now (running or queued).
    pub fn admitted(&self) -> usize {
        self.admission.admitted.load(Ordering::Acquire)
    }

    /// (running, queued) requests right now.
    pub fn load(&self) -> (usize, usize) {
        let a = &self.admission;
        let running = a.max_concurrent - a.running.available_permits().min(a.max_concurrent);
        (running, self.admitted().saturating_sub(running))
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

    /// Starts generating on a blocking thread once a running slot is free. The receiver
    /// yields deltas then one `Finished`, or an error; dropping it cancels generation within
    /// one token.
    pub fn generate(
        &self,
        lease: Lease,
        ticket: Ticket,
        prompt: Prepared,
        req: &GenerateRequest,
        deadline: Option<Instant>,
        admitted_at: Instant,
    ) -> Result<mpsc::Receiver<Result<GenEvent>>> {
        let mut job = GenJob::new(lease, prompt, req, deadline, admitted_at)?;
        job.metrics = Some(self.metrics.clone());
        job.cut = self.cut.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER + 1);
        let mut ticket = ticket;
        let span = tracing::Span::current();
        tokio::spawn(async move {
            // Waiting for a running slot is nothing the version did: no failure here counts
            // against it. A client that leaves while queued gives its place back at once.
            let waited = tokio::select! {
                r = ticket.run_slot(job.deadline) => r,
                _ = tx.closed() => return,
            };
            if let Err(e) = waited {
                let _ = tx.try_send(Err(e));
                return;
            }
            let last = tx.clone();
            let run = tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                // The ticket (running slot) and lease live until the last token is sent.
                let _ticket = ticket;
                if let Err(e) = job.run(&tx) {
                    if e.counts_against_version() {
                        job.lease.record(false);
                    }
                    // The last message has its place kept: this never waits.
                    let _ = tx.try_send(Err(e));
                }
            });
            if let Err(e) = run.await {
                let msg = crate::panic::of_join(e);
                tracing::error!(panic = %msg, "generation thread panicked");
                // The lease went with the thread; the stream still ends with a status.
                let _ = last.try_send(Err(Error::Internal(format!("generation panicked: {msg}"))));
            }
        });
        Ok(rx)
    }

    /// Embeds `texts` with the leased model on a blocking thread.
    pub async fn embed(
        &self,
        lease: Lease,
        mut ticket: Ticket,
        texts: Vec<String>,
        deadline: Option<Instant>,
    ) -> Result<(Lease, Vec<EmbeddingOut>)> {
        // Waiting for a running slot is nothing the version did: not counted against it.
        ticket.run_slot(deadline).await?;
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

/// Everything one generation needs, owned by its blocking thread.
struct GenJob {
    lease: Lease,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_new: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    return_ids: bool,
    deadline: Option<Instant>,
    admitted_at: Instant,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl GenJob {
    fn new(
        lease: Lease,
        prompt: Prepared,
        req: &GenerateRequest,
        deadline: Option<Instant>,
        admitted_at: Instant,
    ) -> Result<Self> {
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
            metrics: None,
            cut: Default::default(),
        })
    }

    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The decode loop. Returns `Ok` when finished or when the client went away.
    fn run(&self, tx: &mpsc::Sender<Result<GenEvent>>) -> Result<()> {
        let LoadedModel::Llm(llm) = &self.lease.model else {
            return Err(Error::Internal("generate on a non-LLM model".into()));
        };
        let model_err = |e: candle_core::Error| ModelError::Inference {
            model: self.lease.name.clone(),
            reason: e.to_string(),
        };
        let mut session = llm.session();
        let mut sampler = Sampler::new(&self.params);
        let mut utf8 = Utf8Stream::default();
        let mut stops = StopMatcher::new(self.stop.clone());
        let mut history = self.prompt.clone();
        let mut keep_going =
            || !tx.is_closed() && !self.expired() && !self.lease.is_cancelled() && !self.is_cut();
        let Some(mut logits) = session.feed(&self.prompt, &mut keep_going)? else {
            return self.interrupted(tx);
        };
        let mut completion = 0usize;
        let mut first_token_at = None;
        let mut last_token_at: Option<Instant> = None;
        let mut matched = None;
        let reason = loop {
            let token = sampler.sample(&logits, &history).map_err(model_err)?;
            completion += 1;
            let now = Instant::now();
            if let Some(m) = &self.metrics {
                if first_token_at.is_none() {
                    m.first_token(
                        &self.lease.name,
                        now.duration_since(self.admitted_at),
                        self.prompt.len(),
                    );
                }
                m.token(
                    &self.lease.name,
                    last_token_at.map(|t| now.duration_since(t)),
                );
            }
            last_token_at = Some(now);
            first_token_at.get_or_insert(now);
            history.push(token);
            if !self.ignore_eos && llm.tokenizer.end_of_generation.contains(&token) {
                break FinishReason::Eos;
            }
            let check = stops.push(&utf8.push(llm.tokenizer.token_bytes(token)));
            if !check.emit.is_empty() || self.return_ids {
                let delta = GenEvent::Delta {
                    text: check.emit,
                    token_ids: if self.return_ids {
                        vec![token]
                    } else {
                        Vec::new()
                    },
                };
                if !self.send(tx, delta)? {
                    return Ok(());
                }
            }
            if check.matched.is_some() {
                matched = check.matched;
                break FinishReason::Stop;
            }
            if completion >= self.max_new {
                break FinishReason::Length;
            }
            if !keep_going() {
                return self.interrupted(tx);
            }
            logits = match session.feed(&[token], &mut keep_going)? {
                Some(l) => l,
                None => return self.interrupted(tx),
            };
        };
        if reason != FinishReason::Stop {
            let mut tail = stops.push(&utf8.finish()).emit;
            tail.push_str(&stops.finish());
            if !tail.is_empty() {
                let delta = GenEvent::Delta {
                    text: tail,
                    token_ids: Vec::new(),
                };
                if !self.send(tx, delta)? {
                    return Ok(());
                }
            }
        }
        let first = first_token_at.unwrap_or_else(Instant::now);
        let decode_secs = first.elapsed().as_secs_f64();
        let finish = Finish {
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: completion,
            time_to_first_token: first.duration_since(self.admitted_at),
            tokens_per_second: if completion > 1 && decode_secs > 0.0 {
                (completion - 1) as f64 / decode_secs
            } else {
                0.0
            },
            seed: self.params.seed,
            stop: matched,
        };
        self.lease.record(true);
        // The last message has its place kept: this never waits.
        let _ = tx.try_send(Ok(GenEvent::Finished(finish)));
        Ok(())
    }

    /// Sends one delta. While the client's buffer is full it waits, but never past the
    /// request's deadline, the drain policy's cancel or the end of the shutdown grace: a
    /// client that stops reading holds its running slot no longer than a slow one could.
    /// `Ok(false)`: the client left.
    fn send(&self, tx: &mpsc::Sender<Result<GenEvent>>, delta: GenEvent) -> Result<bool> {
        let runtime = tokio::runtime::Handle::current();
        loop {
            if tx.is_closed() {
                return Ok(false);
            }
            // One place is kept for the last message.
            if tx.capacity() > 1 {
                return Ok(tx.try_send(Ok(delta)).is_ok());
            }
            if let Some(e) = self.stopped(true) {
                return Err(e);
            }
            // Wakes when the client has read (two places free), or to look again.
            let _ = runtime.block_on(tokio::time::timeout(SEND_POLL, tx.reserve_many(2)));
        }
    }

    /// Generation stopped early: the client left (nothing to send), the deadline passed, or
    /// a drain with the cancel policy ended the version.
    fn interrupted(&self, tx: &mpsc::Sender<Result<GenEvent>>) -> Result<()> {
        if tx.is_closed() {
            return Ok(());
        }
        self.stopped(false).map_or(Ok(()), Err)
    }

    /// Why this generation must end now, if it must: the shutdown grace ended, a drain
    /// cancelled its version, or its deadline passed (while the client was not reading,
    /// `reading`, which is not the version's slowness).
    fn stopped(&self, reading: bool) -> Option<Error> {
        if self.is_cut() {
            Some(Error::ShuttingDown)
        } else if self.lease.is_cancelled() {
            Some(Error::Drained {
                model: self.lease.name.clone(),
                version: self.lease.version.clone(),
            })
        } else if self.expired() && reading {
            Some(Error::DeadlineWaiting(
                "waiting for the client to read".into(),
            ))
        } else if self.expired() {
            Some(Error::DeadlineExceeded("generating".into()))
        } else {
            None
        }
    }
}
