//! The node-wide budget for request bytes held in memory (`[server]
//! max_queued_bytes`).
//!
//! A frame's payload is charged as its bytes are buffered (a header alone
//! holds nothing), its decoded input before it is allocated, and the charge
//! is released when the request is answered. What does not fit is refused `Busy`
//! at once: the daemon never allocates for a request it has no room for.
//! Answers waiting for a slow reader are charged without refusal (they cannot
//! be dropped), so a backlog of them turns new requests away until it drains.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes of requests the node holds, against a fixed limit.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

/// A share of the budget, given back on drop.
#[derive(Debug)]
#[must_use = "a charge is released when dropped"]
pub struct Charge {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0) })
    }

    /// Charges `bytes` if they fit under the limit.
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|&n| n <= self.limit))
            .ok()?;
        Some(Charge { budget: Arc::clone(self), bytes })
    }

    /// Charges `bytes` even past the limit (memory the node must keep).
    pub fn force(self: &Arc<Self>, bytes: usize) -> Charge {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Charge { budget: Arc::clone(self), bytes }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `bytes` to this charge if they fit under the limit.
    pub fn try_grow(&mut self, bytes: usize) -> bool {
        let limit = self.budget.limit;
        let ok = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(bytes).filter(|&n| n <= limit))
            .is_ok();
        if ok {
            self.bytes += bytes;
        }
        ok
    }

    /// Adds `bytes` to this charge, even past the limit.
    pub fn grow(&mut self, bytes: usize) {
        self.budget.used.fetch_add(bytes, Ordering::AcqRel);
        self.bytes += bytes;
    }

    /// Gives back all but `keep` bytes.
    pub fn shrink_to(&mut self, keep: usize) {
        let give = self.bytes.saturating_sub(keep);
        self.budget.used.fetch_sub(give, Ordering::AcqRel);
        self.bytes -= give;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_the_limit_and_are_given_back() {
        let b = ByteBudget::new(100);
        let a = b.try_charge(60).unwrap();
        assert!(b.try_charge(41).is_none(), "over the limit");
        let mut c = b.try_charge(40).unwrap();
        assert_eq!(b.used(), 100);
        c.shrink_to(10);
        assert_eq!(b.used(), 70);
        assert!(c.try_grow(30) && !c.try_grow(1));
        assert_eq!((b.used(), c.bytes()), (100, 40));
        c.shrink_to(10);
        drop(a);
        let forced = b.force(1000);
        assert_eq!(b.used(), 1010);
        assert!(b.try_charge(1).is_none(), "a forced backlog turns new work away");
        drop((c, forced));
        assert_eq!(b.used(), 0);
        assert!(b.try_charge(usize::MAX).is_none(), "no overflow");
    }
}
