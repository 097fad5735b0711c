//! Bounded admission: requests admitted (running or waiting) and running slots.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Counts requests admitted (running or waiting) and hands out running slots.
pub(crate) struct Admission {
    running: Arc<Semaphore>,
    admitted: AtomicUsize,
    max_admitted: usize,
    max_concurrent: usize,
}

/// A request's place in admission; dropping it frees the place (and its running slot).
pub struct Ticket {
    admission: Arc<Admission>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Admission {
    pub(crate) fn new(max_concurrent: usize, max_queue: usize) -> Arc<Self> {
        Arc::new(Self {
            running: Arc::new(Semaphore::new(max_concurrent)),
            admitted: AtomicUsize::new(0),
            max_admitted: max_concurrent + max_queue,
            max_concurrent,
        })
    }

    /// Takes a place or says why not: `(running, queued, max_concurrent, max_queue)`.
    pub(crate) fn admit(self: &Arc<Self>) -> std::result::Result<Ticket, String> {
        let prev = self.admitted.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_admitted {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "{} requests running and {} queued (limits {} + {})",
                self.max_concurrent.min(prev),
                prev.saturating_sub(self.max_concurrent),
                self.max_concurrent,
                self.max_admitted - self.max_concurrent
            ));
        }
        Ok(Ticket {
            admission: self.clone(),
            permit: None,
        })
    }

    /// Requests admitted right now (running or queued).
    pub(crate) fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// (running, queued) requests right now.
    pub(crate) fn load(&self) -> (usize, usize) {
        let running =
            self.max_concurrent - self.running.available_permits().min(self.max_concurrent);
        (running, self.admitted().saturating_sub(running))
    }
}

impl Ticket {
    /// Waits for a running slot, until `deadline` if one is set.
    pub(crate) async fn run_slot(&mut self, deadline: Option<Instant>) -> Result<()> {
        let acquire = self.admission.running.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), acquire)
                .await
                .map_err(|_| Error::DeadlineWaiting("waiting in the admission queue".into()))?,
            None => acquire.await,
        };
        self.permit = Some(permit.map_err(|_| Error::Internal("admission closed".into()))?);
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}
