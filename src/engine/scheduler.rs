//! One scheduler per model version: continuous batching of its sequences.
//!
//! A request's sequence joins the scheduler of the version its lease pinned, so a batch
//! never mixes versions. The scheduler runs on its own thread while it has sequences (and
//! ends, holding nothing, when it has none). Each step:
//! 1. retires the sequences that must end (client gone, deadline, drain cancel, shutdown),
//!    parked ones included, and unparks those whose client has read;
//! 2. lets waiting sequences join while the batch has room (`max_batch`) and their KV
//!    tokens fit the version's budget (`kv_cache_tokens`), in arrival order;
//! 3. runs one forward pass over every decoding sequence (one token each) and the next
//!    prompt chunk of prefilling ones, within the step's token budget (`step_tokens`; at
//!    least one chunk per step, so a prompt is never starved);
//! 4. samples each sequence's token, sends each its delta, and retires the finished at once
//!    (their lease and admission place go back in this step).
//!
//! A client that does not read never stalls the batch: its deltas wait in its own bounded
//! buffer and, when that is full, its sequence is parked (out of the batch, KV kept) until
//! it reads; its deadline and the drain policy still apply while parked.
//!
//! On the CPU every step takes a turn at the CPU queue (`crate::turns`), so the batches of
//! two versions during a drain, and background loading, take turns.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::sequence::{Flow, Sequence};
use crate::error::Error;

/// How long a scheduler whose sequences are all parked waits before it looks again at
/// their clients, deadlines and the drain policy.
const PARKED_POLL: Duration = Duration::from_millis(20);

/// What bounds a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences in one step at most.
    pub max_batch: usize,
    /// Tokens one step feeds at most (decode tokens plus prompt chunks), except that a step
    /// always takes at least one prompt chunk when a sequence is prefilling.
    pub step_tokens: usize,
    /// KV cache tokens the sequences of one version may reserve together.
    pub kv_cache_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_batch: 16,
            step_tokens: 256,
            kv_cache_tokens: 16384,
        }
    }
}

/// What a scheduler holds right now, for the metrics.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Sequences in the batch (running or parked).
    pub sequences: AtomicUsize,
    /// Of those, parked because their client does not read.
    pub parked: AtomicUsize,
    /// Waiting to join (batch full or KV budget used up).
    pub waiting: AtomicUsize,
    /// KV cache tokens reserved by the sequences in the batch.
    pub kv_tokens: AtomicUsize,
}

struct Inbox {
    incoming: Vec<Sequence>,
    /// A thread is running this scheduler.
    running: bool,
}

/// A version's scheduler. The engine keeps one per live version; it holds no reference
/// to the version itself (its sequences do, through their leases).
pub(crate) struct Scheduler {
    inbox: Mutex<Inbox>,
    wake: Condvar,
    limits: BatchLimits,
    pub(crate) stats: Arc<BatchStats>,
    metrics: Arc<crate::metrics::Metrics>,
    /// `model/version`, for the thread's name and logs.
    label: String,
}

