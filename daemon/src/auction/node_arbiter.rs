//! The arbiter as it runs inside a gatid node: the cluster's members (from
//! their `join` and heartbeats), the submitted apps, and the existing
//! [`Arbiter`] round every `round_s`. Pure state: it takes messages and the
//! time, and returns what to send to which node; the network is
//! [`super::peer::service`]'s.
//!
//! Every change to the lease table is broadcast to every member (expired and
//! revoked leases as `revoke` before the round's `grant`s, on one ordered
//! stream per member), so every node holds the same view of who leases which
//! GPU. A member silent for [`DEAD_AFTER_HEARTBEATS`] heartbeat periods is
//! removed and its leases revoked.
//!
//! On etcd ([`ArbiterState::elected`], `node_arbiter/takeover.rs`) the members are the nodes registered
//! in etcd ([`ArbiterState::member_up`] / [`ArbiterState::member_down`], no
//! heartbeat timeout), the state starts from what the previous arbiter
//! stored, and every change to apps and leases is also journalled as an
//! [`Op`] ([`ArbiterState::take_ops`]) that the service writes to etcd before
//! it sends the messages of the same step.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

mod round;
mod takeover;

pub use round::{BidRefusal, RoundSummary, MAX_BID_OPTIONS, RECENT_ROUNDS};

use super::app::{App, AppId, AppSpec};
use super::arbiter::{Arbiter, ArbiterConfig};
use super::etcd::record::{AppRecord, NodeRecord, Op};
use super::gpu::NodeId;
use super::lease::Lease;
use super::peer::message::Message;
use super::throughput::ThroughputModel;
use super::AuctionError;
use crate::config::ClusterConfig;

/// The `revoke` reason of a finished app's leases (its agent goes with it).
pub const FINISHED: &str = "app finished";
/// A member silent this many heartbeat periods is gone.
pub const DEAD_AFTER_HEARTBEATS: f64 = 4.0;
/// Most apps the arbiter tracks (a submit over it is refused).
pub const MAX_APPS: usize = 10_000;
/// Most members.
pub const MAX_NODES: usize = 1024;
/// Most arguments and bytes of an app's command.
pub const MAX_COMMAND_ARGS: usize = 256;
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

/// The heartbeat period for a round length.
pub fn heartbeat_s(round_s: f64) -> f64 {
    (round_s / 2.0).clamp(0.05, 1.0)
}

/// A member of the cluster.
#[derive(Clone, Debug)]
pub struct Member {
    pub listen: SocketAddr,
    pub gpus: u32,
    pub last_seen: f64,
}

/// A submitted app as the arbiter tracks it.
#[derive(Clone, Debug)]
pub struct TrackedApp {
    pub app: App,
    pub command: Vec<String>,
    /// The node it was submitted on.
    pub node: NodeId,
}

/// What to send: to one member, or to all.
#[derive(Clone, Debug, PartialEq)]
pub enum Out {
    To(NodeId, Message),
    All(Message),
    /// What brings member `0`'s view up to date ([`ArbiterState::resync`]),
    /// as one batch: the service queues it whole on the member's link, or on
    /// a new link sized to hold it — never in part.
    Resync(NodeId, Vec<Message>),
}

impl Out {
    /// The same, a resync as its messages one by one (tests, in-process delivery).
    pub fn each(self) -> Vec<Out> {
        match self {
            Out::Resync(n, msgs) => msgs.into_iter().map(|m| Out::To(n, m)).collect(),
            o => vec![o],
        }
    }
}

