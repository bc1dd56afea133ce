//! Answers to control requests (list, metadata, stats, health, ready). They are
//! cheap and answered on the I/O thread that read them.

use serde_json::json;

use super::wire::{Dtype, Kind, RequestHeader, Status};
use super::ServeContext;

/// A control answer: status and payload bytes (JSON, or Prometheus text for stats).
pub struct ControlAnswer {
    pub status: Status,
    pub dtype: Dtype,
    pub body: Vec<u8>,
}

fn json_answer(status: Status, v: serde_json::Value) -> ControlAnswer {
    ControlAnswer { status, dtype: Dtype::Bytes, body: serde_json::to_vec(&v).unwrap_or_default() }
}

/// Answers a control request of `kind`.
pub fn answer(ctx: &ServeContext, kind: Kind, header: &RequestHeader, payload: &[u8]) -> ControlAnswer {
    match kind {
        Kind::ListModels => {
            let set = ctx.registry.snapshot();
            let mut models: Vec<_> = set.values().map(|m| &m.meta).collect();
            models.sort_by(|a, b| a.name.cmp(&b.name));
            json_answer(Status::Ok, json!({ "models": models }))
        }
        Kind::ModelInfo => {
            let found = match header.target_id.get() {
                0 => std::str::from_utf8(payload).ok().and_then(|n| ctx.registry.by_name(n.trim())),
                id => ctx.registry.get(id),
            };
            match found {
                Some(m) => {
                    let queued = m.queued_rows();
                    json_answer(
                        Status::Ok,
                        json!({ "model": m.meta, "queued_rows": queued, "estimate_us_batch1": m.estimate(1).as_micros() as u64 }),
                    )
                }
                None => json_answer(Status::UnknownModel, json!({ "error": "no such model" })),
            }
        }
        Kind::Stats => match &ctx.metrics {
            Some(h) => {
                crate::telemetry::queued_bytes(ctx.budget.used());
                ControlAnswer { status: Status::Ok, dtype: Dtype::Bytes, body: h.render().into_bytes() }
            }
            None => ControlAnswer {
                status: Status::Ok,
                dtype: Dtype::Bytes,
                body: b"# metrics recorder not installed\n".to_vec(),
            },
        },
        Kind::Health => {
            let stall = ctx.stall_period;
            let liveness = crate::liveness::node();
            let status = match liveness.check(stall) {
                _ if ctx.state.is_draining() => "draining",
                crate::liveness::Verdict::Alive => "ok",
                crate::liveness::Verdict::Stalled(_) => "stalled",
                crate::liveness::Verdict::Dead(_) => "failed",
            };
            health(ctx, status, liveness.report(stall))
        }
        Kind::Ready => json_answer(Status::Ok, json!({ "ready": ctx.state.is_ready() })),
        Kind::CacheTrain => match ctx.registry.get(header.target_id.get()) {
            None => json_answer(Status::UnknownModel, json!({ "error": "no such model" })),
            Some(m) => match &m.caches {
                None => json_answer(Status::BadPayload, json!({ "error": "the model has no [models.cache]" })),
                Some(c) => {
                    let (generation, rows, needed) = c.train_now();
                    json_answer(
                        Status::Ok,
                        json!({ "generation": generation, "window_rows": rows, "rows_needed": needed }),
                    )
                }
            },
        },
        Kind::AppSubmit => cluster_answer(crate::auction::node::control_submit(payload)),
        Kind::Apps => cluster_answer(crate::auction::node::control_apps()),
        Kind::Infer | Kind::Ping | Kind::InvokeDag => {
            json_answer(Status::UnknownKind, json!({ "error": "not a control request" }))
        }
    }
}

/// Stable label of a kind for metrics.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Infer => "infer",
        Kind::Ping => "ping",
        Kind::InvokeDag => "invoke_dag",
        Kind::ListModels => "list_models",
        Kind::ModelInfo => "model_info",
        Kind::Stats => "stats",
        Kind::Health => "health",
        Kind::Ready => "ready",
        Kind::CacheTrain => "cache_train",
        Kind::AppSubmit => "app_submit",
        Kind::Apps => "apps",
    }
}

fn cluster_answer(r: Result<serde_json::Value, String>) -> ControlAnswer {
    match r {
        Ok(v) => json_answer(Status::Ok, v),
        Err(e) => json_answer(Status::BadPayload, json!({ "error": e })),
    }
}

/// The `Health` answer: the node's state and every thread's liveness.
fn health(ctx: &ServeContext, status: &str, threads: Vec<crate::liveness::ThreadReport>) -> ControlAnswer {
    json_answer(
        Status::Ok,
        json!({
            "status": status,
            "ready": ctx.state.is_ready(),
            "uptime_s": ctx.state.started.elapsed().as_secs_f64(),
            "models": ctx.registry.snapshot().len(),
            "connections": ctx.state.connections.load(std::sync::atomic::Ordering::Relaxed),
            "queued_bytes": ctx.budget.used(),
            "max_queued_bytes": ctx.budget.limit(),
            "stall_period_ms": ctx.stall_period.as_millis() as u64,
            "threads": threads,
            "last_reload": ctx.state.last_reload().map(|r| json!({
                "ok": r.error.is_none(),
                "error": r.error,
                "age_s": r.at.elapsed().as_secs_f64(),
            })),
            "ort_library": crate::infer::runtime::loaded_library().map(|p| p.display().to_string()),
            "pid": std::process::id(),
            "steer": ctx.steering.as_ref().map(|s| s.status(ctx.dags.get().map_or(0, |s| s.stats().len()))),
            "gpu_devices": crate::auction::node::current().and_then(|n| n.devices_status()),
        }),
    )
}
