//! The client-facing API: wire format, the Unix socket, and the io_uring
//! data-plane threads that parse frames, answer control requests and hand
//! inference jobs to the models' batchers.
//!
//! Promises: a malformed frame only ever affects its own connection; every
//! accepted request gets exactly one response while its connection lives.

pub mod budget;
pub mod conn;
pub mod control;
pub mod listener;
pub mod request;
pub mod server;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::infer::Registry;
use listener::Allowlist;

/// Per-connection and per-frame limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub max_inflight_per_conn: u32,
    pub max_connections: u32,
    pub allow: Allowlist,
    /// How long an I/O thread polls before sleeping (0 = never polls).
    pub busy_poll: std::time::Duration,
}

impl Limits {
    /// From the `[server]` section.
    pub fn from_config(s: &crate::config::ServerConfig) -> Self {
        Self {
            max_frame_bytes: s.max_frame_bytes,
            max_inflight_per_conn: s.max_inflight_per_conn,
            max_connections: s.max_connections,
            allow: Allowlist { uids: s.allow_uids.clone(), gids: s.allow_gids.clone() },
            busy_poll: std::time::Duration::from_micros(s.busy_poll_us),
        }
    }
}

/// Daemon lifecycle facts the API reports and obeys.
#[derive(Debug)]
pub struct NodeState {
    ready: AtomicBool,
    draining: AtomicBool,
    pub started: Instant,
    pub connections: AtomicU32,
    last_reload: Mutex<Option<ReloadOutcome>>,
}

/// How the last SIGHUP reload ended (`Health` reports it: a refused reload
/// leaves the node serving its previous config, which only logs said before).
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub at: Instant,
    /// None: applied. Some: refused, with every error (the old config serves on).
    pub error: Option<String>,
}

impl Default for NodeState {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            connections: AtomicU32::new(0),
            last_reload: Mutex::new(None),
        }
    }
}

impl NodeState {
    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
    }
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// Records how a reload ended: `Err` carries why it was refused.
    pub fn record_reload(&self, result: Result<(), String>) {
        let outcome = ReloadOutcome { at: Instant::now(), error: result.err() };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
    }
    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        self.last_reload.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Everything an I/O thread needs, shared by all of them.
pub struct ServeContext {
    pub registry: Arc<Registry>,
    /// The DAG scheduler (`InvokeDag`); empty without `[[dags]]`.
    pub dags: Arc<crate::sched::DagService>,
    pub limits: Limits,
    pub metrics: Option<PrometheusHandle>,
    pub state: Arc<NodeState>,
    /// Request bytes the node holds (`[server] max_queued_bytes`).
    pub budget: Arc<budget::ByteBudget>,
    /// A data-plane thread silent for longer is stalled (`Health`, watchdog).
    pub stall_period: std::time::Duration,
    /// The node's request steering (Health; with kernel steering of Unix
    /// clients, accepted connections are handed to it).
    pub steering: Option<Arc<crate::steer::Steering>>,
}
