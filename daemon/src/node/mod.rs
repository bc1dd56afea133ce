//! The node: composes config, models, the API and systemd into the running
//! daemon, and owns its lifecycle (start, reload on SIGHUP, drain on SIGTERM).

pub mod dags;
pub mod models;
pub mod systemd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::api::listener::{ListenError, Listener};
use crate::api::server::Server;
use crate::api::{Limits, NodeState, ServeContext};
use crate::config::{self, Config, ConfigError};
use crate::infer::{self, InferError, Registry};
use crate::liveness::{self, Verdict};
use crate::sched::{self, DagService, SchedError};
use crate::telemetry;
use models::ModelLoadError;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(InferError),
    #[error("{} model(s) failed to load:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Models(Vec<ModelLoadError>),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("starting the DAG scheduler: {0}")]
    Sched(#[from] SchedError),
    #[error("a data-plane thread died: {0}")]
    ThreadDied(String),
    #[error(transparent)]
    Cluster(#[from] crate::auction::peer::service::ServiceError),
    #[error("steering: {0}")]
    Steer(#[from] crate::steer::SteerError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the daemon until SIGTERM/SIGINT, then drains and returns.
pub fn serve(config_path: &Path) -> Result<(), NodeError> {
    // Held pending until `run` has its handlers (then unblocked there): a
    // SIGHUP or SIGTERM during start-up is a reload or drain once the node
    // runs, not the default action (exit). Threads started meanwhile inherit
    // the mask, so these signals reach the main thread only.
    set_stop_signals_blocked(true);
    let config = config::load(config_path)?;
    infer::runtime::environment(config.runtime.ort_library.as_deref()).map_err(NodeError::Runtime)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NodeError::Io { what: "starting the control runtime", source })?;
    rt.block_on(run(config_path.to_owned(), config))
}

async fn run(config_path: PathBuf, config: Config) -> Result<(), NodeError> {
    // First, before anything can answer: a SIGHUP or SIGTERM that arrives
    // once a client (or systemd) has seen the node answer must be a reload or
    // a drain, never the default action (exit). Signals that arrive while
    // models load wait here and are handled when the loop below starts.
    let mut hup = signal(SignalKind::hangup()).map_err(|source| NodeError::Io { what: "SIGHUP handler", source })?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|source| NodeError::Io { what: "SIGTERM handler", source })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| NodeError::Io { what: "SIGINT handler", source })?;
    set_stop_signals_blocked(false);
    let (metrics, exporter) = telemetry::install(config.metrics.listen)?;
    if let Some(exporter) = exporter {
        tokio::spawn(async move {
            if let Err(e) = exporter.await {
                tracing::error!(error = ?e, "metrics endpoint stopped");
            }
        });
    }
    systemd::status("loading models");
    let registry = Arc::new(Registry::default());
    let mut stamps = HashMap::new();
    let (set, _) = models::build(&config.models, &Default::default(), &mut stamps, busy_poll(&config))
        .map_err(NodeError::Models)?;
    let count = set.len();
    registry.replace(set);
    // Before the scheduler: dags::start takes its route table from the steering.
    let steering = crate::steer::Steering::start(&config)?;
    let dags = Arc::new(DagService::default());
    dags.replace(dags::start(&config, &registry, Some(&steering))?);
    steering.serve(Arc::clone(&dags))?;

    let listener = Listener::open(&config.server.socket, config.server.socket_mode_bits())?;
    let state = Arc::new(NodeState::default());
    let ctx_budget = crate::api::budget::ByteBudget::new(config.server.max_queued_bytes as usize);
    let ctx = Arc::new(ServeContext {
        registry: Arc::clone(&registry),
        dags: Arc::clone(&dags),
        limits: Limits::from_config(&config.server),
        metrics: Some(metrics),
        state: Arc::clone(&state),
        budget: Arc::clone(&ctx_budget),
        stall_period: stall_period(),
        steering: Some(Arc::clone(&steering)),
    });
    if let Some(us) = steering.unix() {
        us.set_limits(crate::steer::unix::UnixLimits {
            state: Arc::clone(&state),
            max_inflight_per_conn: config.server.max_inflight_per_conn,
        });
    }
    // Before the I/O threads: a client the node answers finds its cluster view.
    let cluster = config.cluster.as_ref().map(crate::auction::peer::service::PeerService::start).transpose()?;
    let server = Server::start(std::os::fd::AsRawFd::as_raw_fd(&listener.fd), config.server.io_threads, ctx)
        .map_err(|source| NodeError::Io { what: "starting I/O threads", source })?;
    state.set_ready(true);
    let where_ = match &listener.origin {
        crate::api::listener::Origin::Systemd => "socket from systemd".to_string(),
        crate::api::listener::Origin::Bound(p) => p.display().to_string(),
    };
    tracing::info!(socket = %where_, models = count, io_threads = config.server.io_threads, "gatid ready");
    systemd::ready(&format!("serving {count} model(s) on {where_}"));

    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    let stall = stall_period();
    let mut rebalance = tokio::time::interval(Duration::from_secs(1));
    rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current = config;
    let mut fatal = None;
    let mut last_stall_log: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                current = reload(&config_path, current, &registry, &dags, &steering, &mut stamps, &state).await;
            }
            _ = rebalance.tick() => {
                if let Some(s) = dags.get() {
                    for change in s.rebalance(Instant::now()) {
                        tracing::info!(?change, "load balancer rescaled a DAG");
                    }
                    sched::service::publish_metrics(&s);
                }
                steering.record_metrics(dags.get().map_or(0, |s| s.stats().len()));
                telemetry::queued_bytes(ctx_budget.used());
                // Idle I/O threads sleep in their ring: wake them so they beat.
                server.wake_all();
                if let Verdict::Dead(why) = liveness::node().check(stall) {
                    fatal = Some(why);
                    break;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                // Fed only while every data-plane thread makes progress: a node
                // whose threads are stuck must look dead to systemd.
                match liveness::node().check(stall) {
                    Verdict::Alive => systemd::watchdog(),
                    Verdict::Stalled(why) => {
                        if last_stall_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::error!(why = %why, "watchdog not fed: a data-plane thread is stalled");
                            last_stall_log = Some(Instant::now());
                        }
                        systemd::status(&format!("stalled: {why}"));
                    }
                    Verdict::Dead(why) => {
                        fatal = Some(why);
                        break;
                    }
                }
            }
        }
    }
    if let Some(why) = &fatal {
        tracing::error!(why = %why, "a data-plane thread died; draining and exiting for a restart");
        systemd::status(&format!("failed: {why}"));
    }

    tracing::info!("stopping: draining in-flight requests");
    systemd::stopping();
    state.start_draining();
    steering.drain();
    if let Some(c) = cluster {
        tokio::task::spawn_blocking(move || c.stop()).await.unwrap_or(());
    }
    server.wake_all();
    let timeout = Duration::from_millis(current.server.drain_timeout_ms);
    let until = Instant::now() + timeout;
    // DAG requests in flight are answered by their SGSs before those stop;
    // then the I/O threads flush every answer and close.
    let old = dags.take();
    let drained = tokio::task::spawn_blocking(move || {
        let sched_done = old.is_none_or(|s| sched::service::retire(s, timeout));
        server.join(until.saturating_duration_since(Instant::now())) && sched_done
    })
    .await
    .unwrap_or(false);
    if drained {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!(timeout_ms = timeout.as_millis() as u64, "drain timed out; exiting with work in flight");
    }
    // The UDP I/O thread answered ShuttingDown during the drain; now it stops.
    steering.stop();
    // Threads do not run destructors at exit: save cache state explicitly.
    for model in registry.snapshot().values() {
        if let Some(c) = &model.caches {
            c.persist();
        }
    }
    drop(listener);
    match fatal {
        Some(why) => Err(NodeError::ThreadDied(why)),
        None => Ok(()),
    }
}

