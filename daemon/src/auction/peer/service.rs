//! The peer service: a thread with its own tokio runtime, started by the node
//! when `[cluster]` is set and stopped at drain.
//!
//! - a TCP listener: a connection is admitted or refused at accept
//!   ([`admit`]: per source IP and in total), then read frame by frame
//!   (length bounded before allocation; the first frame must open within
//!   `peer_handshake_timeout_s`, later ones arrive within [`READ_TIMEOUT`]),
//!   each frame opened with the cluster key and the process-wide replay
//!   guard; a refused frame is counted under its reason and closes the
//!   connection;
//! - a link to the arbiter (a non-arbiter node): join, then heartbeats and
//!   submits, reconnecting when it drops — to the static arbiter, or on etcd
//!   to whoever leads now ([`elected`]: registration, election, the stored
//!   state and its fenced commits);
//! - on the arbiter: one ordered link per member for what
//!   [`ArbiterState`] broadcasts, and the lease round every `round_s`;
//!   the arbiter node's own node-side traffic stays in process;
//! - the enforcer's tick ([`Enforcer`]).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub mod admit;
mod elected;
mod links;
mod rounds;

use links::{arbiter_link, link, Target};

use super::frame::{open, ClusterKey, ReplayGuard, Sealer};
use super::io::read_frame;
use super::message::Message;
use super::PeerError;
use crate::auction::gpu::{GpuId, NodeId};
use crate::auction::node::{set_current, ClusterNode};
use crate::auction::node_arbiter::{heartbeat_s, kind, ArbiterState, Out};
use crate::auction::node_enforce::Enforcer;
use crate::config::{check_key_file, ClusterConfig};
use crate::telemetry::names;

/// An established connection silent this long is closed.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued to the arbiter before new ones are refused.
pub const OUTBOX: usize = 1024;
/// Messages queued on the arbiter for one member; past it the queue is
/// dropped and replaced by a resync (`welcome`, the member's home apps,
/// every lease) on a new link sized to hold all of it ([`Shared::resync_to`]).
pub const LINK_QUEUE: usize = 4096;

/// Why the peer service did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cluster key: {0}")]
    Key(String),
    #[error("peer listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("peer service: {0}")]
    Io(#[from] std::io::Error),
    #[error("arbiter: {0}")]
    Arbiter(#[from] crate::auction::AuctionError),
}

/// The running service; [`PeerService::stop`] ends it.
#[derive(Debug)]
pub struct PeerService {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerService {
    /// Reads the key, binds the listener, starts the thread.
    pub fn start(cfg: &ClusterConfig) -> Result<PeerService, ServiceError> {
        let key = ClusterKey::new(&check_key_file(&cfg.key_file).map_err(ServiceError::Key)?)
            .map_err(|e| ServiceError::Key(e.to_string()))?;
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|source| ServiceError::Bind { addr: cfg.listen, source })?;
        listener.set_nonblocking(true)?;
        // A static arbiter from the start; on etcd, once elected.
        let arbiter = if cfg.is_arbiter() { Some(ArbiterState::new(cfg.node_id, cfg)?) } else { None };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let cfg = cfg.clone();
        // This node's view exists before the service returns (before the node
        // answers its first client): `Apps` and `AppSubmit` never find it missing.
        let (outbox_tx, outbox) = mpsc::channel(OUTBOX);
        let node = Arc::new(ClusterNode::new(cfg.clone(), outbox_tx));
        set_current(Some(Arc::clone(&node)));
        let thread = std::thread::Builder::new().name("gati-peer".into()).spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => run(cfg, key, l, arbiter, stopped, node, outbox).await,
                    Err(e) => tracing::error!(error = %e, "peer listener"),
                }
            });
        })?;
        tracing::info!("peer service started");
        Ok(PeerService { stop: Some(stop), thread: Some(thread) })
    }

    /// Stops the service: app processes get SIGTERM, then SIGKILL after the grace period.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Shared by the service's tasks.
