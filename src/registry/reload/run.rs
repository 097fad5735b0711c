//! One reload's run: sends its events, records its phase on the slot, and writes its audit
//! record when it ends.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::super::persist::{AuditRecord, StateStore};
use super::super::Slot;
use super::{phase_name, unix_ms, Phase, PhaseEvent, PhaseState, ReloadEvent, ReloadOutcome};

/// Sends events to whoever listens and records the phase on the slot.
pub(super) struct Run {
    pub(super) slot: Arc<Slot>,
    pub(super) tx: mpsc::UnboundedSender<ReloadEvent>,
    pub(super) outcome: ReloadOutcome,
    pub(super) phase_started: Instant,
    pub(super) phase: Phase,
    pub(super) store: Option<Arc<StateStore>>,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// For the audit record: what was asked, by whom, for which files.
    pub(super) action: &'static str,
    pub(super) actor: String,
    pub(super) source: String,
    pub(super) pins: BTreeMap<String, String>,
    /// Whether a failure of this run counts towards its source's cool-down (false when the
    /// failure says nothing about the files: wrong pins, the version already active, a
    /// state directory that cannot be written, shutdown).
    pub(super) cools_down: bool,
}

/// Debug builds only: `SWAPD_FAILPOINT=reload:PHASE` panics as that phase starts, so a test
/// can prove that a panic anywhere in a reload ends it as failed, with a result, an audit
/// line and metrics. Release builds have no failpoints.
fn failpoint(phase: Phase) {
    #[cfg(debug_assertions)]
    if let Ok(f) = std::env::var("SWAPD_FAILPOINT") {
        if f == format!("reload:{}", phase_name(phase)) {
            panic!("failpoint {f}");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = phase;
}

impl Run {
    pub(super) fn start(&mut self, phase: Phase, detail: impl Into<String>) {
        self.phase = phase;
        self.phase_started = Instant::now();
        self.slot.state().reloading = Some((phase, SystemTime::now()));
        failpoint(phase);
        self.emit(PhaseEvent::new(
            phase,
            PhaseState::Started,
            detail,
            Duration::ZERO,
        ));
    }

    pub(super) fn emit(&self, ev: PhaseEvent) {
        // Nobody listening (the caller disconnected) is fine: the reload goes on.
        let _ = self.tx.send(ReloadEvent::Phase(ev));
    }

    pub(super) fn event(&self, state: PhaseState, detail: impl Into<String>) -> PhaseEvent {
        PhaseEvent::new(self.phase, state, detail, self.phase_started.elapsed())
    }

    pub(super) fn done(&mut self, ev: PhaseEvent) {
        self.outcome.timings.push((self.phase, ev.elapsed));
        self.emit(ev);
    }

    /// Ends the reload at the current phase with `error`; the serving version is untouched.
    pub(super) fn fail(&mut self, error: impl std::fmt::Display, check: Option<String>) {
        let msg = crate::error::clean_message(&error.to_string());
        let ev = self.event(PhaseState::Failed, msg.clone());
        self.done(ev);
        self.outcome.error = Some(msg);
        self.outcome.failed_phase = Some(self.phase);
        self.outcome.failed_check = check;
    }

    /// The audit record of this run as it stands.
    pub(super) fn record(&self, stage: &str) -> AuditRecord {
        let o = &self.outcome;
        AuditRecord {
            at_unix_ms: unix_ms(),
            model: self.slot.spec.name.clone(),
            action: self.action.into(),
            stage: stage.into(),
            actor: self.actor.clone(),
            source: self.source.clone(),
            sha256: self.pins.clone(),
            from_version: o.previous.as_ref().map(|v| v.version.clone()),
            from_generation: o.previous.as_ref().map(|v| v.generation),
            to_version: o.version.as_ref().map(|v| v.version.clone()),
            to_generation: o.version.as_ref().map(|v| v.generation),
            committed: o.committed,
            error: o.error.clone(),
            failed_phase: o.failed_phase.map(|p| phase_name(p).to_string()),
            failed_check: o.failed_check.clone(),
            phases_ms: o
                .timings
                .iter()
                .map(|(p, d)| (phase_name(*p).to_string(), d.as_secs_f64() * 1e3))
                .collect(),
            cancelled_requests: o.cancelled_requests,
            previous_freed: o.previous_freed,
        }
    }

    pub(super) fn finish(mut self) {
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
        let key = super::cooldown_key(&self.source, &self.pins);
        if self.outcome.committed {
            st.failures.remove(&key);
        } else if self.cools_down {
            let entry = st.failures.entry(key).or_insert((0, Instant::now()));
            *entry = (entry.0 + 1, Instant::now());
        }
        drop(st);
        let o = &self.outcome;
        let sample = crate::metrics::ReloadSample {
            committed: o.committed,
            phases: o
                .timings
                .iter()
                .map(|(p, d)| (phase_name(*p), *d))
                .collect(),
            failed_check: o.failed_check.as_deref(),
            bytes_released: o.bytes_released,
        };
        self.metrics
            .reload_done(&self.slot.spec.name, self.action, &sample);
        if let Some(store) = &self.store {
            if let Err(e) = store.audit(&self.record("end")) {
                tracing::error!(error = %e, dir = %store.dir().display(), "cannot append to the audit log");
            }
        }
        let outcome = std::mem::take(&mut self.outcome);
        let _ = self.tx.send(ReloadEvent::Done(outcome));
    }
}