/// Blocks (or unblocks) SIGHUP, SIGTERM and SIGINT on the calling thread.
fn set_stop_signals_blocked(blocked: bool) {
    // SAFETY: sigset manipulation on a local set, then this thread's own mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        let how = if blocked { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// How long a data-plane thread may go without progress before the watchdog
/// is no longer fed: half `WatchdogSec` (systemd's ping interval), at least 2 s.
pub fn stall_period() -> Duration {
    systemd::watchdog_interval().unwrap_or(Duration::from_secs(5)).max(Duration::from_secs(2))
}

/// Keeps freed memory in the allocator instead of returning it to the kernel.
///
/// `munmap`/`brk` take the process's mmap lock for writing; a low-priority
/// thread (the paced cache trainer) preempted while holding it stalls
/// every serving thread that faults or maps memory — measured: serving p99
/// 0.56 → 2.8 ms while the trainer ran. With large buffers served from the
/// arenas and no trimming, steady-state training maps and unmaps nothing.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes glibc malloc's tunables; called at start-up.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn busy_poll(c: &Config) -> Duration {
    Duration::from_micros(c.server.busy_poll_us)
}

/// Re-reads the config and swaps in the new model set; keeps the old on any error.
async fn reload(
    path: &Path,
    current: Config,
    registry: &Arc<Registry>,
    dags: &Arc<DagService>,
    steering: &crate::steer::Steering,
    stamps: &mut HashMap<String, Option<(u64, std::time::SystemTime)>>,
    state: &NodeState,
) -> Config {
    systemd::reloading();
    tracing::info!(config = %path.display(), "SIGHUP: reloading configuration");
    let new = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: config invalid; still serving the previous one");
            systemd::ready("reload failed: config invalid; serving previous config");
            state.record_reload(Err(format!("config invalid: {e}")));
            return current;
        }
    };
    if new.server != current.server
        || new.metrics != current.metrics
        || new.runtime != current.runtime
        || new.cluster != current.cluster
    {
        tracing::warn!("changes to [server], [metrics], [runtime] or [cluster] take effect on restart only");
    }
    let old = registry.snapshot();
    let configs = new.models.clone();
    let poll = busy_poll(&current);
    let mut st = std::mem::take(stamps);
    let built = tokio::task::spawn_blocking(move || {
        let r = models::build(&configs, &old, &mut st, poll);
        (r, st)
    })
    .await;
    let Ok((result, st)) = built else {
        tracing::error!("reload task panicked; still serving the previous config");
        state.record_reload(Err("the reload task panicked".into()));
        return current;
    };
    *stamps = st;
    match result {
        Ok((set, changes)) => {
            let count = set.len();
            registry.replace(set);
            tracing::info!(added = ?changes.added, replaced = ?changes.replaced, removed = ?changes.removed, kept = ?changes.kept, "reload applied");
            let mut next = Config { models: new.models.clone(), ..current };
            if dags::changed(&next, &new, &changes.replaced) {
                match dags::start(&new, registry, Some(steering)) {
                    Ok(s) => {
                        // Requests already on the old SGSs finish there; new ones go to the new scheduler.
                        if let Some(old) = dags.replace(s) {
                            let timeout = Duration::from_millis(next.server.drain_timeout_ms);
                            tokio::task::spawn_blocking(move || sched::service::retire(old, timeout));
                        }
                        next.dags = new.dags;
                        next.functions = new.functions;
                        next.dispatch = new.dispatch;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reload: DAG scheduler did not start; keeping the previous DAGs");
                        state.record_reload(Err(format!("models applied; DAG scheduler did not start: {e}")));
                        systemd::ready(&format!("serving {count} model(s); reload kept the previous DAGs"));
                        return next;
                    }
                }
            }
            state.record_reload(Ok(()));
            systemd::ready(&format!("serving {count} model(s)"));
            next
        }
        Err(errors) => {
            for e in &errors {
                tracing::error!(error = %e, "reload refused: model failed to load");
            }
            systemd::ready("reload failed: a model did not load; serving previous config");
            let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
            state.record_reload(Err(format!("a model did not load: {}", why.join("; "))));
            current
        }
    }
}