struct Shared {
    me: NodeId,
    key: ClusterKey,
    guard: Mutex<ReplayGuard>,
    sealer: Mutex<Sealer>,
    node: Arc<ClusterNode>,
    /// The arbiter this node runs: the static one, or on etcd while elected.
    arbiter: Mutex<Option<ArbiterState>>,
    /// On etcd: the leader seen, and the commit queue while this node leads.
    elected: Option<elected::Elected>,
    links: Mutex<HashMap<NodeId, (SocketAddr, mpsc::Sender<Message>)>>,
    /// Members whose link overflowed, until the resync asked for them is
    /// sent: what is routed to them meanwhile is older than that resync and
    /// superseded by it (dropped).
    resyncing: Mutex<HashSet<NodeId>>,
    admission: Arc<admit::Admission>,
    handshake_timeout: Duration,
    t0: Instant,
}

impl Shared {
    /// The arbiter's clock: since this process started for a static arbiter;
    /// on etcd, seconds since the Unix epoch, so that a new arbiter reads the
    /// old one's lease expiries on the same clock (nodes' clocks synchronised).
    fn now(&self) -> f64 {
        if self.elected.is_some() {
            return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        }
        self.t0.elapsed().as_secs_f64()
    }

    fn is_arbiter(&self) -> bool {
        self.arbiter_lock().is_some()
    }

    /// Runs `f` on this node's arbiter (if it is one now) and sends what it
    /// decided: at once with a static arbiter; on etcd, in order, once the
    /// step's changes are stored (a deposed arbiter's are refused by etcd and
    /// never sent).
    fn step<R>(self: &Arc<Self>, f: impl FnOnce(&mut ArbiterState) -> (Vec<Out>, R)) -> Option<R> {
        let mut g = self.arbiter_lock();
        let a = g.as_mut()?;
        let (outs, r) = f(a);
        match &self.elected {
            Some(e) => {
                let ops = a.take_ops();
                if !ops.is_empty() || !outs.is_empty() {
                    e.enqueue(ops, outs); // under the lock: in the order decided
                }
                drop(g);
            }
            None => {
                drop(g);
                self.route(outs);
            }
        }
        Some(r)
    }

    fn members(&self) -> Vec<NodeId> {
        self.arbiter_lock().as_ref().map(|a| a.members().keys().copied().collect()).unwrap_or_default()
    }

