//! The reload state machine: resolve → verify → admit → load → preflight → swap → drain →
//! free. The new version loads beside the serving one; one `ArcSwap` store makes it active
//! only after every check passed; a failure anywhere before the swap leaves the serving
//! version untouched. Each step is reported as an event; the reload runs to completion even
//! if nobody listens.

mod admission;
mod commit;
mod prepare;
mod retire;
mod rollback;
mod run;
mod types;

pub use types::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Instrument;

use self::admission::Admission;
use self::run::Run;
use super::persist::{unix_ms, StateStore};
use super::{Registry, Slot};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::{ModelError, ModelVersion, Resolver};

/// Starts reloads and rollbacks. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    pub registry: Arc<Registry>,
    pub resolver: Resolver,
    pub device: Device,
    /// Where committed versions and the audit log go; `None` keeps nothing across restarts.
    pub store: Option<Arc<StateStore>>,
    pub cooldown: Cooldown,
    /// Most bytes of weights and KV budgets resident at once (all models, standbys
    /// included), if limited.
    pub budget: Option<u64>,
    /// The KV cache tokens each language model version may reserve (counted in admission).
    pub kv_cache_tokens: usize,
    pub memory_policy: MemoryPolicy,
    /// `None`: no automatic rollback.
    pub auto_rollback: Option<AutoRollback>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when shutdown begins: no new reloads, and one in progress stops before its swap.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// A version's file digests by name.
fn digests_of(v: &ModelVersion) -> BTreeMap<String, String> {
    v.files
        .iter()
        .map(|f| (f.name.clone(), f.sha256.clone()))
        .collect()
}

/// Runs `f` on a blocking thread. A failure is reported, naming the check it failed, and
/// gives `None`.
async fn blocking_step<T: Send + 'static>(
    run: &mut Run,
    check: fn(&ModelError) -> &'static str,
    f: impl FnOnce() -> std::result::Result<T, ModelError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            let name = check(&e).to_string();
            run.fail(e, Some(name));
            None
        }
        Err(e) => {
            run.fail(format!("{:?} thread: {e}", run.phase), None);
            None
        }
    }
}

/// What a failure cools down: the source with the digests it was pinned to, so a reload of
/// the same source with other (correct) pins is never refused for a failure of these.
pub(super) fn cooldown_key(source: &str, pins: &BTreeMap<String, String>) -> String {
    let pins: Vec<String> = pins.iter().map(|(f, d)| format!("{f}={d}")).collect();
    format!("{source} [{}]", pins.join(", "))
}

/// Which source and digests a reload of `slot` uses when the request leaves them out.
fn pins_for(slot: &Slot, req: &ReloadRequest) -> (String, BTreeMap<String, String>) {
    let active = slot.active();
    let source = req
        .source
        .clone()
        .or_else(|| active.as_ref().map(|a| a.source.clone()))
        .unwrap_or_else(|| slot.spec.source.clone());
    if !req.sha256.is_empty() {
        return (source, req.sha256.clone());
    }
    match active {
        Some(a) if a.source == source => {
            let pins = a
                .files
                .iter()
                .map(|f| (f.name.clone(), f.sha256.clone()))
                .collect();
            (source, pins)
        }
        _ => (source, slot.spec.sha256.clone()),
    }
}