/// The arbiter node's state.
#[derive(Debug)]
pub struct ArbiterState {
    me: NodeId,
    arbiter: Arbiter,
    members: BTreeMap<NodeId, Member>,
    apps: BTreeMap<AppId, TrackedApp>,
    heartbeat_s: f64,
    lease_s: f64,
    model: Arc<ThroughputModel>,
    /// Members come from etcd (no heartbeat timeout) and changes are journalled.
    on_etcd: bool,
    ops: Vec<Op>,
    /// How long a round waits for its bids, seconds.
    bid_deadline_s: f64,
    /// The last round id (starts from the clock: a new arbiter's rounds are
    /// not its predecessor's).
    round_seq: u64,
    /// The round waiting for bids.
    pending: Option<round::Pending>,
    recent: VecDeque<RoundSummary>,
}

impl ArbiterState {
    pub fn new(me: NodeId, cfg: &ClusterConfig) -> Result<ArbiterState, AuctionError> {
        let arbiter = Arbiter::new(ArbiterConfig { fairness_f: cfg.f, lease_s: cfg.lease_s }, &[])?;
        Ok(ArbiterState {
            me,
            arbiter,
            members: BTreeMap::new(),
            apps: BTreeMap::new(),
            heartbeat_s: heartbeat_s(cfg.round_s),
            lease_s: cfg.lease_s,
            model: super::agent::submitted_model(),
            on_etcd: false,
            ops: Vec::new(),
            bid_deadline_s: cfg.bid_deadline_s(),
            round_seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            pending: None,
            recent: VecDeque::new(),
        })
    }

    /// The changes to store since the last call (on etcd; empty otherwise).
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    fn journal(&mut self, op: Op) {
        if self.on_etcd {
            self.ops.push(op);
        }
    }

    fn journal_app(&mut self, id: AppId) {
        if !self.on_etcd {
            return;
        }
        if let Some(t) = self.apps.get(&id) {
            let s = &t.app.spec;
            self.ops.push(Op::PutApp(AppRecord {
                id,
                node: t.node,
                name: s.name.clone(),
                demand: s.demand,
                work: s.total_work,
                command: t.command.clone(),
                arrival: s.arrival,
                progress: t.app.progress(),
                model: ThroughputModel::clone(&s.model),
            }));
        }
    }

    /// A lease ended: every member hears it, etcd forgets it.
    fn ended(&mut self, l: &Lease, reason: &str, out: &mut Vec<Out>) {
        out.push(Out::All(revoke(l, reason)));
        self.journal(Op::DelLease(l.id));
    }

