//! The node's core budget: how many function invocations may run at once,
//! shared by every SGS.
//!
//! Archipelago's SGSs dispatch onto cores they own, one invocation per core,
//! so the least-slack order decides what runs. Without a budget every warm
//! worker with work runs at once and the kernel shares the CPUs among them:
//! under a burst the urgent invocation runs as slowly as the rest, and the
//! order is lost (measured in `gatid bench dispatch`). The budget is a count
//! of leases; an SGS takes one per invocation it starts and gives it back
//! when the invocation ends. An SGS that had work but found no lease marks
//! itself starved and is woken by the next release.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::eventfd::EventFd;

/// Leases on the node's cores for running invocations.
pub struct Cores {
    /// Leases in all; `usize::MAX` = no budget.
    total: usize,
    used: AtomicUsize,
    /// Bit `i`: SGS `i` has work waiting for a lease.
    starved: AtomicU64,
    wakes: Mutex<Vec<Option<Arc<EventFd>>>>,
}

impl Cores {
    /// A budget of `total` leases (at least 1).
    pub fn new(total: usize) -> Self {
        Self { total: total.max(1), used: AtomicUsize::new(0), starved: AtomicU64::new(0), wakes: Mutex::default() }
    }

    /// No budget: every lease is granted.
    pub fn unlimited() -> Self {
        Self { total: usize::MAX, ..Self::new(1) }
    }

    /// The budget `policy` asks for.
    pub fn for_policy(policy: &crate::config::DispatchConfig) -> Self {
        policy.core_leases().map_or_else(Self::unlimited, Self::new)
    }

    /// The number of CPUs this process may run on.
    pub fn available() -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    pub fn total(&self) -> Option<usize> {
        (self.total != usize::MAX).then_some(self.total)
    }

    /// Leases held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// SGS `sgs` is woken through `wake` when a lease it waits for frees up.
    pub fn register(&self, sgs: usize, wake: Arc<EventFd>) {
        let mut w = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() <= sgs {
            w.resize(sgs + 1, None);
        }
        w[sgs] = Some(wake);
    }

    /// Takes one lease for SGS `sgs`; on failure `sgs` is marked starved and
    /// the next [`release`](Self::release) wakes it.
    pub fn try_take(&self, sgs: usize) -> bool {
        if self.total == usize::MAX {
            self.used.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        // Starved first, then try: a release either sees the mark or frees the lease we see.
        let bit = 1u64 << (sgs % 64);
        self.starved.fetch_or(bit, Ordering::SeqCst);
        let got =
            self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| (u < self.total).then_some(u + 1)).is_ok();
        if got {
            self.starved.fetch_and(!bit, Ordering::SeqCst);
        }
        got
    }

    /// Gives back `n` leases and wakes every starved SGS.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::SeqCst);
        let starved = self.starved.swap(0, Ordering::SeqCst);
        if starved == 0 {
            return;
        }
        let w = self.wakes.lock().unwrap_or_else(|p| p.into_inner());
        for (i, wake) in w.iter().enumerate() {
            if starved & (1u64 << (i % 64)) != 0 {
                if let Some(wake) = wake {
                    wake.signal();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_bounded_and_a_release_wakes_the_starved() {
        let cores = Cores::new(2);
        let wake = Arc::new(EventFd::new().unwrap());
        cores.register(1, Arc::clone(&wake));
        assert!(cores.try_take(0));
        assert!(cores.try_take(0));
        assert!(!cores.try_take(1), "a third lease of two");
        assert_eq!(cores.used(), 2);
        assert!(!wake.drain(), "nobody released yet");
        cores.release(1);
        assert!(wake.drain(), "the starved SGS is woken");
        assert!(cores.try_take(1));
        cores.release(1);
        assert!(!wake.drain(), "not starved any more: no wake-up");
        let free = Cores::unlimited();
        assert!((0..1000).all(|_| free.try_take(0)));
        assert_eq!(free.total(), None);
    }
}
