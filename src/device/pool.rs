//! A fixed set of members handed out least-used first: the CUDA streams that model versions
//! load and run on. The set is made once (at startup) and never grows, so what each member
//! costs (on a GPU: a stream, a cuBLAS handle, a cuRAND generator, loaded kernel modules and
//! candle's per-device scratch buffers, which candle never frees) is paid a bounded number
//! of times however many versions come and go. When every member is in use, members are
//! shared: a version on a shared stream is ordered behind the other's work, never unsafe.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Pool<T> {
    members: Vec<(T, Arc<AtomicUsize>)>,
    /// Serialises choosing, so two loads at once never both take the same idle member.
    choosing: Mutex<()>,
}

/// A member's use: it counts as in use until the lease drops.
#[derive(Debug)]
pub struct Lease {
    users: Arc<AtomicUsize>,
    index: usize,
}

impl Lease {
    /// Which member of the pool this is (for logs and tests).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Versions using this member now, this one included.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.users.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: Clone> Pool<T> {
    /// A pool of `members`; it must not be empty.
    pub fn new(members: Vec<T>) -> Self {
        assert!(!members.is_empty(), "a pool needs at least one member");
        Self {
            members: members
                .into_iter()
                .map(|m| (m, Arc::new(AtomicUsize::new(0))))
                .collect(),
            choosing: Mutex::new(()),
        }
    }

    /// The least-used member (the lowest index among equals, so an idle member is reused
    /// before the pool's later ones are touched) and its lease.
    pub fn acquire(&self) -> (T, Lease) {
        let _one_at_a_time = self.choosing.lock().unwrap_or_else(|p| p.into_inner());
        let (index, (member, users)) = self
            .members
            .iter()
            .enumerate()
            .min_by_key(|(i, (_, users))| (users.load(Ordering::Acquire), *i))
            .expect("a pool has at least one member");
        users.fetch_add(1, Ordering::AcqRel);
        let lease = Lease {
            users: users.clone(),
            index,
        };
        (member.clone(), lease)
    }

    /// Users of each member, in order (for metrics and tests).
    pub fn users(&self) -> Vec<usize> {
        self.members
            .iter()
            .map(|(_, u)| u.load(Ordering::Acquire))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_member_is_reused_before_a_fresh_one() {
        let pool = Pool::new(vec!["a", "b", "c"]);
        let (m1, l1) = pool.acquire();
        assert_eq!((m1, l1.index()), ("a", 0));
        let (m2, l2) = pool.acquire();
        assert_eq!(m2, "b");
        drop(l1);
        // `a` went back: the next version gets it again, not the untouched `c`.
        let (m3, _l3) = pool.acquire();
        assert_eq!(m3, "a");
        drop(l2);
        assert_eq!(pool.users(), vec![1, 0, 0]);
    }

    #[test]
    fn many_versions_share_a_bounded_set_least_used_first() {
        let pool = Pool::new(vec![0u8, 1, 2]);
        let leases: Vec<_> = (0..10).map(|_| pool.acquire()).collect();
        let mut seen: Vec<u8> = leases.iter().map(|(m, _)| *m).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            vec![0, 1, 2],
            "never more members than the pool holds"
        );
        assert_eq!(pool.users(), vec![4, 3, 3], "spread least-used first");
        assert_eq!(leases[0].1.users(), 4);
        drop(leases);
        assert_eq!(
            pool.users(),
            vec![0, 0, 0],
            "every lease gave its member back"
        );
    }

    #[test]
    fn leases_taken_from_many_threads_all_come_back() {
        let pool = Arc::new(Pool::new(vec![(); 4]));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let (_, lease) = pool.acquire();
                        assert!(lease.users() >= 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.users(), vec![0; 4]);
    }
}
