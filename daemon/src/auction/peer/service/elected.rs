//! The peer service's etcd session (a cluster with `etcd = [...]`): this
//! node's registration, its campaign for the arbiter, and — while it leads —
//! the arbiter over the stored state, its membership watch and its fenced
//! commits ([`crate::auction::etcd`]).
//!
//! One session at a time, restarted (after [`RETRY`]) when anything in it
//! fails: connect, grant an etcd lease, register `nodes/<id>` under it, then
//! at once keep the lease alive, observe the leader, and campaign. Winning
//! the election, the node reads the snapshot, becomes the arbiter, resyncs
//! every member and follows `nodes/` from the snapshot's revision. Every
//! arbiter step's changes are committed (fenced on the election key) before
//! its messages go out; a failed or refused commit, a lost keep-alive, an
//! ended watch or observe ends the session: the node stops arbitrating at
//! once (fencing by stopping), revokes its etcd lease (so the next candidate
//! wins without waiting for the TTL) and starts over as a candidate (after
//! [`RETRY`], backing off to [`RETRY_MAX`] while etcd is unreachable).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::Shared;
use crate::auction::etcd::record::{LeaderRecord, NodeRecord, Op};
use crate::auction::etcd::{Etcd, EtcdError, MemberEvent};
use crate::auction::node_arbiter::{ArbiterState, Out};
use crate::config::ClusterConfig;
use crate::telemetry::names;

/// Pause between sessions; doubled after each session that failed before
/// registering (etcd unreachable), up to [`RETRY_MAX`].
pub const RETRY: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

type Batch = (Vec<Op>, Vec<Out>);

/// The etcd side of [`Shared`].
#[derive(Debug)]
pub(super) struct Elected {
    leader: watch::Sender<Option<LeaderRecord>>,
    /// While this node leads: where its arbiter's steps queue for commit.
    commits: Mutex<Option<mpsc::UnboundedSender<Batch>>>,
    /// The last confirmed keep-alive of this node's etcd lease.
    alive: Mutex<Instant>,
    /// The session's connection and etcd lease, for [`Elected::leave`].
    session: Mutex<Option<(Etcd, i64)>>,
    /// Set by [`Elected::leave`]: no new session starts.
    leaving: std::sync::atomic::AtomicBool,
}

