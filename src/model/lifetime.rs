//! Knowing when a version is gone: a signal that fires from the destructor of the value
//! holding it, after the fields declared before it (the weights) have dropped.

/// Set when the value holding it has dropped; see [`DropWatch`].
#[derive(Debug)]
pub struct DropSignal(tokio::sync::watch::Sender<bool>);

impl Default for DropSignal {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

impl DropSignal {
    pub fn watch(&self) -> DropWatch {
        DropWatch(self.0.subscribe())
    }
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Waits for a [`DropSignal`], without keeping its holder alive.
#[derive(Debug, Clone)]
pub struct DropWatch(tokio::sync::watch::Receiver<bool>);

impl DropWatch {
    pub fn is_dropped(&self) -> bool {
        *self.0.borrow()
    }

    /// True once the holder has dropped, false if `limit` passed first.
    pub async fn dropped_within(&mut self, limit: std::time::Duration) -> bool {
        // `wait_for` also returns (with an error) when the sender is gone, which only
        // happens after it sent `true`.
        tokio::time::timeout(limit, self.0.wait_for(|d| *d))
            .await
            .is_ok()
            || self.is_dropped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Stands for the weights: its destructor takes a while (as queuing many frees does).
    struct SlowDrop(Arc<AtomicBool>);
    impl Drop for SlowDrop {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(50));
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Laid out as `ModelVersion`: the weights first, the signal last.
    struct Holder {
        _weights: SlowDrop,
        dropped: DropSignal,
    }

    #[tokio::test]
    async fn the_drop_signal_fires_after_the_fields_before_it_dropped() {
        let weights_gone = Arc::new(AtomicBool::new(false));
        let holder = Arc::new(Holder {
            _weights: SlowDrop(weights_gone.clone()),
            dropped: DropSignal::default(),
        });
        let mut watch = holder.dropped.watch();
        assert!(!watch.dropped_within(Duration::from_millis(20)).await);
        // The last holder drops on another thread, as a request's does.
        let last = holder.clone();
        drop(holder);
        let t = std::thread::spawn(move || drop(last));
        assert!(watch.dropped_within(Duration::from_secs(10)).await);
        assert!(
            weights_gone.load(Ordering::SeqCst),
            "signalled before the weights' destructor finished"
        );
        t.join().unwrap();
        assert!(watch.is_dropped());
        // A watch taken by a second waiter sees it too.
        assert!(watch.clone().dropped_within(Duration::ZERO).await);
    }
}
