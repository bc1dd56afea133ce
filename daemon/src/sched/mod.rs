//! Deadline-aware DAG dispatch (Archipelago inside one node).
//!
//! Owns DAG deployments at run time: the [`Deployment`] built from the
//! config, the semi-global schedulers ([`Sgs`]: one thread + io_uring ring
//! each, owning warm worker pools), and the load balancer ([`Lb`]) that maps
//! DAGs to SGSs through a [`RouteTable`]. Promises: every [`DagRequest`] is
//! answered exactly once — with the sink's output, `DeadlineMissed` as soon as
//! the deadline cannot be met, or `Failed` — and a crashed worker is replaced
//! without hanging any request. Config: `docs/config.md` (`[[functions]]`,
//! `[[dags]]`).

pub mod cores;
pub mod dag;
pub mod estimate;
pub mod function;
pub mod lb;
pub mod pool;
pub mod request;
pub mod route;
pub mod service;
pub mod sgs;
pub mod signals;
pub mod slack;
pub mod worker;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use dag::Dag;
pub use function::{Deployment, FunctionBody, FunctionDef, Limits};
pub use lb::{Lb, LbPolicy, Scale};
pub use request::{DagReply, DagRequest, DagResult, FnTiming};
pub use route::{LoadBoard, Route, RouteTable, SgsIndex, SgsLoad, UserRouteTable};
pub use service::DagService;
pub use sgs::{Attach, Ingress, Sgs};
pub use signals::SgsStats;
pub use worker::{NodeWorkers, Worker, WorkerError, WorkerFactory};

/// Errors building or starting the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("DAG `{dag}`: {why}")]
    BadDag { dag: String, why: String },
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The node's scheduler: the SGSs and the load balancer over one deployment.
pub struct Scheduler {
    pub deployment: Arc<Deployment>,
    sgs: Vec<Sgs>,
    stats: Vec<Arc<SgsStats>>,
    lb: Lb,
}

impl Scheduler {
    /// Starts `deployment.sgs_threads()` SGSs (the largest `max_sgs` of any DAG)
    /// and the LB publishing into `table`.
    pub fn start(
        deployment: Arc<Deployment>,
        factory: Arc<dyn WorkerFactory>,
        table: Arc<dyn RouteTable>,
        policy: LbPolicy,
    ) -> Result<Self, SchedError> {
        let n = deployment.sgs_threads();
        let cores = Arc::new(cores::Cores::for_policy(&deployment.policy));
        let sgs = (0..n)
            .map(|i| Sgs::start(i, Arc::clone(&deployment), Arc::clone(&factory), Arc::clone(&cores)))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = sgs.iter().map(|s| Arc::clone(s.stats())).collect();
        let lb = Lb::new(&deployment, n, table, policy);
        Ok(Self { deployment, sgs, stats, lb })
    }

    /// Invokes DAG `name`; `deadline` overrides the DAG's own. Unknown names are
    /// answered `Failed` at once.
    pub fn invoke(&self, name: &str, input: Vec<u8>, deadline: Option<Instant>, reply: DagReply) {
        match self.deployment.dag(name) {
            Some(dag) => {
                if let Err(req) = self.submit(DagRequest { dag: Arc::clone(dag), input, deadline, reply }) {
                    req.reply.send(DagResult::Failed("the DAG's scheduler is full".into()));
                }
            }
            None => reply.send(DagResult::Failed(format!("unknown DAG `{name}`"))),
        }
    }

    /// Routes a request to one of its DAG's SGSs; gives it back when that SGS
    /// is full (`sgs::MAX_QUEUED`).
    pub fn submit(&self, req: DagRequest) -> Result<(), DagRequest> {
        let k = self.lb.route(&req.dag);
        self.sgs[k].submit(req)
    }

    /// Hands SGS `k` its own request source and/or load board (false: no such SGS).
    pub fn attach(&self, k: SgsIndex, a: Attach) -> bool {
        self.sgs.get(k).map(|s| s.attach(a)).is_some()
    }

    /// Test hook: makes SGS 0 panic.
    pub fn inject_panic(&self) {
        if let Some(s) = self.sgs.first() {
            s.inject_panic();
        }
    }

    /// Runs the LB's scaling rule; call every `LbPolicy::period`.
    pub fn rebalance(&self, now: Instant) -> Vec<Scale> {
        self.lb.rebalance(now, &self.stats)
    }

    pub fn lb(&self) -> &Lb {
        &self.lb
    }

    /// Per-SGS counters, by SGS index.
    pub fn stats(&self) -> &[Arc<SgsStats>] {
        &self.stats
    }

    /// Stops every SGS after its in-flight requests; true if all ended in `timeout`.
    pub fn stop(self, timeout: Duration) -> bool {
        for s in &self.sgs {
            s.stop();
        }
        let until = Instant::now() + timeout;
        let mut all = true;
        for s in self.sgs {
            // Every SGS is joined, even after one overran.
            all &= s.join(until.saturating_duration_since(Instant::now()));
        }
        all
    }
}
