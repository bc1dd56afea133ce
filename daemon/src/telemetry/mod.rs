//! Metrics and logs: names, the Prometheus recorder, and the tracing subscriber.
//!
//! Every metric the daemon exports is recorded through a function here, so the
//! labels live in one place; the names, types and HELP texts are the table in
//! [`names`], described to the recorder at install. Without an installed recorder (tests,
//! the benchmark's in-process runs) these calls cost next to nothing.

mod dags;
pub mod names;
pub mod summary;
pub mod table;

pub use dags::{dag_outcomes, dag_request_done, function_workers, sched_workers};

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets, seconds: 50 µs … 10 s, roughly ×2 apart.
const LATENCY_BUCKETS: &[f64] = &[
    50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 15e-3, 20e-3, 30e-3, 50e-3, 100e-3, 200e-3,
    500e-3, 1.0, 2.0, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// Failures setting up metrics.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the Prometheus exporter: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    #[error("a metrics recorder is already installed")]
    AlreadyInstalled,
}

/// The exporter's HTTP server, to be spawned on the control runtime.
pub type ExporterFuture = metrics_exporter_prometheus::ExporterFuture;

/// The exporter's settings: bucket bounds for every histogram (without them
/// the exporter would render summaries).
fn builder() -> Result<PrometheusBuilder, TelemetryError> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(names::BATCH_ROWS.into()), BATCH_BUCKETS)?)
}

/// Installs the global recorder; returns the render handle and, with `listen`,
/// the HTTP exporter future to spawn.
pub fn install(listen: Option<SocketAddr>) -> Result<(PrometheusHandle, Option<ExporterFuture>), TelemetryError> {
    let mut builder = builder()?;
    if let Some(addr) = listen {
        builder = builder.with_http_listener(addr);
        let (recorder, exporter) = builder.build()?;
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::AlreadyInstalled)?;
        names::describe_all();
        Ok((handle, Some(exporter)))
    } else {
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::AlreadyInstalled)?;
        names::describe_all();
        Ok((handle, None))
    }
}

/// Logs to stderr (journald captures it under systemd), filtered by `GATI_LOG`;
/// coloured only on a terminal (the journal and log files get plain text).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// A request finished with `status` after `took` in the daemon.
pub fn request_done(model: &str, status: &'static str, took: Duration) {
    counter!(names::REQUESTS_TOTAL, "model" => model.to_string(), "status" => status).increment(1);
    if status == "ok" {
        histogram!(names::REQUEST_DURATION_SECONDS, "model" => model.to_string()).record(took.as_secs_f64());
    }
}

/// A control request of `kind` was answered.
pub fn control_done(kind: &'static str) {
    counter!(names::CONTROL_REQUESTS_TOTAL, "kind" => kind).increment(1);
}

/// One stage of `model` ran in `took`.
pub fn stage_time(model: &str, stage: usize, took: Duration) {
    histogram!(names::STAGE_DURATION_SECONDS, "model" => model.to_string(), "stage" => stage.to_string())
        .record(took.as_secs_f64());
}

/// The batcher of `model` ran a batch of `rows`.
pub fn batch_size(model: &str, rows: usize) {
    histogram!(names::BATCH_ROWS, "model" => model.to_string()).record(rows as f64);
}

/// Rows waiting in `model`'s queue.
pub fn queue_depth(model: &str, rows: usize) {
    gauge!(names::QUEUE_ROWS, "model" => model.to_string()).set(rows as f64);
}

/// Requests in flight across all connections.
pub fn inflight(delta: f64) {
    gauge!(names::INFLIGHT_REQUESTS).increment(delta);
}

/// Open client connections.
pub fn connections(delta: f64) {
    gauge!(names::CONNECTIONS).increment(delta);
}

/// Connections refused, by reason.
pub fn refused(reason: &'static str) {
    counter!(names::CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A request was refused before it was queued, for `reason` (queued_bytes,
/// model_queue, sgs_queue, inflight_per_conn, too_large).
pub fn request_refused(reason: &'static str) {
    counter!(names::REQUESTS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// A data-plane thread of `role` failed and was restarted (or, for a batcher,
/// the batch that panicked was answered `Failed` and the next one ran).
pub fn thread_restarted(role: &'static str) {
    counter!(names::THREAD_RESTARTS_TOTAL, "role" => role).increment(1);
}

/// Request bytes the node holds against `[server] max_queued_bytes`.
pub fn queued_bytes(bytes: usize) {
    gauge!(names::QUEUED_BYTES).set(bytes as f64);
}

/// A row of `model` was answered at `stage` (1-based; the last stage = full model).
pub fn cache_exit(model: &str, stage: usize) {
    counter!(names::EXITS_TOTAL, "model" => model.to_string(), "stage" => stage.to_string()).increment(1);
}

/// A row the oracle (a perfect selector over the active predictors) would
/// have answered at `stage`.
pub fn cache_oracle_exit(model: &str, stage: usize) {
    counter!(names::ORACLE_EXITS_TOTAL, "model" => model.to_string(), "stage" => stage.to_string()).increment(1);
}

/// Live disagreement estimate (shadow checks) and cache memory of `model`.
pub fn cache_state(model: &str, live_disagreement: f32, mem_bytes: usize) {
    gauge!(names::CACHE_LIVE_DISAGREEMENT, "model" => model.to_string()).set(f64::from(live_disagreement));
    gauge!(names::CACHE_MEMORY_BYTES, "model" => model.to_string()).set(mem_bytes as f64);
}

/// Cut `cut` of `model` is now in `state`, expected to answer `exit_share` of rows.
pub fn cache_cut_state(model: &str, cut: usize, state: crate::cache::placement::CutState, exit_share: f64) {
    for s in crate::cache::placement::CutState::ALL {
        let labels = [("model", model.to_string()), ("cut", cut.to_string()), ("state", s.as_str().to_string())];
        gauge!(names::CACHE_CUT_STATE, &labels).set(if s == state { 1.0 } else { 0.0 });
    }
    gauge!(names::CACHE_CUT_EXIT_SHARE, "model" => model.to_string(), "cut" => cut.to_string()).set(exit_share);
}

/// A new set of caches went live for `model`: its training generation and the
/// placement's expected and no-cache µs per row (exported in seconds).
pub fn cache_trained(model: &str, generation: u64, expected_us: f64, baseline_us: f64) {
    gauge!(names::CACHE_GENERATION, "model" => model.to_string()).set(generation as f64);
    gauge!(names::CACHE_EXPECTED_LATENCY_SECONDS, "model" => model.to_string()).set(expected_us * 1e-6);
    gauge!(names::CACHE_BASELINE_LATENCY_SECONDS, "model" => model.to_string()).set(baseline_us * 1e-6);
}
