//! Execution-time estimates per function, learned online.
//!
//! Each estimator keeps an EWMA of observed times (the expected time used for
//! slack) and a high quantile over a sliding window of recent samples (the
//! tail used where being wrong is expensive: retry decisions). Until the first
//! observation both are the configured prior.

use std::collections::VecDeque;
use std::time::Duration;

/// EWMA weight of a new sample.
const ALPHA: f64 = 0.2;
/// Samples the quantile is taken over.
const WINDOW: usize = 64;
/// The tail quantile.
const QUANTILE: f64 = 0.95;
/// Prior for a function configured without `expected_ms`.
pub const DEFAULT_PRIOR: Duration = Duration::from_millis(1);

/// Online execution-time estimate of one function.
#[derive(Debug, Clone)]
pub struct Estimator {
    ewma_ns: f64,
    window: VecDeque<u64>,
    tail_ns: u64,
    observed: u64,
}

impl Estimator {
    pub fn new(prior: Option<Duration>) -> Self {
        let p = prior.unwrap_or(DEFAULT_PRIOR).as_nanos() as u64;
        Self { ewma_ns: p as f64, window: VecDeque::with_capacity(WINDOW), tail_ns: p, observed: 0 }
    }

    /// Folds in one measured execution.
    pub fn observe(&mut self, took: Duration) {
        let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.ewma_ns = if self.observed == 0 { ns as f64 } else { self.ewma_ns + ALPHA * (ns as f64 - self.ewma_ns) };
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(ns);
        let mut sorted: Vec<u64> = self.window.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((sorted.len() as f64 * QUANTILE).ceil() as usize).clamp(1, sorted.len());
        self.tail_ns = sorted[rank - 1];
        self.observed += 1;
    }

    /// Expected time (EWMA).
    pub fn expected(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns as u64)
    }

    /// 95th percentile of the recent window (never below the EWMA).
    pub fn tail(&self) -> Duration {
        Duration::from_nanos(self.tail_ns.max(self.ewma_ns as u64))
    }

    /// The quickest execution in the recent window (the prior before any):
    /// the optimistic bound used to decide that a request cannot make its
    /// deadline. Deciding that on the EWMA would starve the estimate: once
    /// it exceeds a deadline (say under outside CPU contention) nothing runs,
    /// so nothing would ever correct it.
    pub fn best(&self) -> Duration {
        self.window.iter().min().map_or_else(|| self.expected(), |&ns| Duration::from_nanos(ns))
    }

    /// Observations so far.
    pub fn observed(&self) -> u64 {
        self.observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prior_then_learns_and_tracks_shift() {
        let mut e = Estimator::new(Some(Duration::from_millis(10)));
        assert_eq!(e.expected(), Duration::from_millis(10));
        for _ in 0..50 {
            e.observe(Duration::from_millis(2));
        }
        assert_eq!(e.expected(), Duration::from_millis(2));
        // A slow tail shows in the quantile long before it moves the mean much.
        for i in 0..64 {
            e.observe(Duration::from_millis(if i % 10 == 0 { 20 } else { 2 }));
        }
        assert_eq!(e.tail(), Duration::from_millis(20));
        // A shift moves the EWMA within a few samples.
        for _ in 0..20 {
            e.observe(Duration::from_millis(8));
        }
        let exp = e.expected().as_secs_f64() * 1e3;
        assert!((7.9..8.1).contains(&exp), "{exp}");
        assert_eq!(e.observed(), 134);
        assert_eq!(e.best(), Duration::from_millis(2), "quickest of the last 64");
    }
}
