//! The reload state machine: resolve → verify → admit → load → preflight → swap → drain →
//! free. The new version loads beside the serving one; one `ArcSwap` store makes it active
//! only after every check passed; a failure anywhere before the swap leaves the serving
//! version untouched. Each step is reported as an event; the reload runs to completion even
//! if nobody listens.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::persist::{AuditRecord, Committed, StateStore};
use super::{PreviousVersion, Registry, Slot};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::manifest::ModelSpec;
use crate::memory;
use crate::model::preflight::{self, CheckResult};
use crate::model::{self, FileDigest, ModelError, ModelVersion, Resolver};

/// Default time requests on the old version get to finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the drain looks at the in-flight count.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long the free phase waits for the last reference once the drain is over.
const FREE_WAIT: Duration = Duration::from_secs(5);

/// The steps of a reload, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Resolve,
    Verify,
    Admit,
    Load,
    Preflight,
    Swap,
    Drain,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseState {
    Started,
    Progress,
    Done,
    Failed,
}

/// What happens to requests still on the old version when the drain deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainPolicy {
    /// Let them finish; the old version is freed when the last one ends.
    #[default]
    Wait,
    /// End them at their next token with UNAVAILABLE.
    Cancel,
}

/// One step's progress.
#[derive(Debug, Clone)]
pub struct PhaseEvent {
    pub phase: Phase,
    pub state: PhaseState,
    pub detail: String,
    pub elapsed: Duration,
    pub check: Option<CheckResult>,
    pub in_flight: u64,
    pub bytes_released: i64,
    pub bytes_needed: u64,
    pub bytes_available: u64,
}

impl PhaseEvent {
    fn new(phase: Phase, state: PhaseState, detail: impl Into<String>, elapsed: Duration) -> Self {
        Self {
            phase,
            state,
            detail: detail.into(),
            elapsed,
            check: None,
            in_flight: 0,
            bytes_released: 0,
            bytes_needed: 0,
            bytes_available: 0,
        }
    }
}

/// A version as the outcome names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionName {
    pub model: String,
    pub version: String,
    pub generation: u64,
}

impl VersionName {
    fn of(v: &ModelVersion) -> Self {
        Self {
            model: v.name.clone(),
            version: v.version.clone(),
            generation: v.generation(),
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, Default)]
pub struct ReloadOutcome {
    pub committed: bool,
    pub version: Option<VersionName>,
    pub previous: Option<VersionName>,
    pub timings: Vec<(Phase, Duration)>,
    pub error: Option<String>,
    pub failed_check: Option<String>,
    pub failed_phase: Option<Phase>,
    pub previous_freed: bool,
    pub cancelled_requests: u64,
}

/// A reload's stream of events: phases, then one `Done`.
#[derive(Debug, Clone)]
pub enum ReloadEvent {
    Phase(PhaseEvent),
    Done(ReloadOutcome),
}

/// What to reload.
#[derive(Debug, Clone, Default)]
pub struct ReloadRequest {
    pub model: String,
    /// New source; `None` reloads the active version's source.
    pub source: Option<String>,
    /// Expected digests; empty uses the active version's (same source) or the manifest's.
    pub sha256: BTreeMap<String, String>,
    pub expected_generation: Option<u64>,
    pub drain_timeout: Option<Duration>,
    pub drain_policy: DrainPolicy,
    pub keep_previous: bool,
    /// Who asked (for the audit log).
    pub actor: String,
    /// Set by [`Reloader::rollback`] when it reloads the previous version's files.
    pub rollback: bool,
    /// Reload even while the source is cooling down after repeated failures.
    pub force: bool,
    /// `None` uses the server's default.
    pub memory_policy: Option<MemoryPolicy>,
}

/// What a reload does when the new version does not fit beside the serving one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPolicy {
    /// Refuse the reload (RESOURCE_EXHAUSTED).
    #[default]
    Refuse,
    /// Drain and free the old version first, then load the new one; requests for the model
    /// wait in the admission queue meanwhile. If the new version fails, the old one is
    /// loaded back.
    ResourcePreserving,
}

/// The admit phase's decision.
enum Admission {
    Fits,
    Preserve,
    Refused,
}