    fn seal(&self, m: &Message) -> Vec<u8> {
        self.sealer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).seal(m)
    }

    /// Sends what the arbiter decided; to this node itself, in process.
    fn route(self: &Arc<Self>, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::To(n, m) => self.send_to(n, m),
                Out::Resync(n, msgs) => self.resync_to(n, msgs),
                Out::All(m) => {
                    for n in self.members() {
                        self.send_to(n, m.clone());
                    }
                }
            }
        }
    }

    fn arbiter_lock(&self) -> std::sync::MutexGuard<'_, Option<ArbiterState>> {
        self.arbiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send_to(self: &Arc<Self>, n: NodeId, m: Message) {
        if n == self.me {
            if let Err(e) = self.node.apply(self.me, m) {
                tracing::warn!(error = %e, "own arbiter message refused");
            }
            return;
        }
        if self.resyncing_lock().contains(&n) {
            return; // superseded by the resync on its way
        }
        let addr = self.member_addr(n);
        let mut links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(addr) = addr else {
            links.remove(&n);
            return;
        };
        let fresh = links.get(&n).is_none_or(|(a, tx)| *a != addr || tx.is_closed());
        if fresh {
            links.insert(n, self.new_link(addr, LINK_QUEUE));
        }
        let Some((_, tx)) = links.get(&n) else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(m) {
            // The member is not reading: its backlog goes (the link stops
            // sending it), and the arbiter resyncs it — as a step of its own,
            // so that on etcd it follows the changes stored before it.
            drop(links);
            tracing::warn!(node = n, "peer link backlog full; resyncing the node");
            metrics::counter!(names::CLUSTER_LINK_RESYNCS_TOTAL, "reason" => "backlog").increment(1);
            self.resyncing_lock().insert(n);
            self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&n);
            let now = self.now();
            if self.step(|a| (vec![Out::Resync(n, a.resync(n, now))], ())).is_none() {
                self.resyncing_lock().remove(&n); // no longer the arbiter
            }
        }
    }

    /// Sends member `n` a resync whole: on its link if the room left there
    /// holds it, else on a new link sized for it plus [`LINK_QUEUE`] (the
    /// old link's backlog, superseded, is not sent). It cannot overflow:
    /// the room is checked under the links lock, which every send holds.
    fn resync_to(self: &Arc<Self>, n: NodeId, msgs: Vec<Message>) {
        if n == self.me {
            for m in msgs {
                self.send_to(n, m);
            }
            return;
        }
        self.resyncing_lock().remove(&n);
        let addr = self.member_addr(n);
        let mut links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(addr) = addr else {
            links.remove(&n);
            return;
        };
        let room = links.get(&n).filter(|(a, tx)| *a == addr && !tx.is_closed()).map(|(_, tx)| tx.capacity());
        if room.is_none_or(|r| r < msgs.len()) {
            if room.is_some() {
                metrics::counter!(names::CLUSTER_LINK_RESYNCS_TOTAL, "reason" => "large").increment(1);
            }
            links.insert(n, self.new_link(addr, msgs.len() + LINK_QUEUE));
        }
        let Some((_, tx)) = links.get(&n) else { return };
        for m in msgs {
            if tx.try_send(m).is_err() {
                tracing::error!(node = n, "resync message not queued"); // not reached: room checked above
            }
        }
    }

    fn member_addr(&self, n: NodeId) -> Option<SocketAddr> {
        self.arbiter_lock().as_ref().and_then(|a| a.members().get(&n).map(|m| m.listen))
    }

    fn resyncing_lock(&self) -> std::sync::MutexGuard<'_, HashSet<NodeId>> {
        self.resyncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn new_link(self: &Arc<Self>, addr: SocketAddr, capacity: usize) -> (SocketAddr, mpsc::Sender<Message>) {
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(link(Arc::clone(self), addr, rx));
        (addr, tx)
    }

    /// A message arrived from authenticated `sender`; `false`: close the
    /// connection (the arbiter refused a message from a node that is not a
    /// member — e.g. one removed while it was silent — so that its link
    /// reconnects and joins again).
    fn dispatch(self: &Arc<Self>, sender: NodeId, msg: Message) -> bool {
        let k = kind(&msg);
        let to_arbiter = matches!(
            msg,
            Message::Join { .. } | Message::Submit { .. } | Message::Inventory { .. } | Message::Bid { .. }
        ) || (matches!(msg, Message::Heartbeat { .. }) && self.is_arbiter());
        let r = if to_arbiter {
            self.handle_as_arbiter(sender, msg)
        } else {
            match &self.elected {
                // On etcd a welcome (a new view) is taken only from the elected leader.
                Some(e) if matches!(msg, Message::Welcome { .. }) && e.leader().map(|l| l.node) != Some(sender) => {
                    Err(format!("welcome from node {sender}, which etcd does not name the arbiter"))
                }
                _ => self.node.apply(sender, msg),
            }
        };
        match r {
            Ok(()) => {
                metrics::counter!(names::PEER_FRAMES_TOTAL, "kind" => k).increment(1);
                true
            }
            Err(e) => {
                tracing::warn!(sender, kind = k, error = %e, "peer message refused");
                metrics::counter!(names::PEER_FRAMES_REJECTED_TOTAL, "reason" => "refused").increment(1);
                !to_arbiter || self.arbiter_lock().as_ref().is_none_or(|a| a.members().contains_key(&sender))
            }
        }
    }

    fn handle_as_arbiter(self: &Arc<Self>, sender: NodeId, msg: Message) -> Result<(), String> {
        let now = self.now();
        let r = self.step(|a| match a.handle(sender, msg, now) {
            Ok(outs) => (outs, Ok(())),
            Err(e) => (Vec::new(), Err(e)),
        });
        r.unwrap_or_else(|| Err("this node is not the arbiter".into()))
    }
}

