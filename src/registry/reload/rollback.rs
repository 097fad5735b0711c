//! Rollback: back to the resident standby at once, or to the previous version's files
//! through every check; and the automatic rollback that watches a fresh version.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::super::Slot;
use super::{AutoRollback, DrainPolicy, ReloadEvent, ReloadRequest, Reloader};
use crate::error::{Error, Result};
use crate::model::ModelVersion;

/// How often the automatic-rollback watch looks at the new version's counters.
const AUTO_ROLLBACK_POLL: Duration = Duration::from_millis(50);

impl Reloader {
    /// Makes the previous version active again: at once if it is resident, else by
    /// reloading its files through every check.
    pub fn rollback(
        &self,
        model: &str,
        drain_timeout: Option<Duration>,
        drain_policy: DrainPolicy,
        actor: &str,
    ) -> Result<mpsc::UnboundedReceiver<ReloadEvent>> {
        if self.is_stopping() {
            return Err(Error::ShuttingDown);
        }
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
                let back = standby.clone();
                let r =
                    crate::panic::catch(this.swap_drain_free(&mut run, &slot, standby, &req)).await;
                this.after_panic(&mut run, &slot, r);
                if !run.outcome.committed {
                    // Refused before the swap (it could not be recorded): still the standby.
                    slot.standby.store(Some(back));
                }
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

    /// Stops serving `model`: its slot leaves the registry (new requests get NOT_FOUND) and
    /// its versions are freed when the requests still holding them end. Refused while a
    /// reload of it runs.
    pub fn unload(&self, model: &str) -> Result<()> {
        let slot = self.registry.slot(model)?;
        let _guard = slot.reload_lock.clone().try_lock_owned().map_err(|_| {
            Error::ReloadBusy(format!(
                "a reload of model `{model}` is running; unload it once that ends"
            ))
        })?;
        self.registry.remove(model);
        slot.standby.store(None);
        slot.active.store(None);
        Ok(())
    }

    /// Watches a freshly swapped-in version and rolls back to the resident standby when its
    /// error rate passes the threshold within the window.
    pub(super) async fn watch_new_version(
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
}
