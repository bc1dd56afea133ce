//! Counters an SGS publishes and the load balancer reads: per DAG, what
//! arrived, how it ended and how long ready work queued; per SGS, the worker
//! pool's cold starts, prestarts, crashes and retries. All monotonic; readers
//! take deltas.

use std::sync::atomic::{AtomicU64, Ordering};

/// One DAG's counters on one SGS.
#[derive(Debug, Default)]
pub struct DagCounters {
    pub arrived: AtomicU64,
    pub answered: AtomicU64,
    pub missed: AtomicU64,
    pub failed: AtomicU64,
    /// Of `answered`: answered with the output but after the deadline (only
    /// in FIFO order, which runs every request to completion).
    pub late: AtomicU64,
    /// Function invocations dispatched, and their summed ready → dispatch time.
    pub dispatched: AtomicU64,
    pub queue_ns: AtomicU64,
}

/// A snapshot of [`DagCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DagSample {
    pub arrived: u64,
    pub answered: u64,
    pub missed: u64,
    pub failed: u64,
    pub late: u64,
    pub dispatched: u64,
    pub queue_ns: u64,
}

impl DagSample {
    /// `self − earlier`, counter by counter.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            arrived: self.arrived.saturating_sub(earlier.arrived),
            answered: self.answered.saturating_sub(earlier.answered),
            missed: self.missed.saturating_sub(earlier.missed),
            failed: self.failed.saturating_sub(earlier.failed),
            late: self.late.saturating_sub(earlier.late),
            dispatched: self.dispatched.saturating_sub(earlier.dispatched),
            queue_ns: self.queue_ns.saturating_sub(earlier.queue_ns),
        }
    }

    pub fn add(&mut self, o: &Self) {
        self.arrived += o.arrived;
        self.answered += o.answered;
        self.missed += o.missed;
        self.failed += o.failed;
        self.late += o.late;
        self.dispatched += o.dispatched;
        self.queue_ns += o.queue_ns;
    }
}

impl DagCounters {
    pub fn sample(&self) -> DagSample {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DagSample {
            arrived: l(&self.arrived),
            answered: l(&self.answered),
            missed: l(&self.missed),
            failed: l(&self.failed),
            late: l(&self.late),
            dispatched: l(&self.dispatched),
            queue_ns: l(&self.queue_ns),
        }
    }
}

/// Everything one SGS publishes.
#[derive(Debug, Default)]
pub struct SgsStats {
    /// Indexed by `Dag::index`.
    pub dags: Vec<DagCounters>,
    pub cold_starts: AtomicU64,
    pub prestarts: AtomicU64,
    pub crashes: AtomicU64,
    pub retries: AtomicU64,
    /// Workers alive now (gauge).
    pub workers: AtomicU64,
    /// Workers alive now per function (gauge), indexed by `FnId`.
    pub fn_workers: Vec<AtomicU64>,
}

impl SgsStats {
    pub fn new(dags: usize) -> Self {
        Self { dags: (0..dags).map(|_| DagCounters::default()).collect(), ..Self::default() }
    }

    /// With a per-function worker gauge for `functions` functions.
    pub fn with_functions(dags: usize, functions: usize) -> Self {
        Self { fn_workers: (0..functions).map(|_| AtomicU64::new(0)).collect(), ..Self::new(dags) }
    }
}

/// Adds `n` to a counter.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
