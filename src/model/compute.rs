//! Turns at the CPU: one forward pass at a time, first come first served.
//!
//! A forward pass already spreads its matrix products over every configured thread (candle's
//! barrier pool, where the calling thread spins until the workers finish). When several
//! requests ran their passes at once, their threads outnumbered the cores: a spinning caller
//! could hold a core while the worker it waited for was descheduled, and 8 streams made less
//! progress in total than 1. Taking turns keeps exactly the configured threads busy. The turns
//! are granted in arrival order (a ticket lock), so every stream advances one step per round
//! and none starves; a step is one decode token or one prefill chunk.
//!
//! GPU work does not take turns: its kernels queue on the device's own stream.
use std::sync::{Condvar, Mutex};

struct Tickets {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose holder may run now.
    serving: u64,
}

/// A first-come-first-served queue of turns (a ticket lock).
pub struct TurnQueue {
    tickets: Mutex<Tickets>,
    turn_ended: Condvar,
}

/// The right to run one forward pass; the next in line goes when it drops.
#[must_use = "the turn ends when this is dropped"]
pub struct Turn<'a>(&'a TurnQueue);

impl TurnQueue {
    pub const fn new() -> Self {
        Self {
            tickets: Mutex::new(Tickets {
                next: 0,
                serving: 0,
            }),
            turn_ended: Condvar::new(),
        }
    }

    /// Waits for this caller's turn (blocking; call from a blocking thread). Not reentrant: a
    /// thread holding a turn must not ask the same queue for another.
    pub fn turn(&self) -> Turn<'_> {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.next;
        t.next += 1;
        while t.serving != mine {
            t = self.turn_ended.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        Turn(self)
    }
}

impl Default for TurnQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0
            .tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .serving += 1;
        self.0.turn_ended.notify_all();
    }
}

/// The CPU's queue, shared by every model in the process.
static CPU: TurnQueue = TurnQueue::new();

/// A turn at the CPU when `device` is the CPU; none otherwise.
pub fn turn_on(device: &candle_core::Device) -> Option<Turn<'static>> {
    device.is_cpu().then(|| CPU.turn())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn turns_are_exclusive_and_granted_in_arrival_order() {
        let q = Arc::new(TurnQueue::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        // Hold a turn while 4 threads queue up one after another.
        let first = q.turn();
        let mut threads = Vec::new();
        for i in 0..4u64 {
            let (q2, inside, order) = (q.clone(), inside.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _turn = q2.turn();
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two turns at once"
                );
                order.lock().unwrap().push(i);
                std::thread::sleep(std::time::Duration::from_millis(5));
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
            // Thread i has its ticket before thread i + 1 starts.
            while q.tickets.lock().unwrap().next < i + 2 {
                std::thread::yield_now();
            }
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
    }
}
