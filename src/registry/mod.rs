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

    /// Makes `version` active and returns the version it replaced.
    pub fn activate(&self, version: Arc<ModelVersion>) -> Option<Arc<ModelVersion>> {
        self.active.swap(Some(version))
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
#[derive(Default)]
pub struct Registry {
    // A read lock per request is uncontended: writers only add model names, which is rare.
    slots: RwLock<Vec<Arc<Slot>>>,
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
        });
        slots.push(slot.clone());
        slot
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
