//! The reload state machine: resolve → verify → admit → load → preflight → swap → drain →
//! free. The new version loads beside the serving one; one `ArcSwap` store makes it active
//! only after every check passed; a failure anywhere before the swap leaves the serving
//! version untouched. Each step is reported as an event; the reload runs to completion even
//! if nobody listens.

mod admission;
mod commit;
mod rollback;
mod run;
mod types;

pub use types::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use self::admission::Admission;
use self::run::Run;
use super::persist::{unix_ms, StateStore};
use super::{Registry, Slot};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::manifest::ModelSpec;
use crate::memory;
use crate::model::preflight;
use crate::model::{self, FileDigest, ModelError, ModelVersion, Resolver};

/// How often the drain looks at the in-flight count.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long the free phase waits for the last reference once the drain is over.
const FREE_WAIT: Duration = Duration::from_secs(5);

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

    /// resolve → verify: the spec to load and its verified files. `None` when a phase failed
    /// (reported).
    async fn resolve_verify(
        &self,
        run: &mut Run,
        slot: &Arc<Slot>,
        req: &ReloadRequest,
    ) -> Option<(ModelSpec, Vec<FileDigest>)> {
        let name = slot.spec.name.clone();
        let (source, pins) = pins_for(slot, req);

        run.start(Phase::Resolve, source.clone());
        let files = match self.resolver.resolve(&name, slot.spec.kind, &source).await {
            Ok(f) => f,
            Err(e) => {
                run.fail(e, None);
                return None;
            }
        };
        run.done(run.event(PhaseState::Done, format!("{} file(s)", files.len())));

        run.start(Phase::Verify, "sha256");
        let (n, p, device) = (name.clone(), pins.clone(), self.device.clone());
        // Verifying takes turns at the CPU with the serving version's passes (loading does
        // too, inside `load_verified`).
        let digests = blocking_step(
            run,
            |_| "sha256",
            move || {
                crate::turns::in_background(device.candle(), || {
                    model::verify::verify_files(&n, &files, &p)
                })
            },
        )
        .await;
        let Some(digests) = digests else {
            // Files that do not match their pins say nothing about the files: the pins
            // (the request's, or the manifest's) are wrong. No cool-down for that.
            run.cools_down = false;
            return None;
        };
        if let Some(active) = slot.active().filter(|a| !req.force && a.source == source) {
            let verified: BTreeMap<String, String> = digests
                .iter()
                .map(|d| (d.name.clone(), d.sha256.clone()))
                .collect();
            if verified == digests_of(&active) {
                run.cools_down = false;
                run.fail(
                    format!(
                        "model `{name}`: these files are version {} (generation {}), which is already active; nothing to do (a reload of it would replace the rollback target; set force to reload it anyway)",
                        active.version,
                        active.generation()
                    ),
                    Some("already_active".into()),
                );
                return None;
            }
        }
        run.done(run.event(PhaseState::Done, "every file matches its sha256"));
        let mut spec = slot.spec.clone();
        spec.source = source;
        spec.sha256 = pins;
        Some((spec, digests))
    }

    /// load → preflight against `serving`. `None` when a phase failed (reported).
    async fn load_preflight(
        &self,
        run: &mut Run,
        spec: ModelSpec,
        digests: Vec<FileDigest>,
        serving: Option<Arc<ModelVersion>>,
    ) -> Option<Arc<ModelVersion>> {
        let name = spec.name.clone();
        run.start(Phase::Load, format!("onto {}", self.device.label()));
        let checks = spec.preflight.clone();
        let device = self.device.clone();
        let new = blocking_step(run, ModelError::check_name, move || {
            model::load_verified(&spec, digests, &device, 0)
        })
        .await
        .map(Arc::new)?;
        run.done(run.event(
            PhaseState::Done,
            format!(
                "version {} ({} bytes of weights)",
                new.version, new.weight_bytes
            ),
        ));

        run.start(Phase::Preflight, "");
        let tx = run.tx.clone();
        let (new2, phase_started) = (new.clone(), run.phase_started);
        let results = tokio::task::spawn_blocking(move || {
            preflight::run(&new2, serving.as_deref(), &checks, &mut |c| {
                let mut ev = PhaseEvent::new(
                    Phase::Preflight,
                    PhaseState::Progress,
                    format!("{}: {}", c.name, c.detail),
                    phase_started.elapsed(),
                );
                ev.check = Some(c.clone());
                let _ = tx.send(ReloadEvent::Phase(ev));
            })
        })
        .await;
        match results {
            Ok(results) => {
                if let Some(bad) = results.iter().find(|c| !c.passed) {
                    run.fail(
                        format!(
                            "model `{name}`: preflight check `{}` failed: {}",
                            bad.name, bad.detail
                        ),
                        Some(bad.name.clone()),
                    );
                    return None;
                }
                run.done(run.event(PhaseState::Done, format!("{} checks passed", results.len())));
            }
            Err(e) => {
                run.fail(format!("preflight thread: {e}"), Some("preflight".into()));
                return None;
            }
        }
        Some(new)
    }

    /// swap → drain → free. The swap is one atomic store and cannot fail.
    async fn swap_drain_free(
        &self,
        run: &mut Run,
        slot: &Arc<Slot>,
        new: Arc<ModelVersion>,
        req: &ReloadRequest,
    ) {
        if self.is_stopping() {
            run.cools_down = false;
            run.fail(
                "the server is shutting down: reload abandoned before the swap; the serving version stays committed",
                None,
            );
            return;
        }
        let Ok(old) = self.swap_phase(run, slot, new) else {
            return;
        };
        run.outcome.previous = old.as_deref().map(VersionName::of);
        let Some(old) = old else {
            run.outcome.previous_freed = true;
            return;
        };
        let left = self.drain(run, &old, req).await;
        self.free(run, slot, old, req.keep_previous, left).await;
    }

    /// Waits for the requests still on `old`; returns how many are left (WAIT past the
    /// deadline), after ending them at the deadline under CANCEL.
    async fn drain(&self, run: &mut Run, old: &ModelVersion, req: &ReloadRequest) -> u64 {
        run.start(Phase::Drain, format!("{} in flight", old.in_flight()));
        let deadline = req.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
        let mut last = u64::MAX;
        let mut cancelled = false;
        loop {
            let n = old.in_flight();
            if n != last {
                let mut ev = run.event(PhaseState::Progress, format!("{n} in flight"));
                ev.in_flight = n;
                run.emit(ev);
                last = n;
            }
            if n == 0 {
                break;
            }
            if run.phase_started.elapsed() >= deadline && !cancelled {
                match req.drain_policy {
                    DrainPolicy::Cancel => {
                        old.cancel();
                        cancelled = true;
                        run.outcome.cancelled_requests = n;
                    }
                    DrainPolicy::Wait => break,
                }
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let left = old.in_flight();
        let mut ev = run.event(
            PhaseState::Done,
            match (left, cancelled) {
                (0, false) => "drained".to_string(),
                (0, true) => format!(
                    "{} straggler(s) ended after the deadline",
                    run.outcome.cancelled_requests
                ),
                (n, _) => {
                    format!("{n} straggler(s) still running past the deadline; freed when they end")
                }
            },
        );
        ev.in_flight = left;
        run.done(ev);
        left
    }

    /// Drops `old` (or keeps it as the standby) and reports the memory that came back.
    async fn free(
        &self,
        run: &mut Run,
        slot: &Slot,
        old: Arc<ModelVersion>,
        keep: bool,
        left: u64,
    ) {
        run.start(Phase::Free, "");
        // A standby older than the version just replaced is never rolled back to: free it.
        let older = slot.standby.swap(None);
        if keep {
            let bytes = old.weight_bytes;
            slot.standby.store(Some(old));
            drop(older);
            run.done(run.event(
                PhaseState::Done,
                format!("previous version kept resident as standby ({bytes} bytes)"),
            ));
            return;
        }
        let device = self.device.clone();
        let used_before = device.memory().used_bytes();
        // Not the strong count: it reaches 0 before the last holder's destructor has run
        // (and queued the frees); the version's drop signal fires after its weights dropped.
        let mut dropped = old.drop_watch();
        drop(old);
        drop(older);
        if left == 0 {
            dropped.dropped_within(FREE_WAIT).await;
        }
        // On a GPU the trim synchronizes the device: off the async threads.
        let (released, free_total) =
            tokio::task::spawn_blocking(move || memory::reclaimed(device.memory(), used_before))
                .await
                .unwrap_or((0, None));
        let freed = dropped.is_dropped();
        run.outcome.previous_freed = freed;
        let on = match free_total {
            Some((free, total)) => format!("{}: {free} of {total} bytes free", self.device.label()),
            None => self.device.label(),
        };
        let mut ev = run.event(
            PhaseState::Done,
            if freed {
                format!("previous version freed; {released} bytes came back ({on})")
            } else {
                format!(
                    "previous version still referenced by running requests; freed when they end ({on})"
                )
            },
        );
        ev.bytes_released = released;
        // Only a version that really went away gave memory back; an RSS delta while it is
        // still referenced is noise.
        if freed {
            run.outcome.bytes_released = released;
        }
        run.done(ev);
    }
}