impl Elected {
    pub(super) fn new() -> Elected {
        Elected {
            leader: watch::channel(None).0,
            commits: Mutex::new(None),
            alive: Mutex::new(Instant::now()),
            session: Mutex::new(None),
            leaving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// At drain: stops arbitrating and revokes this node's etcd lease
    /// (bounded), so its registration and candidacy go at once.
    pub(super) async fn leave(&self, shared: &Shared) {
        self.leaving.store(true, std::sync::atomic::Ordering::Relaxed);
        self.set_commits(None);
        shared.arbiter_lock().take();
        let s = self.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        match s {
            Some((mut etcd, lease)) => match etcd.revoke(lease).await {
                Ok(()) => tracing::info!(lease, "left etcd"),
                Err(e) => {
                    count(&e);
                    tracing::warn!(error = %e, "leaving etcd");
                }
            },
            None => tracing::info!("no etcd session to leave"),
        }
    }

    /// The leader etcd names now, as this node last saw it.
    pub(super) fn leader(&self) -> Option<LeaderRecord> {
        self.leader.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Option<LeaderRecord>> {
        self.leader.subscribe()
    }

    /// Queues one arbiter step for commit (dropped if this node no longer leads).
    pub(super) fn enqueue(&self, ops: Vec<Op>, outs: Vec<Out>) {
        if let Some(tx) = self.commits.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            let _ = tx.send((ops, outs));
        }
    }

    fn set_commits(&self, tx: Option<mpsc::UnboundedSender<Batch>>) {
        *self.commits.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tx;
    }
}

fn count(e: &EtcdError) {
    metrics::counter!(names::ETCD_ERRORS_TOTAL, "op" => e.op()).increment(1);
}

fn arbiter_gauge(me: u32, on: bool) {
    metrics::gauge!(names::CLUSTER_ARBITER, "node" => me.to_string()).set(f64::from(u8::from(on)));
}

/// Sessions, one after the other, for as long as the peer service runs.
pub(super) async fn session_loop(shared: Arc<Shared>, cfg: ClusterConfig) {
    let Some(el) = shared.elected.as_ref() else { return };
    let mut pause = RETRY;
    while !el.leaving.load(std::sync::atomic::Ordering::Relaxed) {
        let started = Instant::now();
        let r = session(&shared, &cfg).await;
        // Whatever ended it: stop arbitrating first (no step queues any more).
        el.set_commits(None);
        let was = shared.arbiter_lock().take().is_some();
        arbiter_gauge(cfg.node_id, false);
        el.leader.send_replace(None);
        if let Err(e) = &r {
            count(e);
            tracing::warn!(error = %e, was_arbiter = was, "etcd session ended; starting a new one");
        }
        let ttl = Duration::from_secs(cfg.etcd_ttl_s().unsigned_abs());
        if el.alive.lock().map(|t| t.elapsed() > ttl).unwrap_or(true) {
            // This node's etcd lease has expired: the arbiter revoked its leases.
            shared.node.forget_view();
        }
        // A session that ran a while starts over quickly; etcd being away backs off.
        pause = if started.elapsed() > ttl { RETRY } else { (pause * 2).min(RETRY_MAX) };
        tokio::time::sleep(pause).await;
    }
}

async fn session(shared: &Arc<Shared>, cfg: &ClusterConfig) -> Result<(), EtcdError> {
    let mut etcd = Etcd::connect(cfg).await?;
    let ttl = cfg.etcd_ttl_s();
    let lease = etcd.grant(ttl).await?;
    if let Some(el) = &shared.elected {
        *el.alive.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        *el.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((etcd.clone(), lease));
    }
    let r = registered(shared, cfg, &etcd, lease, ttl).await;
    let leaving = shared.elected.as_ref().is_none_or(|el| {
        el.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        el.leaving.load(std::sync::atomic::Ordering::Relaxed)
    });
    if leaving {
        return r; // Elected::leave revokes the lease
    }
    if let Err(e) = etcd.revoke(lease).await {
        count(&e);
    }
    r
}

async fn registered(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    etcd: &Etcd,
    lease: i64,
    ttl: i64,
) -> Result<(), EtcdError> {
    let Some(el) = shared.elected.as_ref() else { return Ok(()) };
    let (mut reg, mut keep, mut obs, mut camp) = (etcd.clone(), etcd.clone(), etcd.clone(), etcd.clone());
    reg.register(cfg.node_id, &NodeRecord { listen: cfg.listen.to_string(), gpus: cfg.gpus }, lease).await?;
    tracing::info!(node = cfg.node_id, lease, ttl, "registered in etcd");
    let me = LeaderRecord { node: cfg.node_id, listen: cfg.listen.to_string() };
    let alive = || *el.alive.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    let seen = |l: LeaderRecord| {
        if el.leader() != Some(l.clone()) {
            tracing::info!(arbiter = l.node, listen = %l.listen, "etcd names the arbiter");
        }
        el.leader.send_replace(Some(l));
    };
    tokio::select! {
        r = keep.keep_alive(lease, ttl, alive) => r,
        r = obs.observe(seen) => r,
        r = async {
            let key = camp.campaign(lease, &me).await?;
            lead(shared, cfg, camp, key).await
        } => r,
    }
}

/// This node won the election: it arbitrates until something fails.
async fn lead(
    shared: &Arc<Shared>,
    cfg: &ClusterConfig,
    mut etcd: Etcd,
    key: etcd_client::LeaderKey,
) -> Result<(), EtcdError> {
    let Some(el) = shared.elected.as_ref() else { return Ok(()) };
    let (snap, rev) = etcd.snapshot().await?;
    let now = shared.now();
    let (members, apps, leases) = (snap.members.len(), snap.apps.len(), snap.leases.len());
    let (state, outs) = ArbiterState::elected(cfg.node_id, cfg, snap, now).map_err(|e| EtcdError::BadValue {
        op: "snapshot",
        key: "config".into(),
        msg: e.to_string(),
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
    *shared.arbiter_lock() = Some(state);
    el.set_commits(Some(tx));
    shared.step(|_| (outs, ()));
    arbiter_gauge(cfg.node_id, true);
    metrics::counter!(names::CLUSTER_ELECTIONS_WON_TOTAL).increment(1);
    tracing::info!(members, apps, leases, "elected arbiter; took over the stored apps and leases");
    let mut w = etcd.watch_members(rev + 1).await?;
    let mut committer = etcd.clone();
    let commits = async {
        while let Some((ops, outs)) = rx.recv().await {
            committer.commit(&key, &ops).await?;
            shared.route(outs);
        }
        Ok(())
    };
    let members = async {
        loop {
            for ev in etcd.member_events(&mut w).await? {
                let now = shared.now();
                shared.step(|a| {
                    let outs = match &ev {
                        MemberEvent::Up(n, rec) => a.member_up(*n, rec, now),
                        MemberEvent::Down(n) => a.member_down(*n),
                    };
                    (outs, ())
                });
            }
        }
    };
    tokio::select! {
        r = commits => r,
        r = members => r,
    }
}
