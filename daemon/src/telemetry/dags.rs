//! DAG dispatch metrics: per-request answers from the API, and the
//! scheduler's counters (deadline met/missed, failures, SGSs per DAG, cold
//! starts, warm workers per function) published from the control loop.
//! Scheduler counters restart from zero when a reload replaces the scheduler.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// A DAG invocation was answered with `status` after `took` in the daemon.
pub fn dag_request_done(dag: &str, status: &'static str, took: Duration) {
    counter!("gati_dag_requests_total", "dag" => dag.to_string(), "status" => status).increment(1);
    if status == "ok" {
        histogram!("gati_dag_request_duration_seconds", "dag" => dag.to_string()).record(took.as_secs_f64());
    }
}

/// A DAG's outcomes so far (SGS counters) and how many SGSs serve it now.
pub fn dag_outcomes(dag: &str, met: u64, missed: u64, failed: u64, sgs: usize) {
    counter!("gati_dag_deadline_met_total", "dag" => dag.to_string()).absolute(met);
    counter!("gati_dag_deadline_missed_total", "dag" => dag.to_string()).absolute(missed);
    counter!("gati_dag_failed_total", "dag" => dag.to_string()).absolute(failed);
    gauge!("gati_dag_sgs", "dag" => dag.to_string()).set(sgs as f64);
}

/// Worker starts and losses over all SGSs.
pub fn sched_workers(cold_starts: u64, prestarts: u64, crashes: u64, retries: u64) {
    counter!("gati_sched_cold_starts_total").absolute(cold_starts);
    counter!("gati_sched_prestarts_total").absolute(prestarts);
    counter!("gati_sched_worker_crashes_total").absolute(crashes);
    counter!("gati_sched_retries_total").absolute(retries);
}

/// Workers of `function` alive over all SGSs (idle + busy).
pub fn function_workers(function: &str, n: u64) {
    gauge!("gati_sched_function_workers", "function" => function.to_string()).set(n as f64);
}
