//! Which version of each model is active. A slot holds the active version in an `ArcSwap`;
//! a request takes the `Arc` once, at admission, through a [`Lease`] that it keeps until its
//! last byte, so a request is served wholly by one version however often the slot changes.
//! [`reload`] replaces versions.
pub mod persist;
pub mod reload;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwapOption;

use crate::error::{Error, Result};
use crate::manifest::ModelSpec;
use crate::model::{ModelKind, ModelVersion};

/// What rollback returns to when the previous version is no longer resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousVersion {
    pub version: String,
    pub generation: u64,
    pub source: String,
    /// Digests by file name, to reload exactly those files.
    pub sha256: BTreeMap<String, String>,
}

/// A slot's reload bookkeeping (behind a mutex: touched once per phase, never per request).
#[derive(Debug, Default)]
pub struct SlotState {
    /// The generation of the last activation.
    pub generation: u64,
    pub previous: Option<PreviousVersion>,
    /// The phase of the reload in progress, with when it started.
    pub reloading: Option<(reload::Phase, std::time::SystemTime)>,
    pub last_result: Option<reload::ReloadOutcome>,
    /// Why the last automatic rollback happened.
    pub auto_rollback: Option<String>,
    /// Consecutive failed reloads by source, with when the last one failed.
    pub failures: std::collections::HashMap<String, (u32, std::time::Instant)>,
}

/// One served model name, its active version and its reload state.
pub struct Slot {
    pub spec: ModelSpec,
    active: ArcSwapOption<ModelVersion>,
    /// The previous version kept resident for instant rollback (`keep_previous`).
    standby: ArcSwapOption<ModelVersion>,
    pub state: Mutex<SlotState>,
    /// Held by the one reload (or rollback) of this model that may run.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set while a resource-preserving reload has no version active: requests wait.
    suspended: std::sync::atomic::AtomicBool,
    /// Wakes requests waiting for a version.
    changed: tokio::sync::Notify,
    /// Every version activated here that may still be alive (active, standby, draining), for
    /// the metrics; entries whose version is gone are pruned when read.
    tracked: Mutex<Vec<Tracked>>,
    /// Bumped whenever what the slot serves changes (health follows it).
    serving: Arc<tokio::sync::watch::Sender<u64>>,
}

/// A version as the metrics see it: a `Weak` (never upgraded there, so a scrape cannot keep
/// weights alive) and copies of what the labels need.
#[derive(Clone)]
pub struct Tracked {
    pub version: std::sync::Weak<ModelVersion>,
    pub name: String,
    pub generation: u64,
    pub device: String,
    pub weight_bytes: u64,
    pub stats: Arc<crate::model::VersionStats>,
}

/// What a tracked version is to its slot right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
    /// Replaced, still held by requests or a reload.
    Retiring,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Retiring => "retiring",
        }
    }
}

impl Slot {
    /// The resident standby version, if any.
    pub fn standby(&self) -> Option<Arc<ModelVersion>> {
        self.standby.load_full()
    }

    /// Locks the slot's reload bookkeeping (a poisoned lock still holds valid data).
    pub fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The active version, if any (one atomic load; never blocks a swap).
    pub fn active(&self) -> Option<Arc<ModelVersion>> {
        self.active.load_full()
    }

    /// Makes `version` active and returns the version it replaced; wakes waiting requests.
    pub fn activate(&self, version: Arc<ModelVersion>) -> Option<Arc<ModelVersion>> {
        self.track(&version);
        let old = self.active.swap(Some(version));
        self.resume();
        old
    }