async fn run(
    cfg: ClusterConfig,
    key: ClusterKey,
    listener: TcpListener,
    arbiter: Option<ArbiterState>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    node: Arc<ClusterNode>,
    mut outbox: mpsc::Receiver<Message>,
) {
    let start_us =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let shared = Arc::new(Shared {
        me: cfg.node_id,
        key: key.clone(),
        guard: Mutex::new(ReplayGuard::default()),
        sealer: Mutex::new(Sealer::new(key, cfg.node_id, start_us)),
        node: Arc::clone(&node),
        arbiter: Mutex::new(arbiter),
        elected: cfg.uses_etcd().then(elected::Elected::new),
        links: Mutex::new(HashMap::new()),
        resyncing: Mutex::new(HashSet::new()),
        admission: admit::Admission::new(admit::Limits {
            max_connections: cfg.peer_max_connections,
            max_per_ip: cfg.peer_max_per_ip,
        }),
        handshake_timeout: Duration::from_secs_f64(cfg.peer_handshake_timeout_s),
        t0: Instant::now(),
    });
    let join = Message::Join {
        node: cfg.node_id,
        listen: cfg.listen.to_string(),
        gpus: (0..cfg.gpus).map(|index| GpuId { node: cfg.node_id, index }).collect(),
    };
    // To the arbiter: in process on the arbiter node, else over a link.
    let (to_arb_tx, to_arb_rx) = mpsc::unbounded_channel::<Message>();
    let target = match (&shared.elected, cfg.arbiter) {
        (Some(e), _) => {
            tokio::spawn(elected::session_loop(Arc::clone(&shared), cfg.clone()));
            Some(Target::Elected(e.subscribe()))
        }
        (None, Some(_)) if cfg.is_arbiter() => {
            let _ = shared.handle_as_arbiter(cfg.node_id, join.clone());
            None
        }
        (None, Some(addr)) => Some(Target::Static(addr)),
        (None, None) => None, // refused by config checks
    };
    if let Some(t) = target {
        tokio::spawn(arbiter_link(Arc::clone(&shared), t, join.clone(), to_arb_rx));
    }
    metrics::gauge!(names::CLUSTER_ARBITER, "node" => cfg.node_id.to_string())
        .set(f64::from(u8::from(cfg.is_arbiter())));
    tokio::spawn(accept(Arc::clone(&shared), listener));

    let hb = Duration::from_secs_f64(heartbeat_s(cfg.round_s));
    let mut beat = tokio::time::interval(hb);
    let mut round = tokio::time::interval(Duration::from_secs_f64(cfg.round_s));
    let mut enforce = tokio::time::interval(Duration::from_millis(100));
    for t in [&mut beat, &mut round, &mut enforce] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut enforcer = Enforcer::new(cfg.node_id, Duration::from_secs_f64(cfg.grace_s));
    let mut close_at: Option<rounds::Deadline> = None;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(m) = outbox.recv() => {
                if shared.is_arbiter() {
                    if let Err(e) = shared.handle_as_arbiter(cfg.node_id, m) {
                        tracing::warn!(error = %e, "own message refused by the arbiter");
                    }
                } else {
                    let _ = to_arb_tx.send(m);
                }
            }
            _ = beat.tick() => {
                let hb = Message::Heartbeat { node: cfg.node_id };
                if shared.is_arbiter() {
                    let _ = shared.handle_as_arbiter(cfg.node_id, hb.clone());
                    for n in shared.members().into_iter().filter(|&n| n != cfg.node_id) {
                        shared.send_to(n, hb.clone());
                    }
                } else {
                    let _ = to_arb_tx.send(hb);
                }
            }
            _ = round.tick() => {
                if let Some((id, _)) = close_at.take() {
                    rounds::close(&shared, id); // late (a slow machine): it closes before the next opens
                }
                close_at = rounds::begin(&shared, &cfg);
            }
            () = rounds::until(close_at), if close_at.is_some() => {
                if let Some((id, _)) = close_at.take() {
                    rounds::close(&shared, id);
                }
            }
            _ = enforce.tick() => {
                rounds::publish(&shared);
                node.lapse(Instant::now());
                enforcer.reconcile(&node.desired());
                node.set_pids(enforcer.pids());
                let leases = node.view.lock().map(|v| v.leases.len()).unwrap_or(0);
                metrics::gauge!(names::CLUSTER_LEASES).set(leases as f64);
            }
        }
    }
    set_current(None);
    if let Some(e) = &shared.elected {
        // Leave etcd now rather than after the TTL: another node takes over at once.
        e.leave(&shared).await;
    }
    enforcer.stop_all();
    tracing::info!("peer service stopped");
}

