//! The steps from the swap on: the one atomic store, the drain of requests still on the old
//! version, and the free of its weights when the last reference drops.
use std::sync::Arc;
use std::time::Duration;

use crate::memory;
use crate::model::ModelVersion;
use crate::registry::Slot;

use super::run::Run;
use super::types::*;
use super::Reloader;

/// How often the drain looks at the in-flight count.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How long the free phase waits for the last reference once the drain is over.
const FREE_WAIT: Duration = Duration::from_secs(5);

impl Reloader {
    /// swap → drain → free. The swap is one atomic store and cannot fail.
    pub(super) async fn swap_drain_free(
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
    pub(super) async fn drain(
        &self,
        run: &mut Run,
        old: &ModelVersion,
        req: &ReloadRequest,
    ) -> u64 {
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
    pub(super) async fn free(
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
