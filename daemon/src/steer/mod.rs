//! Request steering: how a DAG request reaches its SGS (docs/steering.md).
//!
//! Owns the eBPF side of the load balancer's routing table: the program and
//! maps of `ebpf/steer.h` ([`program`], [`layout`]), the [`BpfRouteTable`] the
//! LB writes, and the UDP ingress whose sockets the kernel picks from
//! ([`udp`]). [`Steering`] is the node's choice, made once at start from
//! `[steer] mode` and `[server] udp`: kernel steering when the program loads,
//! else the userspace table with the same rule, and the reason, which is logged
//! and shown by Health and `gatictl steer`. Promises: every route the LB
//! publishes reaches both the kernel map and the userspace copy; an SGS's
//! socket is only in the socket map while that SGS exists.

pub mod both;
pub mod layout;
pub mod program;
pub mod report;
pub mod table;
pub mod udp;
pub mod unix;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use serde_json::json;

pub use layout::Counter;
pub use program::Kernel;
pub use table::BpfRouteTable;
pub use unix::UnixSteer;

use crate::config::{Config, SteerMode, UnixSteerMode};
use crate::sched::{Attach, DagService, LoadBoard, RouteTable, Scheduler, UserRouteTable};
use crate::telemetry::names;
use udp::{SgsSocket, UdpCounters};