    /// A node registered in etcd (or re-registered, maybe with other GPUs).
    pub fn member_up(&mut self, node: NodeId, rec: &NodeRecord, now: f64) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(m) = member(rec, now) else {
            tracing::warn!(node, listen = %rec.listen, gpus = rec.gpus, "etcd member record refused");
            return out;
        };
        if !self.members.contains_key(&node) && self.members.len() >= MAX_NODES {
            return out;
        }
        let known = self.members.get(&node).map(|m| m.gpus);
        let n = m.gpus;
        self.members.insert(node, m);
        if known != Some(n) {
            for l in self.arbiter.remove_node(node) {
                self.ended(&l, "node rejoined with other GPUs", &mut out);
            }
            self.arbiter.add_node(node, n);
        }
        out.push(Out::Resync(node, self.resync(node, now)));
        out
    }

    /// A node's etcd registration is gone (its etcd lease expired: it died
    /// or lost etcd): it leaves, its leases are revoked.
    pub fn member_down(&mut self, node: NodeId) -> Vec<Out> {
        let mut out = Vec::new();
        if self.members.remove(&node).is_some() {
            tracing::warn!(node, "cluster member's etcd lease ended; removing it and revoking its leases");
        }
        for l in self.arbiter.remove_node(node) {
            self.ended(&l, "node left", &mut out);
        }
        out
    }

    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    pub fn apps(&self) -> &BTreeMap<AppId, TrackedApp> {
        &self.apps
    }

    fn grant_msg(&self, l: &Lease) -> Message {
        let command = self.apps.get(&l.app).map(|a| a.command.clone()).unwrap_or_default();
        Message::Grant { lease: l.clone(), command }
    }

    /// What brings member `node`'s view up to date at `now`: `welcome` (with
    /// `now`: the node reads lease expiries on this clock), a `home` for
    /// each app submitted on it (its agents, should it have restarted), then
    /// every lease.
    pub fn resync(&self, node: NodeId, now: f64) -> Vec<Message> {
        let mut v = vec![Message::Welcome { arbiter: self.me, lease_s: self.lease_s, now }];
        v.extend(self.apps.iter().filter(|(_, t)| t.node == node).map(|(&id, t)| home_msg(id, t)));
        v.extend(self.arbiter.leases().iter().map(|l| self.grant_msg(l)));
        v
    }

    /// A message from authenticated node `sender` at `now`; `Err` says why it
    /// is refused (counted as `malformed`).
    pub fn handle(&mut self, sender: NodeId, msg: Message, now: f64) -> Result<Vec<Out>, String> {
        let mut out = Vec::new();
        match msg {
            Message::Join { node, listen, gpus } => {
                if node != sender {
                    return Err(format!("join for node {node} sent by node {sender}"));
                }
                let listen: SocketAddr = listen.parse().map_err(|e| format!("join listen `{listen}`: {e}"))?;
                let n = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
                if n > crate::config::MAX_NODE_GPUS || gpus.iter().any(|g| g.node != node || g.index >= n) {
                    return Err(format!("join of node {node}: GPUs must be {node}:0..{n}, at most 1024"));
                }
                if self.on_etcd {
                    // Members come from etcd; a join only asks for the current view.
                    if !self.members.contains_key(&node) {
                        return Err(format!("join of node {node}, which is not registered in etcd"));
                    }
                    out.push(Out::Resync(node, self.resync(node, now)));
                    return Ok(out);
                }
                if !self.members.contains_key(&node) && self.members.len() >= MAX_NODES {
                    return Err(format!("cluster full ({MAX_NODES} nodes)"));
                }
                let known = self.members.get(&node).map(|m| m.gpus);
                self.members.insert(node, Member { listen, gpus: n, last_seen: now });
                if known != Some(n) {
                    // New, or its GPUs changed: its old leases (if any) end.
                    for l in self.arbiter.remove_node(node) {
                        out.push(Out::All(revoke(&l, "node rejoined with other GPUs")));
                    }
                    self.arbiter.add_node(node, n);
                }
                // The whole current view, so a (re)joined node agrees with the others.
                out.push(Out::Resync(node, self.resync(node, now)));
            }
            Message::Heartbeat { node } | Message::Inventory { node, .. } => {
                if node != sender {
                    return Err(format!("heartbeat for node {node} sent by node {sender}"));
                }
                match self.members.get_mut(&node) {
                    Some(m) => m.last_seen = now,
                    None => return Err(format!("heartbeat from node {node}, which has not joined")),
                }
            }
            Message::Submit { node, app, name, demand, work, command } => {
                if node != sender || !self.members.contains_key(&node) {
                    return Err(format!("submit from node {sender} for node {node}"));
                }
                // Idempotent by app id: a home node sends an app again to
                // every new arbiter until it sees it in the arbiter's state.
                match self.apps.get(&app) {
                    Some(t) if t.node == node => return Ok(out),
                    Some(t) => return Err(format!("app {app} of node {} submitted by node {node}", t.node)),
                    None => {}
                }
                if self.apps.len() >= MAX_APPS {
                    return Err(format!("too many apps ({MAX_APPS})"));
                }
                check_app(&name, demand, work, &command)?;
                let spec =
                    AppSpec { id: app, name, demand, total_work: work, model: Arc::clone(&self.model), arrival: now };
                self.apps.insert(app, TrackedApp { app: App::new(spec), command, node });
                self.journal_app(app);
            }
            Message::Bid { round, app, rho_without, options } => {
                return self.take_bid(sender, round, app, rho_without, &options, now).map_err(|e| e.to_string());
            }
            other => return Err(format!("the arbiter does not take `{}`", kind(&other))),
        }
        Ok(out)
    }

    /// Members silent too long leave; their leases are revoked.
    pub fn reap(&mut self, now: f64) -> Vec<Out> {
        if self.on_etcd {
            return Vec::new(); // etcd's lease TTL decides (member_down)
        }
        let limit = DEAD_AFTER_HEARTBEATS * self.heartbeat_s;
        let dead: Vec<NodeId> =
            self.members.iter().filter(|(_, m)| now - m.last_seen > limit).map(|(&n, _)| n).collect();
        let mut out = Vec::new();
        for n in dead {
            tracing::warn!(node = n, "cluster member silent; removing it and revoking its leases");
            self.members.remove(&n);
            for l in self.arbiter.remove_node(n) {
                out.push(Out::All(revoke(&l, "node left")));
            }
        }
        out
    }
}