impl Reloader {
    /// Checks the request can start, then runs the reload in the background. Refusals that
    /// need no work (unknown model, a reload already running, a stale generation) are errors
    /// here; everything else is reported through the events.
    pub fn reload(&self, req: ReloadRequest) -> Result<mpsc::UnboundedReceiver<ReloadEvent>> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        let slot = self.registry.slot(&req.model)?;
        let guard = slot.reload_lock.clone().try_lock_owned().map_err(|_| {
            let st = slot.state();
            let what = match st.reloading {
                Some((phase, since)) => format!(
                    "in phase {phase:?}, running for {:.1} s",
                    since.elapsed().unwrap_or_default().as_secs_f64()
                ),
                None => "starting".into(),
            };
            Error::ReloadBusy(format!(
                "a reload of model `{}` is already running ({what}); one reload per model at a time",
                req.model
            ))
        })?;
        let (source, pins) = pins_for(&slot, &req);
        if let Some(&(n, at)) = slot.state().failures.get(&cooldown_key(&source, &pins)) {
            let left = self.cooldown.duration.saturating_sub(at.elapsed());
            if n >= self.cooldown.after_failures && !left.is_zero() && !req.force {
                return Err(Error::FailedPrecondition(format!(
                    "source `{source}` with these sha256 pins failed {n} reloads of model `{}` in a row; refused for another {} s unless forced",
                    req.model,
                    left.as_secs()
                )));
            }
        }
        if let Some(want) = req.expected_generation {
            let serving = slot.state().generation;
            if want != serving {
                return Err(Error::FailedPrecondition(format!(
                    "model `{}` serves generation {serving}, not the expected {want}",
                    req.model
                )));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        let span = tracing::info_span!(
            "reload",
            model = %req.model,
            action = if req.rollback { "rollback" } else { "reload" },
            actor = %req.actor,
        );
        tokio::spawn(
            async move {
                let _guard = guard;
                let action = if req.rollback { "rollback" } else { "reload" };
                let mut run = this.new_run(&slot, tx, action, &req);
                let phases = crate::panic::catch(this.run_reload(&mut run, &slot, &req)).await;
                this.after_panic(&mut run, &slot, phases);
                let watch = run.outcome.committed && req.keep_previous && !req.rollback;
                run.finish();
                if let (true, Some(cfg), Some(new)) = (watch, this.auto_rollback, slot.active()) {
                    tokio::spawn(
                        this.clone()
                            .watch_new_version(slot, Arc::downgrade(&new), cfg),
                    );
                }
            }
            .instrument(span),
        );
        Ok(rx)
    }

    /// A reload that panicked (a bug) ends as failed in the phase it was in, with its
    /// message, like any other failure: the caller gets a result, the audit log and the
    /// metrics a record. A model left suspended by the resource-preserving path resumes (its
    /// requests then see whatever is active rather than waiting for ever).
    fn after_panic(&self, run: &mut Run, slot: &Slot, r: std::result::Result<(), String>) {
        let Err(msg) = r else { return };
        tracing::error!(model = %slot.spec.name, phase = ?run.phase, panic = %msg, "the reload panicked");
        // A bug in swapd, not in the files: no cool-down.
        run.cools_down = false;
        if run.outcome.error.is_none() && !run.outcome.committed {
            run.fail(
                format!(
                    "internal error: the reload panicked in phase {}: {msg}; the serving version is untouched",
                    phase_name(run.phase)
                ),
                None,
            );
        } else if run.outcome.error.is_none() {
            run.outcome.error = Some(format!(
                "internal error after the swap, in phase {}: {msg}",
                phase_name(run.phase)
            ));
        }
        if slot.is_suspended() {
            slot.resume();
        }
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Shutdown begins: refuse new reloads and stop running ones before their swap.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for slot in self.registry.slots() {
            if let Some((phase, _)) = slot.state().reloading {
                tracing::warn!(model = %slot.spec.name, phase = ?phase, "shutting down during a reload: it stops before its swap and the committed version stays committed");
            }
        }
    }

    fn new_run(
        &self,
        slot: &Arc<Slot>,
        tx: mpsc::UnboundedSender<ReloadEvent>,
        action: &'static str,
        req: &ReloadRequest,
    ) -> Run {
        let (source, pins) = pins_for(slot, req);
        Run {
            slot: slot.clone(),
            tx,
            outcome: ReloadOutcome::default(),
            phase_started: Instant::now(),
            phase: Phase::Resolve,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            action,
            actor: req.actor.clone(),
            source,
            pins,
            cools_down: true,
        }
    }

    async fn run_reload(&self, run: &mut Run, slot: &Arc<Slot>, req: &ReloadRequest) {
        if let Some((spec, digests)) = self.resolve_verify(run, slot, req).await {
            match self.admit(run, &digests, req) {
                Admission::Fits => {
                    let serving = slot.active();
                    if let Some(new) = self.load_preflight(run, spec, digests, serving).await {
                        self.swap_drain_free(run, slot, new, req).await;
                    }
                }
                Admission::Preserve => self.preserving(run, slot, spec, digests, req).await,
                Admission::Refused => {}
            }
        }
    }
}