/// Logs the refusals at accept since the last line, if one is due (at most
/// one line a second; the accept loop's tick flushes the tail of a burst).
fn warn_refused(shared: &Shared) {
    let Some((n, ip, r)) = shared.admission.warn_due(Instant::now()) else { return };
    let l = shared.admission.limits();
    let (handshake, established) = shared.admission.open();
    tracing::warn!(
        refused = n,
        last_from = %ip,
        last_reason = r.reason(),
        handshake,
        established,
        max_connections = l.max_connections,
        max_per_ip = l.max_per_ip,
        "peer connections refused at accept since the last warning"
    );
}

async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    let mut flush = tokio::time::interval(admit::WARN_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = flush.tick() => {
                warn_refused(&shared);
                continue;
            }
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let slot = match shared.admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(_) => {
                drop(stream); // closed at once (counted by `admit`)
                warn_refused(&shared);
                continue;
            }
        };
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = serve_conn(&s, stream, slot).await {
                tracing::debug!(%peer, error = %e, "peer connection closed");
            }
        });
    }
}

/// Reads frames until the stream ends or one is refused (counted, then
/// closed); the first must open within the handshake timeout. `slot` is
/// given back when the connection ends.
async fn serve_conn(shared: &Arc<Shared>, mut stream: TcpStream, mut slot: admit::Slot) -> Result<(), PeerError> {
    loop {
        let (limit, on_timeout) = if slot.is_established() {
            (READ_TIMEOUT, "timeout")
        } else {
            (shared.handshake_timeout, "handshake_timeout")
        };
        let frame = match tokio::time::timeout(limit, read_frame(&mut stream)).await {
            Err(_) => {
                metrics::counter!(names::PEER_FRAMES_REJECTED_TOTAL, "reason" => on_timeout).increment(1);
                return Err(PeerError::Io(format!("{on_timeout} ({limit:?})")));
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) => f,
            Ok(Err(e)) => {
                metrics::counter!(names::PEER_FRAMES_REJECTED_TOTAL, "reason" => e.reason()).increment(1);
                return Err(e);
            }
        };
        let opened = {
            let mut g = shared.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            open(&shared.key, &mut g, &frame)
        };
        match opened {
            Ok(o) => {
                slot.establish();
                if !shared.dispatch(o.sender, o.message) {
                    return Err(PeerError::Io(format!("node {} is not a member", o.sender)));
                }
            }
            Err(e) => {
                metrics::counter!(names::PEER_FRAMES_REJECTED_TOTAL, "reason" => e.reason()).increment(1);
                return Err(e);
            }
        }
    }
}