/// A member from its etcd record (`None`: a bad address or GPU count).
fn member(rec: &NodeRecord, now: f64) -> Option<Member> {
    let listen: SocketAddr = rec.listen.parse().ok()?;
    (rec.gpus <= crate::config::MAX_NODE_GPUS).then_some(Member { listen, gpus: rec.gpus, last_seen: now })
}

/// The `home` message that gives app `id`'s agent back to its home node.
fn home_msg(id: AppId, t: &TrackedApp) -> Message {
    let s = &t.app.spec;
    Message::Home {
        node: t.node,
        app: id,
        name: s.name.clone(),
        demand: s.demand,
        work: s.total_work,
        command: t.command.clone(),
        model: ThroughputModel::clone(&s.model),
    }
}

fn revoke(l: &Lease, reason: &str) -> Message {
    Message::Revoke { lease: l.id, app: l.app, reason: reason.into() }
}

/// Checks a submitted app's fields (on the submitting node and the arbiter).
pub fn check_app(name: &str, demand: u32, work: f64, command: &[String]) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("app name must be 1-64 bytes".into());
    }
    if demand == 0 || demand > crate::config::MAX_NODE_GPUS * 64 {
        return Err(format!("app demand {demand} must be 1..=65536 GPUs"));
    }
    if !work.is_finite() || work <= 0.0 {
        return Err(format!("app work {work} must be positive"));
    }
    if command.is_empty()
        || command.len() > MAX_COMMAND_ARGS
        || command.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES
    {
        return Err(format!("app command must have 1..={MAX_COMMAND_ARGS} arguments, {MAX_COMMAND_BYTES} bytes"));
    }
    Ok(())
}

