//! Turns at the CPU: one forward pass at a time, first come first served. Below `model`
//! and `quant` (which both pace background work), importing neither.
//!
//! A forward pass already spreads its matrix products over every configured thread (candle's
//! barrier pool, where the calling thread spins until the workers finish). When several
//! requests ran their passes at once, their threads outnumbered the cores: a spinning caller
//! could hold a core while the worker it waited for was descheduled, and 8 streams made less
//! progress in total than 1. Taking turns keeps exactly the configured threads busy. The turns
//! are granted in arrival order (a ticket lock), so every stream advances one step per round
//! and none starves; a step is one decode token or one prefill chunk.
//!
//! Background work (verifying and loading a new version while the old one serves) takes
//! turns too, in slices: see [`in_background`]. Run beside the forward passes instead, a
//! loader is one more runnable thread than there are cores, and every pass slows for the
//! whole load (measured: inter-token p50 336 ms during the load phase, against 63 ms steady).
//!
//! GPU work does not take turns: its kernels queue on the device's own stream.
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

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
    device.is_cpu().then(|| foreground_turn(&CPU))
}

/// How long background work holds the CPU by default before the next in line gets it
/// (`background_slice_ms`). A stream waits up to one slice longer for a token each time
/// the background takes a turn; the background gets about a slice per batch step. Measured
/// with 8 batched SmolLM2 streams and a reload every 4 s, against 10 ms slices (with the
/// long holds `unpaced` took out): inter-token p99 during reloads 117 and 110 ms against 159
/// and 160 ms, for reloads taking 6.5 to 6.9 s against 4.0 to 4.3 s (medians).
pub const SLICE: Duration = Duration::from_millis(2);

/// The slice in force, in microseconds ([`set_slice`]).
static SLICE_US: AtomicU64 = AtomicU64::new(SLICE.as_micros() as u64);

/// Sets the slice background work holds the CPU for (the server's `background_slice_ms`).
pub fn set_slice(slice: Duration) {
    SLICE_US.store(slice.as_micros() as u64, Ordering::Relaxed);
}

/// The slice in force.
pub fn slice() -> Duration {
    Duration::from_micros(SLICE_US.load(Ordering::Relaxed))
}

/// This thread's background work, while [`in_background`] runs it.
struct Background {
    queue: &'static TurnQueue,
    slice: Duration,
    turn: Option<Turn<'static>>,
    since: Instant,
}

thread_local! {
    static BACKGROUND: RefCell<Option<Background>> = const { RefCell::new(None) };
}

/// A turn for a forward pass. If this thread is doing background work and holds a turn, that
/// one ends first (the queue is not reentrant); the background takes a new one at its next
/// [`pace`].
fn foreground_turn(queue: &'static TurnQueue) -> Turn<'static> {
    let held = BACKGROUND.with(|b| b.borrow_mut().as_mut().and_then(|bg| bg.turn.take()));
    drop(held);
    queue.turn()
}

/// Runs `f` on this (blocking) thread as background work at the CPU when `device` is the
/// CPU: `f` holds a turn while it runs, and each [`pace`] inside it hands the CPU to the next
/// in line once the turn has lasted a [`slice`]. With nothing else running, a pace costs one
/// uncontended lock. Called inside background work, it runs `f` as part of that work.
pub fn in_background<T>(device: &candle_core::Device, f: impl FnOnce() -> T) -> T {
    if device.is_cpu() {
        in_background_on(&CPU, slice(), f)
    } else {
        f()
    }
}

fn in_background_on<T>(queue: &'static TurnQueue, slice: Duration, f: impl FnOnce() -> T) -> T {
    // Background work nested in background work is part of it: it keeps the outer turn
    // (taking a second one from the same queue would wait for itself).
    if BACKGROUND.with(|b| b.borrow().is_some()) {
        return f();
    }
    /// Ends the background (and its turn) however `f` ends, a panic included.
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let mine = BACKGROUND.with(|b| b.borrow_mut().take());
            drop(mine);
        }
    }
    let turn = queue.turn();
    BACKGROUND.with(|b| {
        *b.borrow_mut() = Some(Background {
            queue,
            slice,
            turn: Some(turn),
            since: Instant::now(),
        })
    });
    let _leave = Leave;
    f()
}

/// A point where background work may pause: once its turn has lasted a slice (or it holds
/// none), it goes to the back of the queue and waits for its next turn. Outside
/// [`in_background`] it does nothing, so code shared with foreground paths may call it.
pub fn pace() {
    BACKGROUND.with(|b| {
        let mut b = b.borrow_mut();
        let Some(bg) = b.as_mut() else { return };
        if bg.turn.is_some() && bg.since.elapsed() < bg.slice {
            return;
        }

        drop(bg.turn.take());
        bg.turn = Some(bg.queue.turn());
        bg.since = Instant::now();
    })
}

