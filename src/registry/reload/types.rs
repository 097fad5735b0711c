//! The reload's public vocabulary: phases, events, requests, outcomes and policies.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::preflight::CheckResult;
use crate::model::ModelVersion;

/// Default time requests on the old version get to finish.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A phase's name in metrics, logs and fault-injection points.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Resolve => "resolve",
        Phase::Verify => "verify",
        Phase::Admit => "admit",
        Phase::Load => "load",
        Phase::Preflight => "preflight",
        Phase::Swap => "swap",
        Phase::Drain => "drain",
        Phase::Free => "free",
    }
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 8] = [
        Phase::Resolve,
        Phase::Verify,
        Phase::Admit,
        Phase::Load,
        Phase::Preflight,
        Phase::Swap,
        Phase::Drain,
        Phase::Free,
    ];
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
    pub(super) fn new(
        phase: Phase,
        state: PhaseState,
        detail: impl Into<String>,
        elapsed: Duration,
    ) -> Self {
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
    pub(super) fn of(v: &ModelVersion) -> Self {
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
    /// What the free phase saw come back (process RSS on the CPU).
    pub bytes_released: i64,
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
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
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

/// Automatic rollback: for `window` after a swap that kept the previous version resident,
/// if at least `min_requests` finished on the new version and more than `max_error_rate` of
/// them failed for reasons of the version's own, swap back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRollback {
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_rate: f64,
}

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