    fn track(&self, v: &Arc<ModelVersion>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|t| t.version.strong_count() > 0);
        let entry = Tracked {
            version: Arc::downgrade(v),
            name: v.version.clone(),
            generation: v.generation(),
            device: v.device(),
            weight_bytes: v.weight_bytes,
            stats: v.stats().clone(),
        };
        match tracked
            .iter_mut()
            .find(|t| std::ptr::eq(t.version.as_ptr(), Arc::as_ptr(v)))
        {
            Some(t) => *t = entry,
            None => tracked.push(entry),
        }
    }

    /// The versions of this slot still alive, each with its role.
    pub fn live_versions(&self) -> Vec<(Tracked, Role)> {
        let active = self.active.load();
        let standby = self.standby.load();
        let is = |v: &Option<Arc<ModelVersion>>, t: &Tracked| {
            v.as_ref()
                .is_some_and(|v| std::ptr::eq(Arc::as_ptr(v), t.version.as_ptr()))
        };
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.retain(|t| t.version.strong_count() > 0);
        tracked
            .iter()
            .map(|t| {
                let role = if is(&active, t) {
                    Role::Active
                } else if is(&standby, t) {
                    Role::Standby
                } else {
                    Role::Retiring
                };
                (t.clone(), role)
            })
            .collect()
    }

    /// True while a version is active and the slot is not suspended.
    pub fn is_serving(&self) -> bool {
        self.active.load().is_some() && !self.suspended.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes the active version away; requests for the model wait (bounded by admission and
    /// their deadlines) until [`Slot::activate`] or [`Slot::resume`].
    pub fn suspend(&self) -> Option<Arc<ModelVersion>> {
        self.suspended
            .store(true, std::sync::atomic::Ordering::Release);
        let old = self.active.swap(None);
        self.serving.send_modify(|n| *n += 1);
        old
    }

    /// Whether a resource-preserving reload has the model suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Ends a suspension (waiting requests then see whatever is active).
    pub fn resume(&self) {
        self.suspended
            .store(false, std::sync::atomic::Ordering::Release);
        self.changed.notify_waiters();
        self.serving.send_modify(|n| *n += 1);
    }
}

/// A request's hold on one version: counts as in flight on it until dropped.
pub struct Lease {
    version: Arc<ModelVersion>,
}

impl Lease {
    fn new(version: Arc<ModelVersion>) -> Self {
        version.enter();
        Self { version }
    }

    /// The version this request is served by.
    pub fn version(&self) -> &Arc<ModelVersion> {
        &self.version
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.version.exit();
    }
}

impl std::ops::Deref for Lease {
    type Target = ModelVersion;
    fn deref(&self) -> &ModelVersion {
        &self.version
    }
}

/// All served models, in manifest order.
pub struct Registry {
    // A read lock per request is uncontended: writers only add model names, which is rare.
    slots: RwLock<Vec<Arc<Slot>>>,
    /// Bumped when a model is added or what a slot serves changes.
    serving: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            slots: RwLock::default(),
            serving: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Registry {
    /// Adds a slot for `spec` (no version yet) and returns it; an existing slot is returned as is.
    pub fn slot_for(&self, spec: &ModelSpec) -> Arc<Slot> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.iter().find(|s| s.spec.name == spec.name) {
            return s.clone();
        }
        let slot = Arc::new(Slot {
            spec: spec.clone(),
            active: ArcSwapOption::empty(),
            standby: ArcSwapOption::empty(),
            state: Mutex::new(SlotState::default()),
            reload_lock: Arc::new(tokio::sync::Mutex::new(())),
            suspended: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            tracked: Mutex::new(Vec::new()),
            serving: self.serving.clone(),
        });
        slots.push(slot.clone());
        self.serving.send_modify(|n| *n += 1);
        slot
    }

    /// Removes the slot named `name` (requests already holding its versions keep them).
    pub fn remove(&self, name: &str) -> Option<Arc<Slot>> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let i = slots.iter().position(|s| s.spec.name == name)?;
        let slot = slots.remove(i);
        self.serving.send_modify(|n| *n += 1);
        Some(slot)
    }

    /// Changes whenever a model is added or what a slot serves changes.
    pub fn watch_serving(&self) -> tokio::sync::watch::Receiver<u64> {
        self.serving.subscribe()
    }

    /// The slot named `name`.
    pub fn slot(&self, name: &str) -> Result<Arc<Slot>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|s| s.spec.name == name)
            .cloned()
            .ok_or_else(|| Error::UnknownModel(name.to_string()))
    }

    /// Every slot, in manifest order.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bytes of weights held by every active and standby version.
    /// Bytes the resident versions may hold: their weights, and for language models a KV
    /// cache budget of `kv_tokens` tokens each.
    pub fn resident_bytes(&self, kv_tokens: usize) -> u64 {
        self.slots()
            .iter()
            .flat_map(|s| [s.active(), s.standby()])
            .flatten()
            .map(|v| {
                let kv = match &v.model {
                    crate::model::LoadedModel::Llm(l) => l.kv_bytes_per_token() * kv_tokens,
                    crate::model::LoadedModel::Embedding(_) => 0,
                };
                v.weight_bytes + kv as u64
            })
            .sum()
    }

    /// Like [`Registry::lease`], but while a resource-preserving reload has the model
    /// suspended, waits for its next version until `deadline`.
    pub async fn lease_wait(
        &self,
        name: &str,
        kind: ModelKind,
        rpc: &'static str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Lease> {
        let slot = self.slot(name)?;
        loop {
            let notified = slot.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up between the two is not lost.
            notified.as_mut().enable();
            match self.lease(name, kind, rpc) {
                Err(Error::NotReady(_))
                    if slot.suspended.load(std::sync::atomic::Ordering::Acquire) => {}
                other => return other,
            }
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), notified)
                    .await
                    .map_err(|_| {
                        Error::DeadlineWaiting(format!(
                            "waiting for model `{name}` to finish reloading"
                        ))
                    })?,
                None => notified.await,
            }
        }
    }

    /// Leases the active version of `name`, which must be of `kind` for `rpc`.
    pub fn lease(&self, name: &str, kind: ModelKind, rpc: &'static str) -> Result<Lease> {
        let slot = self.slot(name)?;
        if slot.spec.kind != kind {
            return Err(Error::WrongKind {
                model: name.to_string(),
                rpc,
                expected: kind.as_str(),
                actual: slot.spec.kind.as_str(),
            });
        }
        let version = slot
            .active()
            .ok_or_else(|| Error::NotReady(name.to_string()))?;
        Ok(Lease::new(version))
    }
}