/// Runs `f`, work that cannot pause (a third-party parser, say), outside this thread's
/// background turn, then waits for the next turn. Held through `f`, the turn would stop
/// every stream for all of it (measured: 60 to 80 ms for candle's GGUF metadata reader and
/// for building SmolLM2's BPE tokenizer, each once per load); beside serving, one more
/// runnable thread only slows the passes a little while `f` runs. Outside
/// [`in_background`] it just runs `f`.
pub fn unpaced<T>(f: impl FnOnce() -> T) -> T {
    let background = BACKGROUND.with(|b| {
        let mut b = b.borrow_mut();
        b.as_mut().map(|bg| drop(bg.turn.take())).is_some()
    });
    let out = f();
    if background {
        pace();
    }
    out
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

    /// Waits until `n` tickets were handed out.
    fn tickets_out(q: &TurnQueue, n: u64) {
        while q.tickets.lock().unwrap().next < n {
            std::thread::yield_now();
        }
    }

    #[test]
    fn background_work_holds_a_turn_and_lets_a_waiting_pass_go_between_slices() {
        let q: &'static TurnQueue = Box::leak(Box::new(TurnQueue::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let first = q.turn(); // ticket 0: a pass running when the background starts
        let ev = events.clone();
        let background = std::thread::spawn(move || {
            // A zero slice: every pace hands the turn over if anyone waits.
            in_background_on(q, Duration::ZERO, || {
                ev.lock().unwrap().push("B1");
                // The pass below has queued (ticket 2) while this slice holds the CPU.
                tickets_out(q, 3);
                pace();
                ev.lock().unwrap().push("B2");
            })
        });
        tickets_out(q, 2); // the background's ticket 1
        let ev = events.clone();
        let pass = std::thread::spawn(move || {
            let _turn = q.turn();
            ev.lock().unwrap().push("F");
        });
        tickets_out(q, 3);
        events.lock().unwrap().push("F0");
        drop(first);
        background.join().unwrap();
        pass.join().unwrap();
        assert_eq!(*events.lock().unwrap(), ["F0", "B1", "F", "B2"]);
        // The background's turn ended with it: a new turn is granted at once.
        drop(q.turn());
    }

    #[test]
    fn a_pass_inside_background_work_does_not_deadlock_and_pace_outside_does_nothing() {
        let q: &'static TurnQueue = Box::leak(Box::new(TurnQueue::new()));
        pace();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = in_background_on(q, SLICE, || {
                drop(foreground_turn(q));
                pace();
                7
            });
            tx.send(out).unwrap();
        });
        // Not a timing assertion: a deadlock never answers.
        let out = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(out, Ok(7), "deadlocked");
        drop(q.turn());
    }

    #[test]
    fn background_work_nested_in_background_work_runs_in_the_outer_turn() {
        let q: &'static TurnQueue = Box::leak(Box::new(TurnQueue::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = in_background_on(q, SLICE, || {
                let inner = in_background_on(q, SLICE, || {
                    pace();
                    1
                });
                // The outer background still paces after the inner one ended.
                pace();
                inner + 1
            });
            tx.send(out).unwrap();
        });
        // Not a timing assertion: a deadlock never answers.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)),
            Ok(2),
            "deadlocked"
        );
        // Every turn ended with the outer background.
        drop(q.turn());
    }

    #[test]
    fn a_panic_in_background_work_releases_its_turn() {
        let q: &'static TurnQueue = Box::leak(Box::new(TurnQueue::new()));
        let r =
            std::thread::spawn(move || in_background_on(q, SLICE, || panic!("load failed"))).join();
        assert!(r.is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(q.turn());
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "turn leaked"
        );
    }

    #[test]
    fn unpaced_work_runs_without_the_turn_and_takes_one_again_after() {
        let q: &'static TurnQueue = Box::leak(Box::new(TurnQueue::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            in_background_on(q, SLICE, || {
                unpaced(|| {
                    // A pass gets the CPU while this runs (it would wait forever for a
                    // turn held here).
                    std::thread::spawn(move || drop(q.turn())).join().unwrap();
                });
                // The background holds a turn again, and nobody else does.
                let t = q.tickets.lock().unwrap();
                tx.send(t.next == t.serving + 1).unwrap();
            })
        });
        // Not a timing assertion: a deadlock never answers.
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(true));
        assert_eq!(unpaced(|| 3), 3, "outside background work it just runs");
    }
}