/// Automatic rollback: for `window` after a swap that kept the previous version resident,
/// if at least `min_requests` finished on the new version and more than `max_error_rate` of
/// them failed for reasons of the version's own, swap back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRollback {
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_rate: f64,
}

/// How often the automatic-rollback watch looks at the new version's counters.
const AUTO_ROLLBACK_POLL: Duration = Duration::from_millis(50);

/// After this many consecutive failed reloads of one source, refuse it for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    pub after_failures: u32,
    pub duration: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            after_failures: 3,
            duration: Duration::from_secs(300),
        }
    }
}

/// Starts reloads and rollbacks. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    pub registry: Arc<Registry>,
    pub resolver: Resolver,
    pub device: Device,
    /// Where committed versions and the audit log go; `None` keeps nothing across restarts.
    pub store: Option<Arc<StateStore>>,
    pub cooldown: Cooldown,
    /// Most bytes of weights resident at once (all models, standbys included), if limited.
    pub budget: Option<u64>,
    pub memory_policy: MemoryPolicy,
    /// `None`: no automatic rollback.
    pub auto_rollback: Option<AutoRollback>,
}

/// Sends events to whoever listens and records the phase on the slot.
struct Run {
    slot: Arc<Slot>,
    tx: mpsc::UnboundedSender<ReloadEvent>,
    outcome: ReloadOutcome,
    phase_started: Instant,
    phase: Phase,
    store: Option<Arc<StateStore>>,
    /// For the audit record: what was asked, by whom, for which files.
    action: &'static str,
    actor: String,
    source: String,
    pins: BTreeMap<String, String>,
}

impl Run {
    fn start(&mut self, phase: Phase, detail: impl Into<String>) {
        self.phase = phase;
        self.phase_started = Instant::now();
        self.slot.state().reloading = Some((phase, SystemTime::now()));
        self.emit(PhaseEvent::new(
            phase,
            PhaseState::Started,
            detail,
            Duration::ZERO,
        ));
    }

    fn emit(&self, ev: PhaseEvent) {
        // Nobody listening (the caller disconnected) is fine: the reload goes on.
        let _ = self.tx.send(ReloadEvent::Phase(ev));
    }

    fn event(&self, state: PhaseState, detail: impl Into<String>) -> PhaseEvent {
        PhaseEvent::new(self.phase, state, detail, self.phase_started.elapsed())
    }

    fn done(&mut self, ev: PhaseEvent) {
        self.outcome.timings.push((self.phase, ev.elapsed));
        self.emit(ev);
    }

    /// Ends the reload at the current phase with `error`; the serving version is untouched.
    fn fail(&mut self, error: impl std::fmt::Display, check: Option<String>) {
        let msg = error.to_string();
        let ev = self.event(PhaseState::Failed, msg.clone());
        self.done(ev);
        self.outcome.error = Some(msg);
        self.outcome.failed_phase = Some(self.phase);
        self.outcome.failed_check = check;
    }

    fn finish(mut self) {
        if let Some(e) = &self.outcome.error {
            tracing::warn!(model = %self.slot.spec.name, phase = ?self.phase, error = %e, "reload failed");
        } else {
            tracing::info!(
                model = %self.slot.spec.name,
                version = ?self.outcome.version.as_ref().map(|v| &v.version),
                "reload committed"
            );
        }
        let mut st = self.slot.state();
        st.reloading = None;
        st.last_result = Some(self.outcome.clone());
        if self.outcome.committed {
            st.failures.remove(&self.source);
        } else {
            let entry = st
                .failures
                .entry(self.source.clone())
                .or_insert((0, Instant::now()));
            *entry = (entry.0 + 1, Instant::now());
        }
        drop(st);
        if let Some(store) = &self.store {
            let o = &self.outcome;
            let record = AuditRecord {
                at_unix_ms: unix_ms(),
                model: self.slot.spec.name.clone(),
                action: self.action.into(),
                actor: self.actor.clone(),
                source: self.source.clone(),
                sha256: self.pins.clone(),
                from_version: o.previous.as_ref().map(|v| v.version.clone()),
                from_generation: o.previous.as_ref().map(|v| v.generation),
                to_version: o.version.as_ref().map(|v| v.version.clone()),
                to_generation: o.version.as_ref().map(|v| v.generation),
                committed: o.committed,
                error: o.error.clone(),
                failed_phase: o.failed_phase.map(|p| format!("{p:?}").to_lowercase()),
                failed_check: o.failed_check.clone(),
                phases_ms: o
                    .timings
                    .iter()
                    .map(|(p, d)| (format!("{p:?}").to_lowercase(), d.as_secs_f64() * 1e3))
                    .collect(),
                cancelled_requests: o.cancelled_requests,
                previous_freed: o.previous_freed,
            };
            if let Err(e) = store.audit(&record) {
                tracing::error!(error = %e, dir = %store.dir().display(), "cannot append to the audit log");
            }
        }
        let outcome = std::mem::take(&mut self.outcome);
        let _ = self.tx.send(ReloadEvent::Done(outcome));
    }
}

