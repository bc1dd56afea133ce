//! The `[dispatch]` section: which policy the DAG scheduler runs.
//!
//! The default is gati's (least slack first, proactive warm pools, load
//! balancer scaling). The other values turn the same machinery into an
//! OpenWhisk-style baseline for benchmarks: one FIFO queue that knows no
//! deadlines, sandboxes started on demand and reaped after a keep-alive, and
//! a single SGS.

use serde::Deserialize;

/// Order in which an SGS dispatches ready function invocations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchOrder {
    /// Least slack first; hopeless requests are answered `DeadlineMissed` early.
    #[default]
    LeastSlack,
    /// First ready, first dispatched; deadline-oblivious: every request runs
    /// to completion and is answered with its output, late or not.
    Fifo,
}

/// How an SGS keeps workers per function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// Warm pools sized from arrival rate × execution time (+ headroom).
    #[default]
    Proactive,
    /// A worker is started when work waits and none is idle (a cold start);
    /// idle workers are reaped after the function's `keep_alive_ms`.
    OnDemand,
}

/// `[dispatch]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    pub order: DispatchOrder,
    pub pool: PoolMode,
    /// Load-balancer scaling over several SGSs; `false` runs one SGS for every DAG.
    pub scaling: bool,
    /// Invocations that may run at once on the node, shared by every SGS; 0 =
    /// one per CPU the daemon may use.
    pub cores: usize,
    /// Hold running invocations to `cores` (Archipelago's SGSs own cores);
    /// `false` (the default) runs every warm worker that has work at once and
    /// lets the kernel share the CPUs. Off by default: on the 2-vCPU test node
    /// it met no more deadlines than kernel sharing (`gatid bench dispatch
    /// --ablation`, docs/notes-dispatch.md) and yields CPU to other processes.
    pub core_budget: bool,
    /// Under overload, answer `DeadlineMissed` at once the queued requests
    /// whose loss frees the most core time (Moore–Hodgson), rather than run
    /// the queue late; needs `core_budget` and least-slack order.
    pub shed: bool,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            order: DispatchOrder::LeastSlack,
            pool: PoolMode::Proactive,
            scaling: true,
            cores: 0,
            core_budget: false,
            shed: false,
        }
    }
}

impl DispatchConfig {
    /// The OpenWhisk-style baseline: FIFO, on-demand sandboxes, one SGS.
    pub fn baseline() -> Self {
        Self {
            order: DispatchOrder::Fifo,
            pool: PoolMode::OnDemand,
            scaling: false,
            cores: 0,
            core_budget: false,
            shed: false,
        }
    }

    /// Leases on the node's cores under this policy.
    pub fn core_leases(&self) -> Option<usize> {
        self.core_budget.then(|| if self.cores == 0 { crate::sched::cores::Cores::available() } else { self.cores })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_baseline_and_defaults() {
        let d: DispatchConfig = toml::from_str(
            "order = \"fifo\"\npool = \"on_demand\"\nscaling = false\ncore_budget = false\nshed = false",
        )
        .unwrap();
        assert_eq!(d, DispatchConfig::baseline());
        let d: DispatchConfig = toml::from_str("").unwrap();
        assert_eq!(d, DispatchConfig::default());
        assert!(toml::from_str::<DispatchConfig>("order = \"lifo\"").is_err());
        assert!(toml::from_str::<DispatchConfig>("cores = -1").is_err());
        let d: DispatchConfig = toml::from_str("cores = 3\ncore_budget = true").unwrap();
        assert_eq!(d.core_leases(), Some(3));
        assert_eq!(DispatchConfig::default().core_leases(), None);
        let d: DispatchConfig = toml::from_str("core_budget = true").unwrap();
        assert_eq!(d.core_leases(), Some(crate::sched::cores::Cores::available()));
        assert_eq!(DispatchConfig::baseline().core_leases(), None);
    }
}
