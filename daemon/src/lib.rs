//! gati: a per-node DNN serving daemon (`gatid`) and its client (`gatictl`).
//!
//! Request path: `api` (socket, frames) → `infer` (batcher, staged models) →
//! `api` (response); DAG deployments go through `sched` (load balancer, SGSs,
//! worker pools) to `infer` or to `sandbox` (user functions in isolated worker
//! processes). `node` composes the parts and owns the lifecycle;
//! `config` is the only way configuration gets in; `telemetry` names every
//! metric. See `docs/architecture.md`.

pub mod api;
pub mod auction;
pub mod cache;
pub mod client;
pub mod config;
pub mod eventfd;
pub mod id;
pub mod infer;
pub mod liveness;
pub mod node;
pub mod reply;
pub mod sandbox;
pub mod sched;
pub mod steer;
pub mod telemetry;

/// Exit code for a bad configuration (sysexits EX_CONFIG); systemd's
/// `RestartPreventExitStatus=78` stops a restart loop on it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when a configured model cannot be loaded (EX_DATAERR).
pub const EXIT_MODEL: u8 = 65;
/// Exit code when ONNX Runtime cannot be loaded (EX_UNAVAILABLE).
pub const EXIT_RUNTIME: u8 = 69;
/// Exit code when a data-plane thread died for good (EX_SOFTWARE): the node
/// drained what it could and exits so that systemd restarts it.
pub const EXIT_SOFTWARE: u8 = 70;