/// A message's `kind` tag (for logs and counters).
pub fn kind(m: &Message) -> &'static str {
    match m {
        Message::Join { .. } => "join",
        Message::Welcome { .. } => "welcome",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Inventory { .. } => "inventory",
        Message::RhoReport { .. } => "rho_report",
        Message::Offer { .. } => "offer",
        Message::Bid { .. } => "bid",
        Message::Submit { .. } => "submit",
        Message::Home { .. } => "home",
        Message::Grant { .. } => "grant",
        Message::Renew { .. } => "renew",
        Message::Revoke { .. } => "revoke",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::round::tests::Homes;
    use super::*;
    use crate::auction::gpu::GpuId;

    pub(super) fn cfg() -> ClusterConfig {
        toml::from_str(
            "node_id = 1\nlisten = \"127.0.0.1:1\"\nkey_file = \"k\"\narbiter = \"127.0.0.1:1\"\nlease_s = 10.0\nround_s = 1.0\n",
        )
        .unwrap()
    }

    pub(super) fn join(node: NodeId, gpus: u32) -> Message {
        Message::Join {
            node,
            listen: format!("127.0.0.1:{}", 100 + node),
            gpus: (0..gpus).map(|index| GpuId { node, index }).collect(),
        }
    }

    pub(super) fn submit(node: NodeId, app: AppId, demand: u32) -> Message {
        Message::Submit { node, app, name: "a".into(), demand, work: 1e6, command: vec!["true".into()] }
    }

    #[test]
    fn members_join_apps_are_granted_and_a_silent_node_loses_its_leases() {
        let mut a = ArbiterState::new(1, &cfg()).unwrap();
        for n in 1..=3 {
            a.handle(n, join(n, 2), 0.0).unwrap();
        }
        assert!(a.handle(2, join(3, 2), 0.0).is_err(), "spoofed join");
        assert!(a.handle(9, Message::Heartbeat { node: 9 }, 0.0).is_err(), "not a member");
        let mut homes = Homes::default();
        for app in 0..4 {
            homes.submit(&mut a, 1 + (app as u32 % 3), app, 2, 0.0);
        }
        let (_, granted) = homes.round(&mut a, 0.5, &[]);
        assert!(!granted.is_empty());
        let summary = a.recent_rounds().last().unwrap().clone();
        assert!(summary.missing.is_empty() && !summary.auctioned.is_empty(), "{summary:?}");
        // Nodes 1 and 2 keep beating, 3 goes silent.
        for t in [1.0, 2.0, 3.0] {
            a.handle(1, Message::Heartbeat { node: 1 }, t).unwrap();
            a.handle(2, Message::Heartbeat { node: 2 }, t).unwrap();
        }
        let (out, _) = homes.round(&mut a, 3.0, &[3]);
        assert!(!a.members().contains_key(&3));
        assert!(a.arbiter.leases().iter().all(|l| l.gpus.iter().all(|g| g.node != 3)));
        let had_node3 = granted.iter().any(|l| l.gpus.iter().any(|g| g.node == 3));
        assert_eq!(
            had_node3,
            out.iter().any(|o| matches!(o, Out::All(Message::Revoke { reason, .. }) if reason == "node left"))
        );
    }

    #[test]
    fn bad_submits_are_refused() {
        let mut a = ArbiterState::new(1, &cfg()).unwrap();
        a.handle(1, join(1, 2), 0.0).unwrap();
        assert!(a.handle(1, submit(1, 5, 0), 0.0).is_err());
        assert!(a.handle(1, submit(2, 5, 1), 0.0).is_err());
        a.handle(1, submit(1, 5, 1), 0.0).unwrap();
        // Sent again (to a new arbiter): taken once, by app id.
        assert_eq!(a.handle(1, submit(1, 5, 1), 0.0).unwrap(), Vec::new());
        assert_eq!(a.apps().len(), 1);
        a.handle(2, join(2, 2), 0.0).unwrap();
        assert!(a.handle(2, submit(2, 5, 1), 0.0).is_err(), "another node's app id");
        assert!(a.handle(1, Message::Welcome { arbiter: 1, lease_s: 1.0, now: 0.0 }, 0.0).is_err());
    }

    /// A new arbiter on etcd: the stored leases in force are honoured (same
    /// ids, their GPUs not granted again), those of a node that is gone, of
    /// an unknown app or already expired are dropped (and deleted from etcd);
    /// every change afterwards is journalled before it is sent.
    #[test]
    fn an_elected_arbiter_takes_over_the_stored_state() {
        use crate::auction::etcd::record::{AppRecord, NodeRecord, Op, Snapshot};
        let rec = |gpus| NodeRecord { listen: "127.0.0.1:7".into(), gpus };
        let app = |id: AppId| AppRecord {
            id,
            node: 1,
            name: "a".into(),
            demand: 2,
            work: 1e6,
            command: vec!["true".into()],
            arrival: 90.0,
            progress: Default::default(),
            model: ThroughputModel::linear(2.0, 0.5),
        };
        let lease = |id, app, node, expiry| Lease {
            id,
            app,
            gpus: vec![GpuId { node, index: 0 }, GpuId { node, index: 1 }],
            start: 95.0,
            expiry,
            renewal: false,
        };
        let snap = Snapshot {
            members: [(1, rec(2)), (2, rec(2))].into_iter().collect(),
            apps: vec![app(10), app(11), app(12)],
            leases: vec![
                lease(5, 10, 1, 200.0), // in force: kept
                lease(6, 11, 3, 200.0), // node 3 is gone
                lease(7, 99, 2, 200.0), // unknown app
                lease(8, 12, 2, 99.0),  // expired
            ],
        };
        let (mut a, out) = ArbiterState::elected(1, &cfg(), snap, 100.0).unwrap();
        let out: Vec<Out> = out.into_iter().flat_map(Out::each).collect();
        // Apps advanced on their stored leases (to the expiry or now) and stored, not on a gone node (app 11).
        let ops = a.take_ops();
        let put: Vec<(AppId, f64)> = ops
            .iter()
            .filter_map(|o| if let Op::PutApp(r) = o { Some((r.id, r.progress.last)) } else { None })
            .collect();
        assert_eq!(put, [(10, 100.0), (12, 99.0)]);
        assert_eq!(ops[2..], [Op::DelLease(6), Op::DelLease(7), Op::DelLease(8)]);
        let kept: Vec<u64> = a.arbiter.leases().iter().map(|l| l.id).collect();
        assert_eq!(kept, vec![5]);
        // Both members get a welcome and the kept lease.
        for n in [1, 2] {
            assert!(out.contains(&Out::To(n, Message::Welcome { arbiter: 1, lease_s: 10.0, now: 100.0 })));
            assert!(out
                .iter()
                .any(|o| matches!(o, Out::To(m, Message::Grant { lease, .. }) if *m == n && lease.id == 5)));
        }
        // Node 1, their home, gets their agents back with the stored model (after a restart); node 2 none.
        let homes: Vec<(NodeId, AppId, &ThroughputModel)> = out
            .iter()
            .filter_map(|o| match o {
                Out::To(n, Message::Home { node, app, model, .. }) if n == node => Some((*n, *app, model)),
                _ => None,
            })
            .collect();
        let stored = ThroughputModel::linear(2.0, 0.5);
        assert_eq!(homes, [10, 11, 12].map(|id| (1, id, &stored)));
        // The next round grants node 2's GPUs only, with new ids, and journals them.
        // (The apps were submitted on node 1 before the failover: their agents are there.)
        let mut homes = Homes::default();
        let mut agents = crate::auction::agent::Agents::new(1);
        for id in [10, 11, 12] {
            let home = crate::auction::agent::HomeApp::submitted("a".into(), 2, 1e6, vec!["true".into()]);
            agents.add(id, home).unwrap();
        }
        homes.0.insert(1, agents);
        let (_, grants) = homes.round(&mut a, 101.0, &[]);
        assert!(
            !grants.is_empty() && grants.iter().all(|l| l.id > 8 && l.gpus.iter().all(|g| g.node == 2)),
            "{grants:?}"
        );
        let ops = a.take_ops();
        assert!(grants.iter().all(|l| ops.contains(&Op::PutLease(l.clone()))));
        // Membership from etcd: no heartbeat timeout; a node whose registration ends loses its leases.
        assert!(a.reap(1e9).is_empty());
        let out = a.member_down(1);
        assert!(out.iter().any(|o| matches!(o, Out::All(Message::Revoke { lease: 5, .. }))));
        assert!(a.take_ops().contains(&Op::DelLease(5)));
        assert!(a.handle(1, join(1, 2), 102.0).is_err(), "a join needs a registration in etcd");
        let out: Vec<Out> = a.member_up(1, &rec(2), 103.0).into_iter().flat_map(Out::each).collect();
        assert!(out.contains(&Out::To(1, Message::Welcome { arbiter: 1, lease_s: 10.0, now: 103.0 })));
    }
}