/// Errors loading or driving kernel steering.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("kernel steering unavailable: {0}")]
    Unavailable(String),
    #[error("cannot load the BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BPF program: {0}")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("BPF map: {0}")]
    Map(#[source] Box<aya::maps::MapError>),
    #[error("the BPF object has no `{0}`")]
    Missing(&'static str),
    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The UDP ingress: the I/O thread's socket and one socket per SGS (kernel mode).
struct Udp {
    addr: SocketAddr,
    default: Arc<UdpSocket>,
    sgs: Mutex<Vec<Option<Arc<UdpSocket>>>>,
    max_frame: usize,
    stop: Arc<AtomicBool>,
    /// The node drains: DAG requests are answered `ShuttingDown`.
    draining: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The node's steering: which table is active and why, and the UDP ingress.
pub struct Steering {
    configured: SteerMode,
    /// Why the kernel is not steering (`None`: it is).
    why_not: Option<String>,
    kernel: Option<Arc<Mutex<Kernel>>>,
    board: Arc<LoadBoard>,
    udp: Option<Udp>,
    counters: Arc<UdpCounters>,
    tables: RwLock<Option<Arc<dyn TableView>>>,
    /// Unix stream clients steered by the kernel (`[steer] unix = "kernel"`), or why not.
    unix: Result<Arc<UnixSteer>, String>,
}

/// A route table `gatictl steer` can list.
trait TableView: RouteTable {
    fn routes(&self) -> Vec<(u32, Vec<crate::sched::Route>)>;
}

impl TableView for BpfRouteTable {
    fn routes(&self) -> Vec<(u32, Vec<crate::sched::Route>)> {
        self.snapshot()
    }
}

impl TableView for UserRouteTable {
    fn routes(&self) -> Vec<(u32, Vec<crate::sched::Route>)> {
        self.snapshot()
    }
}

impl Steering {
    /// Chooses the steering for `config` (module docs). Kernel steering is tried
    /// only with a kernel-steered ingress (`[server] udp`) or `mode = "ebpf"`.
    pub fn start(config: &Config) -> Result<Arc<Self>, SteerError> {
        let configured = config.steer.mode;
        let want = match configured {
            SteerMode::Userspace => Err("configured: [steer] mode = \"userspace\"".to_string()),
            SteerMode::Auto if config.server.udp.is_none() && config.steer.unix != UnixSteerMode::Kernel => {
                Err("no kernel-steered ingress configured ([server] udp is unset, [steer] unix = \"userspace\")"
                    .to_string())
            }
            SteerMode::Auto | SteerMode::Ebpf => Ok(()),
        };
        let (mut kernel, why_not) = match want {
            Err(why) => (None, Some(why)),
            Ok(()) => match Kernel::load() {
                Ok(k) => (Some(k), None),
                Err(e) if configured == SteerMode::Ebpf => return Err(e),
                Err(e) => {
                    let why = chain(&e);
                    tracing::warn!(error = %why, "kernel steering unavailable: the userspace route table steers");
                    (None, Some(why))
                }
            },
        };
        let board = kernel.as_ref().map_or_else(|| Arc::new(LoadBoard::heap(layout::MAX_SGS)), Kernel::load_board);
        let udp = match config.server.udp {
            None => None,
            Some(addr) => Some(bind(addr, kernel.as_mut(), config.server.max_frame_bytes as usize)?),
        };
        let kernel = kernel.map(|k| Arc::new(Mutex::new(k)));
        let unix = match (&kernel, config.steer.unix) {
            (_, UnixSteerMode::Userspace) => Err("configured: [steer] unix = \"userspace\"".to_string()),
            (None, UnixSteerMode::Kernel) => Err(why_not.clone().unwrap_or_default()),
            (Some(k), UnixSteerMode::Kernel) => {
                let ready = k.lock().unwrap_or_else(|p| p.into_inner()).unix_ready();
                ready.map(|()| UnixSteer::new(Arc::clone(k), config.server.max_frame_bytes as usize))
            }
        };
        if let (Err(why), UnixSteerMode::Kernel, SteerMode::Ebpf) = (&unix, config.steer.unix, configured) {
            return Err(SteerError::Unavailable(format!("Unix stream verdict: {why}")));
        }
        let s = Arc::new(Self {
            configured,
            why_not,
            kernel,
            board,
            udp,
            counters: Arc::default(),
            tables: RwLock::new(None),
            unix,
        });
        match &s.why_not {
            None => tracing::info!(udp = ?s.udp_addr(), "kernel steering active (eBPF SK_REUSEPORT)"),
            Some(why) => tracing::info!(udp = ?s.udp_addr(), why = %why, "userspace steering"),
        }
        Ok(s)
    }

    /// True when the kernel program steers.
    pub fn kernel_active(&self) -> bool {
        self.kernel.is_some()
    }

    /// The kernel's Unix stream steering, when active (the I/O threads hand it
    /// their accepted connections).
    pub fn unix(&self) -> Option<&Arc<UnixSteer>> {
        self.unix.as_ref().ok()
    }

    /// The bound UDP address, when UDP ingress is on.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().map(|u| u.addr)
    }

    /// The load every SGS publishes (mapped into the kernel in kernel mode).
    pub fn load_board(&self) -> &Arc<LoadBoard> {
        &self.board
    }

    /// A fresh table for a new scheduler (the kernel's route map is cleared).
    pub fn table(&self) -> Arc<dyn RouteTable> {
        let (view, table): (Arc<dyn TableView>, Arc<dyn RouteTable>) = match &self.kernel {
            Some(k) => {
                let t = Arc::new(BpfRouteTable::new(Arc::clone(k), Arc::clone(&self.board)));
                (t.clone(), t)
            }
            None => {
                let t = Arc::new(UserRouteTable::with_load(Arc::clone(&self.board)));
                (t.clone(), t)
            }
        };
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = Some(view);
        table
    }

    /// Hands each of `sched`'s SGSs the load board and, with kernel steering and
    /// UDP on, its own socket (slot = SGS index); slots past the scheduler's SGSs
    /// are emptied and their sockets closed.
    pub fn attach(&self, sched: &Scheduler) -> Result<(), SteerError> {
        let n = sched.stats().len();
        for k in 0..n {
            let udp = self.sgs_socket(k, false)?;
            let ingress = self.ingress(k, udp)?;
            sched.attach(k, Attach { ingress, load: Some(Arc::clone(&self.board)) });
        }
        if let (Some(u), Some(kernel)) = (&self.udp, &self.kernel) {
            let mut socks = u.sgs.lock().unwrap_or_else(|p| p.into_inner());
            let mut kernel = kernel.lock().unwrap_or_else(|p| p.into_inner());
            for slot in n..socks.len() {
                if socks[slot].take().is_some() {
                    kernel.clear_socket(slot as u32)?;
                }
            }
        }
        if let Ok(unix) = &self.unix {
            unix.truncate(n);
        }
        Ok(())
    }

    /// SGS `k`'s ingress: its UDP socket and its Unix socket, those that exist.
    fn ingress(
        &self,
        k: usize,
        udp: Option<Arc<UdpSocket>>,
    ) -> Result<Option<Box<dyn crate::sched::Ingress>>, SteerError> {
        let mut parts: Vec<Box<dyn crate::sched::Ingress>> = Vec::new();
        if let Some(sock) = udp {
            let max = self.udp.as_ref().map_or(0, |u| u.max_frame);
            let draining = self.udp.as_ref().map_or_else(Arc::default, |u| Arc::clone(&u.draining));
            parts.push(Box::new(SgsSocket::new(sock, max, Arc::clone(&self.counters), draining)));
        }
        if let Ok(unix) = &self.unix {
            if let Some(s) = unix.sgs_ingress(k)? {
                parts.push(Box::new(s));
            }
        }
        both::Both::of(parts).map_err(|e| SteerError::Io { what: "SGS ingress epoll", source: e })
    }

    /// Replaces SGS `k`'s UDP socket with a new one (the old one is closed once the
    /// SGS lets go of it) and hands it to the SGS; false when there is none to replace.
    pub fn replace_socket(&self, sched: &Scheduler, k: usize) -> Result<bool, SteerError> {
        let Some(sock) = self.sgs_socket(k, true)? else { return Ok(false) };
        let ingress = self.ingress(k, Some(sock))?;
        Ok(sched.attach(k, Attach { ingress, load: None }))
    }

    /// SGS `k`'s socket, made (and put in the socket map) when missing or `fresh`.
    fn sgs_socket(&self, k: usize, fresh: bool) -> Result<Option<Arc<UdpSocket>>, SteerError> {
        let (Some(u), Some(kernel)) = (&self.udp, &self.kernel) else { return Ok(None) };
        if k >= layout::MAX_SGS {
            return Ok(None);
        }
        let mut socks = u.sgs.lock().unwrap_or_else(|p| p.into_inner());
        if socks.len() <= k {
            socks.resize(k + 1, None);
        }
        if let (Some(s), false) = (&socks[k], fresh) {
            return Ok(Some(Arc::clone(s)));
        }
        let sock = Arc::new(udp::reuseport_socket(u.addr).map_err(|e| SteerError::Io { what: "UDP bind", source: e })?);
        kernel.lock().unwrap_or_else(|p| p.into_inner()).set_socket(k as u32, &*sock)?;
        socks[k] = Some(Arc::clone(&sock));
        Ok(Some(sock))
    }

    /// Starts the UDP I/O thread on the default socket (no-op without UDP).
    pub fn serve(&self, dags: Arc<DagService>) -> Result<(), SteerError> {
        let Some(u) = &self.udp else { return Ok(()) };
        let (sock, stop, counters, max) =
            (Arc::clone(&u.default), Arc::clone(&u.stop), Arc::clone(&self.counters), u.max_frame);
        let draining = Arc::clone(&u.draining);
        let t = std::thread::Builder::new()
            .name("udp-io".into())
            .spawn(move || udp::serve_default(sock, dags, max, counters, stop, draining))
            .map_err(|e| SteerError::Io { what: "UDP I/O thread", source: e })?;
        *u.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Ok(())
    }

    /// The node starts draining: DAG requests that reach the daemon's own code
    /// are answered `ShuttingDown` from now on. The kernel's routes and Unix SGS
    /// slots are emptied, so that datagrams go to the UDP I/O thread's socket
    /// and Unix frames to the I/O threads, which answer them (a stopping SGS
    /// reads its sockets no more); requests already in an SGS's socket when
    /// this runs are not answered.
    pub fn drain(&self) {
        if let Some(u) = &self.udp {
            u.draining.store(true, Ordering::Release);
        }
        if let Some(k) = &self.kernel {
            let mut k = k.lock().unwrap_or_else(|p| p.into_inner());
            for dag in k.dags() {
                if let Err(e) = k.publish(dag, &[]) {
                    tracing::warn!(dag, error = %chain(&e), "drain: cannot remove the kernel's route");
                }
            }
        }
        if let Ok(unix) = &self.unix {
            unix.truncate(0);
        }
    }

    /// Stops the UDP I/O thread (SGS sockets close with their SGSs and this value).
    pub fn stop(&self) {
        if let Some(u) = &self.udp {
            u.stop.store(true, Ordering::Release);
            if let Some(t) = u.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = t.join();
            }
        }
    }

    /// Counters by [`Counter::ALL`]: the kernel program's (zeros without it) and the UDP code's.
    pub fn counters(&self) -> ([u64; 5], [u64; 5]) {
        let kernel = self.kernel.as_ref().map_or([0; 5], |k| k.lock().unwrap_or_else(|p| p.into_inner()).counters());
        (kernel, self.counters.get())
    }

    /// The Unix verdict's counters (zeros without it).
    pub fn unix_kernel_counters(&self) -> [u64; 5] {
        self.kernel.as_ref().map_or([0; 5], |k| k.lock().unwrap_or_else(|p| p.into_inner()).unix_counters())
    }

    /// `(run_time_ns, run_cnt)` of the Unix verdict (while stats are enabled).
    pub fn unix_run_stats(&self) -> Option<(u64, u64)> {
        self.kernel.as_ref()?.lock().unwrap_or_else(|p| p.into_inner()).unix_run_stats()
    }

    /// `(run_time_ns, run_cnt)` of the kernel program (while stats are enabled).
    pub fn run_stats(&self) -> Option<(u64, u64)> {
        self.kernel.as_ref()?.lock().unwrap_or_else(|p| p.into_inner()).run_stats()
    }

    /// Mode, reason, table, per-SGS load and counters, as JSON (Health, `gatictl steer`).
    pub fn status(&self, sgs: usize) -> serde_json::Value {
        let (kernel, user) = self.counters();
        let named = |c: [u64; 5]| {
            Counter::ALL.iter().zip(c).map(|(k, v)| (k.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>()
        };
        let table =
            self.tables.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|t| t.routes()).unwrap_or_default();
        let routes: Vec<_> = table
            .iter()
            .map(|(dag, r)| json!({ "dag": dag, "routes": r.iter().map(|r| json!({ "sgs": r.sgs, "weight": r.weight })).collect::<Vec<_>>() }))
            .collect();
        let load: Vec<_> = (0..sgs.min(self.board.len()))
            .map(|k| json!({ "sgs": k, "queued": self.board.queued(k), "idle": self.board.idle(k) }))
            .collect();
        json!({
            "mode": if self.kernel_active() { "ebpf" } else { "userspace" },
            "configured": self.configured.name(),
            "why": self.why_not,
            "build": program::BUILD,
            "udp": self.udp_addr().map(|a| a.to_string()),
            "table": routes,
            "load": load,
            "kernel_counters": named(kernel),
            "udp_counters": named(user),
            "unix": {
                "mode": if self.unix.is_ok() { "kernel" } else { "userspace" },
                "why": self.unix.as_ref().err(),
                "adopted": self.unix.as_ref().map_or(0, |u| u.adopted()),
                "kernel_counters": named(self.unix_kernel_counters()),
                "sgs_counters": named(self.unix.as_ref().map_or([0; 5], |u| u.counters.get())),
            },
        })
    }

    /// Records the counters and loads as metrics (call once a second).
    pub fn record_metrics(&self, sgs: usize) {
        let (kernel, user) = self.counters();
        for (k, c) in Counter::ALL.iter().enumerate() {
            metrics::counter!(names::STEER_REQUESTS_TOTAL, "path" => "kernel", "outcome" => c.name())
                .absolute(kernel[k]);
            metrics::counter!(names::STEER_REQUESTS_TOTAL, "path" => "userspace", "outcome" => c.name())
                .absolute(user[k]);
        }
        let unix = self.unix_kernel_counters();
        let unix_sgs = self.unix.as_ref().map_or([0; 5], |u| u.counters.get());
        for (k, c) in Counter::ALL.iter().enumerate() {
            metrics::counter!(names::STEER_REQUESTS_TOTAL, "path" => "unix_kernel", "outcome" => c.name())
                .absolute(unix[k]);
            metrics::counter!(names::STEER_REQUESTS_TOTAL, "path" => "unix_sgs", "outcome" => c.name())
                .absolute(unix_sgs[k]);
        }
        for k in 0..sgs.min(self.board.len()) {
            metrics::gauge!(names::STEER_SGS_QUEUED, "sgs" => k.to_string()).set(f64::from(self.board.queued(k)));
        }
        metrics::gauge!(names::STEER_KERNEL).set(if self.kernel_active() { 1.0 } else { 0.0 });
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the default socket; with the kernel, attaches the program to the group
/// and puts the socket in the default slot.
fn bind(addr: SocketAddr, kernel: Option<&mut Kernel>, max_frame: usize) -> Result<Udp, SteerError> {
    let io = |what| move |e| SteerError::Io { what, source: e };
    let default = udp::reuseport_socket(addr).map_err(io("UDP bind"))?;
    let addr = default.local_addr().map_err(io("UDP local address"))?;
    default.set_nonblocking(true).map_err(io("UDP non-blocking"))?;
    let default = Arc::new(default);
    if let Some(k) = kernel {
        k.attach(&*default)?;
        k.set_socket(layout::DEFAULT_SLOT, &*default)?;
    }
    let u = Udp {
        addr,
        default,
        sgs: Mutex::new(Vec::new()),
        max_frame: max_frame.min(udp::MAX_DATAGRAM - crate::api::wire::HEADER_LEN),
        stop: Arc::new(AtomicBool::new(false)),
        draining: Arc::new(AtomicBool::new(false)),
        thread: Mutex::new(None),
    };
    Ok(u)
}

/// An error and its sources on one line (the syscall's errno is at the end of the chain).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
