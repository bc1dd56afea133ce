//! Starting the DAG scheduler for a config, and deciding when a reload must
//! replace it.

use std::sync::Arc;

use crate::config::Config;
use crate::infer::Registry;
use crate::sched::{Deployment, LbPolicy, NodeWorkers, SchedError, Scheduler, UserRouteTable};
use crate::steer::Steering;

/// A scheduler for the config's `[[dags]]` (none without DAGs). Model
/// functions run on the models in `registry`, which must already be loaded;
/// routes go to `steering`'s table (the kernel's maps when eBPF steers), else
/// to a plain userspace one.
pub fn start(
    config: &Config,
    registry: &Arc<Registry>,
    steering: Option<&Steering>,
) -> Result<Option<Scheduler>, SchedError> {
    if config.dags.is_empty() {
        return Ok(None);
    }
    let deployment = Arc::new(Deployment::from_config(config)?);
    let factory = Arc::new(NodeWorkers { registry: Arc::clone(registry) });
    let table = match steering {
        Some(st) => st.table(),
        None => Arc::new(UserRouteTable::default()),
    };
    let s = Scheduler::start(deployment, factory, table, LbPolicy::default())?;
    if let Some(st) = steering {
        st.attach(&s).map_err(|e| SchedError::Io { what: "steering attach", source: std::io::Error::other(e) })?;
    }
    tracing::info!(
        dags = config.dags.len(),
        functions = config.functions.len(),
        sgs = s.stats().len(),
        policy = ?config.dispatch,
        routes = s.lb().table_kind(),
        "DAG scheduler started"
    );
    Ok(Some(s))
}

/// Whether a reload from `old` to `new` needs a new scheduler: its DAGs,
/// functions or policy changed, or a model that a function runs was reloaded.
pub fn changed(old: &Config, new: &Config, reloaded_models: &[String]) -> bool {
    old.dags != new.dags
        || old.functions != new.functions
        || old.dispatch != new.dispatch
        || new.functions.iter().any(|f| f.model.as_ref().is_some_and(|m| reloaded_models.contains(m)))
}
