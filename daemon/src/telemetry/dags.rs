//! DAG dispatch metrics: per-request answers from the API, and the
//! scheduler's counters (deadline met/missed, failures, SGSs per DAG, cold
//! starts, warm workers per function) published from the control loop.
//! Scheduler counters restart from zero when a reload replaces the scheduler.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::names;

/// A DAG invocation was answered with `status` after `took` in the daemon.
pub fn dag_request_done(dag: &str, status: &'static str, took: Duration) {
    counter!(names::DAG_REQUESTS_TOTAL, "dag" => dag.to_string(), "status" => status).increment(1);
    if status == "ok" {
        histogram!(names::DAG_REQUEST_DURATION_SECONDS, "dag" => dag.to_string()).record(took.as_secs_f64());
    }
}

/// A DAG's outcomes so far (SGS counters) and how many SGSs serve it now.
pub fn dag_outcomes(dag: &str, met: u64, missed: u64, failed: u64, sgs: usize) {
    counter!(names::DAG_DEADLINE_MET_TOTAL, "dag" => dag.to_string()).absolute(met);
    counter!(names::DAG_DEADLINE_MISSED_TOTAL, "dag" => dag.to_string()).absolute(missed);
    counter!(names::DAG_FAILED_TOTAL, "dag" => dag.to_string()).absolute(failed);
    gauge!(names::DAG_SGS, "dag" => dag.to_string()).set(sgs as f64);
}

/// Worker starts and losses over all SGSs.
pub fn sched_workers(cold_starts: u64, prestarts: u64, crashes: u64, retries: u64) {
    counter!(names::SCHED_COLD_STARTS_TOTAL).absolute(cold_starts);
    counter!(names::SCHED_PRESTARTS_TOTAL).absolute(prestarts);
    counter!(names::SCHED_WORKER_CRASHES_TOTAL).absolute(crashes);
    counter!(names::SCHED_RETRIES_TOTAL).absolute(retries);
}

/// Workers of `function` alive over all SGSs (idle + busy).
pub fn function_workers(function: &str, n: u64) {
    gauge!(names::SCHED_FUNCTION_WORKERS, "function" => function.to_string()).set(n as f64);
}