impl Scheduler {
    pub(crate) fn new(
        limits: BatchLimits,
        metrics: Arc<crate::metrics::Metrics>,
        label: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            inbox: Mutex::new(Inbox {
                incoming: Vec::new(),
                running: false,
            }),
            wake: Condvar::new(),
            limits,
            stats: Default::default(),
            metrics,
            label,
        })
    }

    /// Hands `seq` to this scheduler, starting its thread if none runs.
    pub(crate) fn submit(self: &Arc<Self>, seq: Sequence) {
        if seq.reserved > self.limits.kv_cache_tokens {
            let (tokens, budget) = (seq.reserved, self.limits.kv_cache_tokens);
            seq.fail(Error::InvalidArgument(format!(
                "the prompt and max_tokens need {tokens} KV cache tokens; the budget of a \
                 version is {budget} (kv_cache_tokens)"
            )));
            return;
        }
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.incoming.push(seq);
        self.wake.notify_one();
        if inbox.running {
            return;
        }
        inbox.running = true;
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("swapd-batch-{}", self.label))
            .spawn(move || me.run());
        if let Err(e) = spawned {
            inbox.running = false;
            for s in inbox.incoming.drain(..) {
                s.fail(Error::Internal(format!("cannot start a batch thread: {e}")));
            }
        }
    }

    /// The thread: steps until no sequence is left.
    fn run(self: Arc<Self>) {
        let mut batch = Batch::default();
        loop {
            {
                let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
                batch.waiting.extend(inbox.incoming.drain(..));
                if batch.active.is_empty() && batch.waiting.is_empty() {
                    inbox.running = false;
                    self.publish(&batch);
                    return;
                }
            }
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.iteration(&mut batch)
            }));
            match turn {
                Ok(true) => {}
                Ok(false) => {
                    // Nothing could run: every sequence is parked or waiting for KV.
                    self.publish(&batch);
                    let inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
                    if inbox.incoming.is_empty() {
                        drop(self.wake.wait_timeout(inbox, PARKED_POLL));
                    }
                }
                Err(p) => {
                    let msg = crate::panic::message(p.as_ref());
                    tracing::error!(scheduler = %self.label, panic = %msg, "batch step panicked");
                    let all = batch.active.drain(..).chain(batch.waiting.drain(..));
                    for s in all.collect::<Vec<_>>() {
                        s.fail(Error::Internal(format!("generation panicked: {msg}")));
                    }
                    batch.kv_reserved = 0;
                }
            }
        }
    }

    /// One round: retire, admit, step. `false` when nothing could run.
    fn iteration(&self, batch: &mut Batch) -> bool {
        batch.retire();
        batch.admit(&self.limits);
        self.publish(batch);
        let chosen = batch.choose(&self.limits);
        if chosen.is_empty() {
            return false;
        }
        let version = batch.active[chosen[0]].lease.version().clone();
        let crate::model::LoadedModel::Llm(llm) = &version.model else {
            unreachable!("only language models are batched");
        };
        let started = Instant::now();
        let mut fed = Vec::with_capacity(chosen.len());
        let result = {
            let mut picked: Vec<&mut Sequence> = Vec::with_capacity(chosen.len());
            for (i, s) in batch.active.iter_mut().enumerate() {
                if chosen.contains(&i) {
                    picked.push(s);
                }
            }
            let mut items: Vec<_> = picked.iter_mut().map(|s| s.item()).collect();
            fed.extend(items.iter().map(|i| i.ids.len()));
            llm.step(&mut items)
        };
        self.metrics
            .batch_step(&version.name, chosen.len(), started.elapsed());
        match result {
            Ok(logits) => {
                for ((&i, logits), n) in chosen.iter().zip(logits).zip(fed) {
                    let s = &mut batch.active[i];
                    if let Err(e) = s.stepped(n, logits, llm) {
                        batch.failed.push((i, e));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(scheduler = %self.label, error = %e, "batch step failed");
                for &i in &chosen {
                    batch.failed.push((i, super::each_error(&e)));
                }
            }
        }
        batch.settle();
        drop(version);
        true
    }

    fn publish(&self, batch: &Batch) {
        let s = &self.stats;
        s.sequences.store(batch.active.len(), Ordering::Relaxed);
        s.parked.store(
            batch.active.iter().filter(|q| !q.runnable()).count(),
            Ordering::Relaxed,
        );
        s.waiting.store(batch.waiting.len(), Ordering::Relaxed);
        s.kv_tokens.store(batch.kv_reserved, Ordering::Relaxed);
    }
}

/// The sequences a scheduler thread owns.
#[derive(Default)]
struct Batch {
    /// In the batch, in the order they joined.
    active: Vec<Sequence>,
    /// Not yet joined, in arrival order.
    waiting: VecDeque<Sequence>,
    /// KV tokens the active sequences reserved.
    kv_reserved: usize,
    /// Sequences of the last step whose result was an error (index in `active`).
    failed: Vec<(usize, Error)>,
}

impl Batch {
    /// Ends the sequences that must end, and unparks those whose client has read.
    fn retire(&mut self) {
        let mut keep = Vec::with_capacity(self.active.len());
        for mut s in self.active.drain(..) {
            if s.gone() {
                self.kv_reserved -= s.reserved;
                continue;
            }
            if let Some(e) = s.stopped() {
                self.kv_reserved -= s.reserved;
                s.fail(e);
                continue;
            }
            match s.flush() {
                Flow::Ready | Flow::Parked => keep.push(s),
                Flow::Done | Flow::Gone => self.kv_reserved -= s.reserved,
            }
        }
        self.active = keep;
        let mut waiting = VecDeque::with_capacity(self.waiting.len());
        for s in self.waiting.drain(..) {
            if s.gone() {
                continue;
            }
            match s.stopped() {
                Some(e) => s.fail(e),
                None => waiting.push_back(s),
            }
        }
        self.waiting = waiting;
    }

    /// Lets waiting sequences join, in order, while they fit.
    fn admit(&mut self, limits: &BatchLimits) {
        while self.active.len() < limits.max_batch {
            let Some(next) = self.waiting.front() else {
                break;
            };
            if self.kv_reserved + next.reserved > limits.kv_cache_tokens {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            self.kv_reserved += s.reserved;
            self.active.push(s);
        }
    }

    /// Indices of the sequences in the next step: every runnable decoding one, then prompt
    /// chunks in join order while the token budget allows (always at least one).
    fn choose(&self, limits: &BatchLimits) -> Vec<usize> {
        let runnable = |s: &Sequence| s.runnable() && s.next_tokens() > 0;
        let mut chosen: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for (i, s) in self.active.iter().enumerate() {
            if runnable(s) && !s.prefilling() {
                chosen.push(i);
                tokens += 1;
            }
        }
        let mut chunks = 0;
        for (i, s) in self.active.iter().enumerate() {
            if runnable(s) && s.prefilling() {
                let n = s.next_tokens();
                if chunks > 0 && tokens + n > limits.step_tokens {
                    break;
                }
                chosen.push(i);
                tokens += n;
                chunks += 1;
            }
        }
        chosen.sort_unstable();
        chosen
    }

    /// After a step: ends the failed, sends everyone's deltas, retires the finished.
    fn settle(&mut self) {
        let mut failed = std::mem::take(&mut self.failed);
        failed.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, e) in failed {
            let s = self.active.remove(i);
            self.kv_reserved -= s.reserved;
            let _enter = s.span.clone().entered();
            tracing::warn!(error = %e, "generation failed");
            s.fail(e);
        }
        let mut keep = Vec::with_capacity(self.active.len());
        for mut s in self.active.drain(..) {
            match s.flush() {
                Flow::Ready | Flow::Parked => keep.push(s),
                Flow::Done | Flow::Gone => self.kv_reserved -= s.reserved,
            }
        }
        self.active = keep;
    }
}
