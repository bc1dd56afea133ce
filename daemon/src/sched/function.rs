//! The node-wide function table and the deployment built from the config.
//!
//! [`Deployment`] is what every SGS shares read-only: functions (how to start
//! a worker, limits, the estimator prior, warm-pool bounds) and DAGs over them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::dag::Dag;
use super::SchedError;
use crate::config::{Config, DispatchConfig, FunctionConfig, FunctionKind};

/// Index of a function in [`Deployment::functions`].
pub type FnId = usize;

/// Resource limits of one worker: the sandbox's, so exec workers take them as they are.
pub use crate::sandbox::Limits;

/// What a function runs.
#[derive(Debug, Clone, PartialEq)]
pub enum FunctionBody {
    /// A `[[models]]` entry, by name.
    Model(String),
    /// A program and its arguments.
    Exec { program: PathBuf, args: Vec<String> },
}

/// Warm-pool bounds of a function (per SGS).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmBounds {
    pub min: usize,
    pub max: usize,
    pub keep_alive: Duration,
    pub headroom: f64,
}

/// One function of the deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionDef {
    pub name: String,
    pub body: FunctionBody,
    pub limits: Limits,
    /// Prior execution time for the estimator.
    pub expected: Option<Duration>,
    pub warm: WarmBounds,
}

impl FunctionDef {
    pub fn from_config(f: &FunctionConfig) -> Self {
        let body = match f.kind {
            FunctionKind::Model => FunctionBody::Model(f.model.clone().unwrap_or_default()),
            FunctionKind::Exec => {
                FunctionBody::Exec { program: f.program.clone().unwrap_or_default(), args: f.args.clone() }
            }
        };
        Self {
            name: f.name.clone(),
            body,
            limits: Limits {
                cpu_cores: f.cpu_cores,
                memory_bytes: f.memory_mb << 20,
                time_limit: Duration::from_millis(f.time_limit_ms),
                max_message_bytes: usize::try_from(f.max_message_kb << 10).unwrap_or(usize::MAX),
                pids: f.pids,
                sched: f.sched,
            },
            expected: f.expected_ms.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3)),
            warm: WarmBounds {
                min: f.min_warm,
                max: f.max_warm.max(1),
                keep_alive: Duration::from_millis(f.keep_alive_ms),
                headroom: f64::from(f.headroom),
            },
        }
    }
}

/// Functions and DAGs, shared read-only by the SGSs and the LB.
#[derive(Debug, Default)]
pub struct Deployment {
    pub functions: Vec<FunctionDef>,
    pub dags: Vec<Arc<Dag>>,
    /// gati's policy or the benchmark baseline (`[dispatch]`).
    pub policy: DispatchConfig,
    by_name: HashMap<String, usize>,
}

impl Deployment {
    /// From a validated config (`config::load` checked it; shape errors are re-checked).
    pub fn from_config(c: &Config) -> Result<Self, SchedError> {
        let functions: Vec<FunctionDef> = c.functions.iter().map(FunctionDef::from_config).collect();
        let ids: HashMap<&str, FnId> = functions.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
        let mut dags = Vec::new();
        for (index, d) in c.dags.iter().enumerate() {
            let (names, edges) = d.graph_parts();
            let nodes = names
                .iter()
                .map(|n| {
                    ids.get(n).copied().ok_or_else(|| SchedError::BadDag {
                        dag: d.name.clone(),
                        why: format!("unknown function `{n}`"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            dags.push(Arc::new(Dag::new(&d.name, index, d.deadline(), nodes, &edges, (d.min_sgs, d.max_sgs))?));
        }
        Ok(Self::new(functions, dags).with_policy(c.dispatch))
    }

    /// From parts (tests, benches).
    pub fn new(functions: Vec<FunctionDef>, dags: Vec<Arc<Dag>>) -> Self {
        let by_name = dags.iter().map(|d| (d.name.clone(), d.index)).collect();
        Self { functions, dags, policy: DispatchConfig::default(), by_name }
    }

    /// The same deployment under another dispatch policy.
    pub fn with_policy(mut self, policy: DispatchConfig) -> Self {
        self.policy = policy;
        self
    }

    /// The DAG named `name`.
    pub fn dag(&self, name: &str) -> Option<&Arc<Dag>> {
        self.by_name.get(name).map(|&i| &self.dags[i])
    }

    /// The DAG with wire id `id`.
    pub fn dag_by_id(&self, id: u32) -> Option<&Arc<Dag>> {
        self.dags.iter().find(|d| d.id == id)
    }

    /// SGS threads needed: the largest `max_sgs` of any DAG (at least 1); 1
    /// when the policy turns scaling off.
    pub fn sgs_threads(&self) -> usize {
        if !self.policy.scaling {
            return 1;
        }
        self.dags.iter().map(|d| d.max_sgs).max().unwrap_or(1).max(1)
    }
}
