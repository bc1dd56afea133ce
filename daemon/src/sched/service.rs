//! The node's current scheduler, as the API and the control loop see it.
//!
//! [`DagService`] holds the running [`Scheduler`] (none when the config has no
//! DAGs). I/O threads take a cheap `Arc` per request and drop it right after
//! submitting; a reload builds the new scheduler off to the side, swaps it in,
//! and then retires the old one: it waits until no I/O thread still holds it
//! (so nothing can be submitted after the stop), then stops it — requests
//! already on its SGSs run to their answer, its warm workers are killed, and
//! new requests meet the new scheduler's (cold or prestarting) pools.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::signals::DagSample;
use super::Scheduler;
use crate::telemetry;

/// The scheduler requests are routed to, swapped whole on reload.
#[derive(Default)]
pub struct DagService {
    current: RwLock<Option<Arc<Scheduler>>>,
}

impl DagService {
    /// The running scheduler, if any DAG is deployed.
    pub fn get(&self) -> Option<Arc<Scheduler>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in `next`; returns the previous scheduler for [`retire`].
    pub fn replace(&self, next: Option<Scheduler>) -> Option<Arc<Scheduler>> {
        let next = next.map(Arc::new);
        std::mem::replace(&mut *self.current.write().unwrap_or_else(|p| p.into_inner()), next)
    }

    /// Takes the scheduler out (drain); returns it for [`retire`].
    pub fn take(&self) -> Option<Arc<Scheduler>> {
        self.replace(None)
    }
}

/// Stops a scheduler that is no longer reachable through a [`DagService`]:
/// waits (up to `timeout`) for the last borrower to drop it, then stops its
/// SGSs after their in-flight requests. True if everything ended in time.
pub fn retire(old: Arc<Scheduler>, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    let mut old = old;
    loop {
        match Arc::try_unwrap(old) {
            Ok(s) => return s.stop(until.saturating_duration_since(Instant::now())),
            Err(still_shared) => {
                if Instant::now() >= until {
                    tracing::warn!("scheduler still referenced at the end of its drain; its threads end when released");
                    return false;
                }
                old = still_shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Publishes the scheduler's counters as Prometheus metrics (call ~1/s).
pub fn publish_metrics(s: &Scheduler) {
    let stats = s.stats();
    for dag in &s.deployment.dags {
        let mut sum = DagSample::default();
        for st in stats {
            if let Some(c) = st.dags.get(dag.index) {
                sum.add(&c.sample());
            }
        }
        let met = sum.answered.saturating_sub(sum.late);
        let missed = sum.missed + sum.late;
        telemetry::dag_outcomes(&dag.name, met, missed, sum.failed, s.lb().routes(dag.index).len());
    }
    let load = |f: fn(&super::SgsStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        stats.iter().map(|st| f(st).load(std::sync::atomic::Ordering::Relaxed)).sum()
    };
    telemetry::sched_workers(
        load(|s| &s.cold_starts),
        load(|s| &s.prestarts),
        load(|s| &s.crashes),
        load(|s| &s.retries),
    );
    for (f, def) in s.deployment.functions.iter().enumerate() {
        let n: u64 = stats
            .iter()
            .filter_map(|st| st.fn_workers.get(f))
            .map(|g| g.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        telemetry::function_workers(&def.name, n);
    }
}