/// A version's file digests by name.
fn digests_of(v: &ModelVersion) -> BTreeMap<String, String> {
    v.files
        .iter()
        .map(|f| (f.name.clone(), f.sha256.clone()))
        .collect()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
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
        let (source, _) = pins_for(&slot, &req);
        if let Some(&(n, at)) = slot.state().failures.get(&source) {
            let left = self.cooldown.duration.saturating_sub(at.elapsed());
            if n >= self.cooldown.after_failures && !left.is_zero() && !req.force {
                return Err(Error::FailedPrecondition(format!(
                    "source `{source}` of model `{}` failed {n} reloads in a row; refused for another {} s unless forced",
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
        tokio::spawn(async move {
            let _guard = guard;
            this.run_reload(slot, req, tx).await;
        });
        Ok(rx)
    }

    /// Makes the previous version active again: at once if it is resident, else by
    /// reloading its files through every check.
    pub fn rollback(
        &self,
        model: &str,
        drain_timeout: Option<Duration>,
        drain_policy: DrainPolicy,
        actor: &str,
    ) -> Result<mpsc::UnboundedReceiver<ReloadEvent>> {
        let slot = self.registry.slot(model)?;
        if let Some(standby) = slot.standby() {
            let guard = slot.reload_lock.clone().try_lock_owned().map_err(|_| {
                Error::ReloadBusy(format!("a reload of model `{model}` is already running"))
            })?;
            let (tx, rx) = mpsc::unbounded_channel();
            let this = self.clone();
            let req = ReloadRequest {
                model: model.to_string(),
                source: Some(standby.source.clone()),
                sha256: standby
                    .files
                    .iter()
                    .map(|f| (f.name.clone(), f.sha256.clone()))
                    .collect(),
                drain_timeout,
                drain_policy,
                keep_previous: true,
                actor: actor.to_string(),
                ..Default::default()
            };
            tokio::spawn(async move {
                let _guard = guard;
                let mut run = this.new_run(&slot, tx, "rollback", &req);
                slot.standby.store(None);
                this.swap_drain_free(&mut run, &slot, standby, &req).await;
                run.finish();
            });
            return Ok(rx);
        }
        let prev = slot.state().previous.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "model `{model}` has no previous version to roll back to"
            ))
        })?;
        self.reload(ReloadRequest {
            model: model.to_string(),
            source: Some(prev.source),
            sha256: prev.sha256,
            drain_timeout,
            drain_policy,
            actor: actor.to_string(),
            rollback: true,
            ..Default::default()
        })
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
            action,
            actor: req.actor.clone(),
            source,
            pins,
        }
    }

    async fn run_reload(
        &self,
        slot: Arc<Slot>,
        req: ReloadRequest,
        tx: mpsc::UnboundedSender<ReloadEvent>,
    ) {
        let action = if req.rollback { "rollback" } else { "reload" };
        let mut run = self.new_run(&slot, tx, action, &req);
        if let Some((spec, digests)) = self.resolve_verify(&mut run, &slot, &req).await {
            match self.admit(&mut run, &digests, &req) {
                Admission::Fits => {
                    let serving = slot.active();
                    if let Some(new) = self.load_preflight(&mut run, spec, digests, serving).await {
                        self.swap_drain_free(&mut run, &slot, new, &req).await;
                    }
                }
                Admission::Preserve => self.preserving(&mut run, &slot, spec, digests, &req).await,
                Admission::Refused => {}
            }
        }
        let watch = run.outcome.committed && req.keep_previous && !req.rollback;
        run.finish();
        if let (true, Some(cfg), Some(new)) = (watch, self.auto_rollback, slot.active()) {
            tokio::spawn(
                self.clone()
                    .watch_new_version(slot, Arc::downgrade(&new), cfg),
            );
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
        let (n, p) = (name.clone(), pins.clone());
        let digests = blocking_step(
            run,
            |_| "sha256",
            move || model::verify::verify_files(&n, &files, &p),
        )
        .await?;
        run.done(run.event(PhaseState::Done, "every file matches its sha256"));
        let mut spec = slot.spec.clone();
        spec.source = source;
        spec.sha256 = pins;
        Some((spec, digests))
    }

    /// Whether the new version fits beside what is resident (MemAvailable and the budget).
    fn admit(&self, run: &mut Run, digests: &[FileDigest], req: &ReloadRequest) -> Admission {
        run.start(Phase::Admit, "");
        let name = run.slot.spec.name.clone();
        let needed = match model::estimate_bytes(run.slot.spec.kind, digests) {
            Ok(n) => n,
            Err(e) => {
                run.fail(e, Some("format".into()));
                return Admission::Refused;
            }
        };
        let available = memory::available_bytes().unwrap_or(u64::MAX);
        let resident = self.registry.resident_bytes();
        let over_budget = self.budget.is_some_and(|b| resident + needed > b);
        let mut ev = run.event(PhaseState::Done, "");
        ev.bytes_needed = needed;
        ev.bytes_available = available;
        if needed <= available && !over_budget {
            ev.detail =
                format!("needs ~{needed} bytes; {available} available, {resident} resident");
            run.done(ev);
            return Admission::Fits;
        }
        let why = if over_budget {
            format!(
                "the new version needs ~{needed} bytes; with {resident} resident that passes the memory budget of {} bytes",
                self.budget.unwrap_or_default()
            )
        } else {
            format!("the new version needs ~{needed} bytes but only {available} are available")
        };
        match req.memory_policy.unwrap_or(self.memory_policy) {
            MemoryPolicy::Refuse => {
                run.fail(Error::OutOfMemory(format!("model `{name}`: {why}")), None);
                Admission::Refused
            }
            MemoryPolicy::ResourcePreserving => {
                ev.detail =
                    format!("{why}: resource-preserving, the old version drains and frees first");
                run.done(ev);
                Admission::Preserve
            }
        }
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
        run.start(Phase::Swap, "");
        let old = self.activate(slot, &new);
        run.outcome.committed = true;
        run.outcome.version = Some(VersionName::of(&new));
        run.outcome.previous = old.as_deref().map(VersionName::of);
        run.done(run.event(
            PhaseState::Done,
            format!(
                "generation {} (version {}) is active",
                new.generation(),
                new.version
            ),
        ));
        drop(new);
        let Some(old) = old else {
            run.outcome.previous_freed = true;
            return;
        };
        let left = self.drain(run, &old, req).await;
        self.free(run, slot, old, req.keep_previous, left).await;
    }

    /// The resource-preserving path: drain and free the old version, then load the new one
    /// while requests for the model wait; if the new one fails, load the old one back.
    async fn preserving(
        &self,
        run: &mut Run,
        slot: &Arc<Slot>,
        spec: ModelSpec,
        digests: Vec<FileDigest>,
        req: &ReloadRequest,
    ) {
        let old = slot.suspend();
        let old_spec = old.as_ref().map(|o| {
            let mut s = slot.spec.clone();
            s.source = o.source.clone();
            s.sha256 = digests_of(o);
            s
        });
        if let Some(old) = old {
            let left = self.drain(run, &old, req).await;
            run.outcome.previous = Some(VersionName::of(&old));
            self.free(run, slot, old, false, left).await;
        }
        if let Some(new) = self.load_preflight(run, spec, digests, None).await {
            run.start(Phase::Swap, "");
            self.activate(slot, &new);
            run.outcome.committed = true;
            run.outcome.version = Some(VersionName::of(&new));
            run.done(run.event(
                PhaseState::Done,
                format!(
                    "generation {} (version {}) is active",
                    new.generation(),
                    new.version
                ),
            ));
            return;
        }
        let Some(old_spec) = old_spec else {
            slot.resume();
            return;
        };
        // The new version failed: the old one comes back, through the same loader.
        let failure = run.outcome.error.clone().unwrap_or_default();
        run.start(Phase::Load, "loading the previous version back");
        match crate::server::load(&old_spec, &self.resolver, &self.device, 0).await {
            Ok(v) => {
                self.activate(slot, &v);
                run.done(run.event(
                    PhaseState::Done,
                    format!(
                        "previous version {} is active again (generation {})",
                        v.version,
                        v.generation()
                    ),
                ));
                run.outcome.error = Some(format!(
                    "{failure}; the previous version {} was loaded back",
                    v.version
                ));
            }
            Err(e) => {
                slot.resume();
                run.fail(
                    format!(
                        "{failure}; loading the previous version back failed too: {e}; model `{}` has no active version",
                        slot.spec.name
                    ),
                    None,
                );
            }
        }
    }

    /// Watches a freshly swapped-in version and rolls back to the resident standby when its
    /// error rate passes the threshold within the window.
    async fn watch_new_version(
        self,
        slot: Arc<Slot>,
        version: std::sync::Weak<ModelVersion>,
        cfg: AutoRollback,
    ) {
        let started = Instant::now();
        while started.elapsed() < cfg.window {
            tokio::time::sleep(AUTO_ROLLBACK_POLL).await;
            let Some(v) = version.upgrade() else { return };
            if !slot.active().is_some_and(|a| Arc::ptr_eq(&a, &v)) {
                return;
            }
            let (ok, failed) = v.outcomes();
            let n = ok + failed;
            if n < cfg.min_requests || (failed as f64) <= cfg.max_error_rate * n as f64 {
                continue;
            }
            let why = format!(
                "automatic rollback: {failed} of {n} requests failed on version {} (generation {}) within {:.1} s of its swap; threshold {:.0}%",
                v.version,
                v.generation(),
                started.elapsed().as_secs_f64(),
                cfg.max_error_rate * 100.0
            );
            drop(v);
            tracing::warn!(model = %slot.spec.name, reason = %why, "rolling back");
            slot.state().auto_rollback = Some(why.clone());
            match self.rollback(&slot.spec.name, None, DrainPolicy::Wait, &why) {
                Ok(mut events) => while events.recv().await.is_some() {},
                Err(e) => {
                    tracing::error!(model = %slot.spec.name, error = %e, "automatic rollback not started")
                }
            }
            return;
        }
    }

    /// Makes `new` active with the next generation, records the version it replaced (for
    /// rollback) and persists the commit. Returns the replaced version.
    fn activate(&self, slot: &Slot, new: &Arc<ModelVersion>) -> Option<Arc<ModelVersion>> {
        let old = {
            let mut st = slot.state();
            st.generation += 1;
            new.set_generation(st.generation);
            let old = slot.activate(new.clone());
            if let Some(o) = &old {
                st.previous = Some(PreviousVersion {
                    version: o.version.clone(),
                    generation: o.generation(),
                    source: o.source.clone(),
                    sha256: digests_of(o),
                });
            }
            old
        };
        if let Some(store) = &self.store {
            let committed = Committed {
                source: new.source.clone(),
                sha256: digests_of(new),
                version: new.version.clone(),
                generation: new.generation(),
                committed_at_unix_ms: unix_ms(),
            };
            if let Err(e) = store.commit(&slot.spec.name, committed) {
                tracing::error!(model = %slot.spec.name, error = %e, "the swap is live but could not be recorded; a restart would serve the previous commit");
            }
        }
        old
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
        let rss_before = memory::rss_bytes();
        let weak = Arc::downgrade(&old);
        drop(old);
        drop(older);
        let waited = Instant::now();
        while weak.strong_count() > 0 && waited.elapsed() < FREE_WAIT && left == 0 {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        memory::trim();
        let freed = weak.upgrade().is_none();
        let released = rss_before as i64 - memory::rss_bytes() as i64;
        run.outcome.previous_freed = freed;
        let mut ev = run.event(
            PhaseState::Done,
            if freed {
                format!("previous version freed; RSS down {released} bytes")
            } else {
                "previous version still referenced by running requests; freed when they end".into()
            },
        );
        ev.bytes_released = released;
        run.done(ev);
    }
}
