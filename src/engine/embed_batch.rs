//! Dynamic batching of Embed calls, as Triton's dynamic batcher does: calls to one version
//! that arrive within `embed_queue_delay_us` of the first run as one forward pass (up to
//! `max_embed_batch` texts together), and each gets its own rows back.
//!
//! Every call keeps its own lease and admission place while it waits; the batch holds the
//! version only while its pass runs.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::embed::EmbeddingOut;
use crate::model::{LoadedModel, ModelVersion};

type Reply = oneshot::Sender<Result<Vec<EmbeddingOut>>>;

/// Calls waiting for the next pass of one version.
struct Pending {
    /// Which batch this is (a timer only runs the batch it was started for).
    id: u64,
    texts: Vec<String>,
    /// Each call's first row, row count and reply.
    calls: Vec<(usize, usize, Reply)>,
}

pub(crate) struct EmbedBatcher {
    pending: Mutex<(u64, Option<Pending>)>,
    delay: Duration,
    max_texts: usize,
    metrics: Arc<crate::metrics::Metrics>,
}

impl EmbedBatcher {
    pub(crate) fn new(
        delay: Duration,
        max_texts: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new((0, None)),
            delay,
            max_texts,
            metrics,
        })
    }

    /// Adds `texts` to the version's next pass; the receiver gets their embeddings.
    pub(crate) fn join(
        self: &Arc<Self>,
        version: &Arc<ModelVersion>,
        texts: Vec<String>,
    ) -> oneshot::Receiver<Result<Vec<EmbeddingOut>>> {
        let (tx, rx) = oneshot::channel();
        let mut full = None;
        let start_timer;
        {
            let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let (next_id, pending) = &mut *guard;
            if pending
                .as_ref()
                .is_some_and(|p| p.texts.len() + texts.len() > self.max_texts)
            {
                // No room: the waiting batch goes now, and this call starts the next.
                full = pending.take();
            }
            start_timer = pending.is_none().then(|| {
                *next_id += 1;
                *pending = Some(Pending {
                    id: *next_id,
                    texts: Vec::new(),
                    calls: Vec::new(),
                });
                *next_id
            });
            let p = pending.as_mut().expect("made above");
            p.calls.push((p.texts.len(), texts.len(), tx));
            p.texts.extend(texts);
        }
        if let Some(batch) = full {
            self.run(version.clone(), batch);
        }
        if let Some(id) = start_timer {
            let (me, version) = (self.clone(), version.clone());
            tokio::spawn(async move {
                tokio::time::sleep(me.delay).await;
                let batch = {
                    let mut guard = me.pending.lock().unwrap_or_else(|p| p.into_inner());
                    match &guard.1 {
                        Some(p) if p.id == id => guard.1.take(),
                        _ => None,
                    }
                };
                if let Some(batch) = batch {
                    me.run(version, batch);
                }
            });
        }
        rx
    }

    /// Runs one pass over `batch` on a blocking thread and answers every call in it.
    fn run(self: &Arc<Self>, version: Arc<ModelVersion>, batch: Pending) {
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let texts = batch.texts;
            let v = version.clone();
            let started = Instant::now();
            let out = tokio::task::spawn_blocking(move || match &v.model {
                LoadedModel::Embedding(m) => m.embed(&texts),
                LoadedModel::Llm(_) => Err(crate::model::ModelError::Inference {
                    model: v.name.clone(),
                    reason: "embed on a language model".into(),
                }),
            })
            .await;
            metrics.batch_step(&version.name, batch.calls.len(), started.elapsed());
            drop(version);
            match out {
                Ok(Ok(rows)) => {
                    for (first, n, reply) in batch.calls {
                        let _ = reply.send(Ok(rows[first..first + n].to_vec()));
                    }
                }
                Ok(Err(e)) => {
                    for (_, _, reply) in batch.calls {
                        let _ = reply.send(Err(super::each_error(&e)));
                    }
                }
                Err(join) => {
                    let msg = crate::panic::of_join(join);
                    tracing::error!(panic = %msg, "embedding panicked");
                    for (_, _, reply) in batch.calls {
                        let _ =
                            reply.send(Err(Error::Internal(format!("embedding panicked: {msg}"))));
                    }
                }
            }
        });
    }
}
