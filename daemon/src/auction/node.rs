//! This node's side of the cluster: its view of the leases (as the arbiter
//! broadcast them), the apps submitted here, and the control-socket answers
//! (`gatictl app submit`, `gatictl apps`), and the agents of the apps
//! submitted here ([`super::agent`]: they answer the arbiter's offers and
//! send a submit again to a new arbiter until it has it). The peer service
//! ([`super::peer::service`]) feeds the view and runs the enforcer.
//!
//! One node per process: the running one is reachable through [`current`]
//! (the control socket answers from it without a handle in `ServeContext`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::agent::{Agents, HomeApp};
use super::app::AppId;
use super::devices::{AppDevices, DeviceStatus};
use super::gang::{Gang, Want};
use super::gpu::NodeId;
use super::lease::{Lease, LeaseId};
use super::node_enforce::Desired;
use super::peer::message::Message;
use crate::config::ClusterConfig;

/// What this node knows of the cluster.
#[derive(Debug, Default)]
pub struct View {
    /// The arbiter's node id (from its `welcome`).
    pub arbiter: Option<NodeId>,
    pub leases: BTreeMap<LeaseId, Lease>,
    pub commands: BTreeMap<AppId, Vec<String>>,
    pub rho: BTreeMap<AppId, f64>,
    /// Names of the apps submitted here.
    pub names: BTreeMap<AppId, String>,
    /// This node's app processes (from the enforcer).
    pub pids: BTreeMap<AppId, u32>,
    /// Grants of a GPU this view already had leased (must stay 0).
    pub conflicts: u64,
    /// How apps are kept to their GPUs here (from the enforcer, once it runs).
    pub devices: Option<DeviceStatus>,
    /// Each running app's device rules (from the enforcer).
    pub app_devices: BTreeMap<AppId, AppDevices>,
    /// On the arbiter node: its last rounds (`gatictl apps` shows them).
    pub rounds: Option<Value>,
    /// The arbiter's clock as this node reads it (lease expiries are on it).
    pub clock: Option<ArbiterClock>,
    /// Leases this node ended itself: past their expiry with neither a
    /// renewal nor a revoke from the arbiter ([`ClusterNode::lapse`]).
    pub lapsed: u64,
}

/// Most leases a node's view holds: a grant beyond it is refused (one GPU
/// each at least, so far more than any cluster of [`MAX_NODES`] nodes can
/// lease; it bounds what an arbiter holding the key can make a node keep).
///
/// [`MAX_NODES`]: super::node_arbiter::MAX_NODES
pub const MAX_VIEW_LEASES: usize = 65_536;

/// The arbiter's clock read on this node: `at` on the arbiter's clock was
/// `local` here (from the last `welcome`, moved on by any grant that shows
/// the arbiter later than that: a lease starts at its grant).
#[derive(Clone, Copy, Debug)]
pub struct ArbiterClock {
    pub at: f64,
    pub local: Instant,
}

impl ArbiterClock {
    /// The arbiter's time at local instant `t` (never earlier than `at`).
    pub fn now(&self, t: Instant) -> f64 {
        self.at + t.saturating_duration_since(self.local).as_secs_f64()
    }

    /// Moves the reading on if the arbiter was at `seen` by local instant `t`.
    fn saw(&mut self, seen: f64, t: Instant) {
        if seen > self.now(t) {
            *self = ArbiterClock { at: seen, local: t };
        }
    }
}

/// The running node's cluster state.
#[derive(Debug)]
pub struct ClusterNode {
    pub cfg: ClusterConfig,
    pub view: Mutex<View>,
    /// Messages to the arbiter (bounded: a full queue refuses, never grows).
    pub outbox: tokio::sync::mpsc::Sender<Message>,
    /// The agents of the apps submitted here (locked after `view`, never before).
    pub agents: Mutex<Agents>,
    next_app: AtomicU64,
}

static CURRENT: Mutex<Option<Arc<ClusterNode>>> = Mutex::new(None);

/// The node of this process, while its peer service runs.
pub fn current() -> Option<Arc<ClusterNode>> {
    CURRENT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
}

pub(crate) fn set_current(node: Option<Arc<ClusterNode>>) {
    *CURRENT.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = node;
}

impl ClusterNode {
    pub fn new(cfg: ClusterConfig, outbox: tokio::sync::mpsc::Sender<Message>) -> ClusterNode {
        // App ids: this node's id in the high bits, so nodes never collide;
        // the low bits start from the clock (seconds mod 2^20, × 4096), so a
        // restarted node does not reuse the ids of apps the cluster still
        // holds (on etcd they outlive every process).
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let first = (u64::from(cfg.node_id) << 32) + ((secs & 0xF_FFFF) << 12);
        let agents = Mutex::new(Agents::new(cfg.node_id));
        ClusterNode { cfg, view: Mutex::new(View::default()), outbox, agents, next_app: AtomicU64::new(first + 1) }
    }

    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Agents> {
        self.agents.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// To the arbiter (its own node's arbiter takes it in process).
    fn send(&self, m: Message) -> Result<(), String> {
        self.outbox.try_send(m).map_err(|_| "the peer service is not keeping up; try again".to_string())
    }

    /// Applies a message from the arbiter; `Err` if `sender` is not the
    /// arbiter or the message is not one the arbiter sends to nodes.
    pub fn apply(&self, sender: NodeId, msg: Message) -> Result<(), String> {
        self.apply_at(sender, msg, Instant::now())
    }

    /// [`ClusterNode::apply`], received at local instant `t`.
    pub fn apply_at(&self, sender: NodeId, msg: Message, t: Instant) -> Result<(), String> {
        let mut v = self.lock();
        if let Message::Welcome { arbiter, now, .. } = &msg {
            if *arbiter != sender {
                return Err(format!("welcome naming arbiter {arbiter} sent by node {sender}"));
            }
            // A fresh view follows (the arbiter resends every lease).
            v.arbiter = Some(sender);
            v.leases.clear();
            // An arbiter that does not say its time (0) is read from its grants.
            v.clock = (now.is_finite() && *now > 0.0).then_some(ArbiterClock { at: *now, local: t });
            // This arbiter may be new and not have every app submitted here.
            for m in self.agents().unconfirmed() {
                match self.send(m) {
                    Ok(()) => metrics::counter!(crate::telemetry::names::CLUSTER_SUBMITS_RESENT_TOTAL).increment(1),
                    Err(e) => tracing::warn!(error = %e, "submit not sent again to the new arbiter"),
                }
            }
            return Ok(());
        }
        if v.arbiter != Some(sender) {
            return Err(format!("node {sender} is not this node's arbiter"));
        }
        match msg {
            Message::Heartbeat { .. } => {}
            Message::Grant { lease, command } => {
                if v.leases.len() >= MAX_VIEW_LEASES && !v.leases.contains_key(&lease.id) {
                    return Err(format!(
                        "grant of lease {}: this node's view holds {MAX_VIEW_LEASES} leases",
                        lease.id
                    ));
                }
                if !(lease.start.is_finite() && lease.expiry.is_finite() && lease.start <= lease.expiry) {
                    return Err(format!(
                        "grant of lease {}: start {} and expiry {}",
                        lease.id, lease.start, lease.expiry
                    ));
                }
                match &mut v.clock {
                    Some(c) => c.saw(lease.start, t),
                    None => v.clock = Some(ArbiterClock { at: lease.start, local: t }),
                }
                let clash =
                    v.leases.values().any(|l| l.id != lease.id && l.gpus.iter().any(|g| lease.gpus.contains(g)));
                if clash {
                    v.conflicts += 1;
                    tracing::error!(lease = lease.id, "grant of a GPU this node sees leased already");
                }
                if !command.is_empty() {
                    v.commands.insert(lease.app, command);
                }
                self.agents().confirm(lease.app);
                v.leases.insert(lease.id, lease);
            }
            Message::Renew { lease, expiry, .. } => {
                if !expiry.is_finite() {
                    return Err(format!("renewal of lease {lease} to {expiry}"));
                }
                if let Some(l) = v.leases.get_mut(&lease) {
                    l.expiry = expiry;
                }
            }
            Message::Revoke { lease, app, reason } => {
                if reason == super::node_arbiter::FINISHED {
                    self.agents().forget(app);
                }
                v.leases.remove(&lease);
                if !v.leases.values().any(|l| l.app == app) {
                    v.commands.remove(&app);
                }
            }
            offer @ Message::Offer { .. } => {
                let bid = self.agents().answer(&offer)?;
                self.send(bid)?;
                metrics::counter!(crate::telemetry::names::AUCTION_BIDS_TOTAL, "result" => "sent").increment(1);
            }
            Message::Home { node, app, name, demand, work, command, model } => {
                if node != self.id() {
                    return Err(format!("home of app {app} for node {node}, not this node"));
                }
                super::node_arbiter::check_app(&name, demand, work, &command)?;
                let model = Arc::new(model.checked().map_err(|e| format!("home of app {app}: {e}"))?);
                let home = HomeApp { name: name.clone(), demand, work, command, model, confirmed: true };
                if self.agents().restore(app, home)? {
                    tracing::info!(app, "agent restored from the arbiter's record");
                    metrics::counter!(crate::telemetry::names::CLUSTER_AGENTS_RESTORED_TOTAL).increment(1);
                }
                v.names.entry(app).or_insert(name);
            }
            Message::RhoReport { app, rho } => {
                self.agents().confirm(app);
                if v.rho.len() < super::node_arbiter::MAX_APPS || v.rho.contains_key(&app) {
                    v.rho.insert(app, rho);
                }
            }
            other => return Err(format!("a node does not take `{}`", super::node_arbiter::kind(&other))),
        }
        Ok(())
    }

    /// Forgets the arbiter and every lease (this node's etcd lease expired:
    /// the arbiter has revoked its leases); its app processes stop.
    pub fn forget_view(&self) {
        let mut v = self.lock();
        if v.arbiter.take().is_some() || !v.leases.is_empty() {
            tracing::warn!("lost the cluster (etcd lease expired); forgetting every lease");
        }
        v.leases.clear();
        v.commands.clear();
        v.clock = None;
    }

    /// Seconds past a lease's expiry (on the arbiter's clock) after which
    /// this node ends the lease itself if the arbiter has neither renewed
    /// nor revoked it: `2 × round_s + 1`. A live arbiter revokes an expired
    /// lease (and grants its renewal) when the next round closes, under
    /// `round_s + bid_deadline_s` after the expiry; one that is gone or cut
    /// off from this node sends nothing, and the lease must still end.
    pub fn lapse_after_s(&self) -> f64 {
        2.0 * self.cfg.round_s + 1.0
    }

    /// Ends the leases that lapsed by local instant `t` (see
    /// [`ClusterNode::lapse_after_s`]): they leave the view, so the enforcer
    /// stops their processes here as at a revoke. Returns them.
    pub fn lapse(&self, t: Instant) -> Vec<Lease> {
        let mut v = self.lock();
        let Some(now) = v.clock.map(|c| c.now(t)) else { return Vec::new() };
        let after = self.lapse_after_s();
        let gone: Vec<LeaseId> = v.leases.values().filter(|l| now > l.expiry + after).map(|l| l.id).collect();
        let mut out = Vec::with_capacity(gone.len());
        for id in gone {
            let Some(l) = v.leases.remove(&id) else { continue };
            tracing::warn!(
                lease = l.id,
                app = l.app,
                expiry = l.expiry,
                arbiter_now = now,
                "lease lapsed: past its expiry with no renewal or revoke from the arbiter; its processes here stop"
            );
            metrics::counter!(crate::telemetry::names::CLUSTER_LEASES_LAPSED_TOTAL).increment(1);
            if !v.leases.values().any(|o| o.app == l.app) {
                v.commands.remove(&l.app);
            }
            v.lapsed += 1;
            out.push(l);
        }
        out
    }

    /// What the enforcer should run here: per app, its GPUs here, its
    /// command and its gang (every node holding its GPUs).
    pub fn desired(&self) -> Desired {
        let v = self.lock();
        let mut d = Desired::new();
        for l in v.leases.values() {
            if d.contains_key(&l.app) {
                continue;
            }
            let Some(gang) = Gang::of(l.app, self.id(), v.leases.values()) else { continue };
            let mut gpus: Vec<u32> = v
                .leases
                .values()
                .filter(|o| o.app == l.app)
                .flat_map(|o| o.gpus.iter().filter(|g| g.node == self.id()).map(|g| g.index))
                .collect();
            gpus.sort_unstable();
            let command = v.commands.get(&l.app).cloned().unwrap_or_default();
            d.insert(l.app, Want { gpus, command, gang });
        }
        d
    }

    /// The enforcer's device control (once, at its start).
    pub fn set_devices(&self, status: DeviceStatus) {
        self.lock().devices = Some(status);
    }

    /// The enforcer's per-app device rules.
    pub fn set_app_devices(&self, apps: BTreeMap<AppId, AppDevices>) {
        self.lock().app_devices = apps;
    }

    /// For Health: how apps are kept to their GPUs here.
    pub fn devices_status(&self) -> Option<DeviceStatus> {
        self.lock().devices.clone()
    }

    pub fn set_pids(&self, pids: BTreeMap<AppId, u32>) {
        self.lock().pids = pids;
    }

    /// `gatictl app submit`: payload `{"name", "gpus", "work", "command": [..]}`.
    pub fn submit(&self, payload: &[u8]) -> Result<Value, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Req {
            name: String,
            gpus: u32,
            work: f64,
            command: Vec<String>,
        }
        let r: Req = serde_json::from_slice(payload).map_err(|e| format!("bad submit request: {e}"))?;
        super::node_arbiter::check_app(&r.name, r.gpus, r.work, &r.command)?;
        let app = self.next_app.fetch_add(1, Ordering::Relaxed);
        let home = HomeApp::submitted(r.name.clone(), r.gpus, r.work, r.command);
        let msg = self.agents().add(app, home)?;
        if let Err(e) = self.send(msg) {
            self.agents().forget(app);
            return Err(e);
        }
        self.lock().names.insert(app, r.name);
        Ok(json!({ "app": app, "node": self.id() }))
    }

    /// `gatictl apps`: every app this node knows, its leases and ρ.
    pub fn apps(&self) -> Value {
        let v = self.lock();
        let mut ids: Vec<AppId> = v.rho.keys().chain(v.names.keys()).copied().collect();
        ids.extend(v.leases.values().map(|l| l.app));
        ids.sort_unstable();
        ids.dedup();
        let apps: Vec<Value> = ids
            .iter()
            .map(|a| {
                let leases: Vec<&Lease> = v.leases.values().filter(|l| l.app == *a).collect();
                json!({
                    "app": a,
                    "name": v.names.get(a),
                    "rho": v.rho.get(a),
                    "leases": leases,
                    "pid": v.pids.get(a),
                    "devices": v.app_devices.get(a),
                })
            })
            .collect();
        json!({
            "node": self.id(),
            "arbiter": v.arbiter,
            "is_arbiter": v.arbiter == Some(self.id()),
            "elected": self.cfg.uses_etcd(),
            "apps": apps,
            "leases": v.leases.values().collect::<Vec<_>>(),
            "conflicts": v.conflicts,
            "lapsed": v.lapsed,
            "arbiter_now": v.clock.map(|c| c.now(Instant::now())),
            "gpu_devices": v.devices,
            "agents": self.agents().len(),
            "rounds": v.rounds,
        })
    }
}

/// Control answer for `AppSubmit`.
pub fn control_submit(payload: &[u8]) -> Result<Value, String> {
    current().ok_or_else(no_cluster)?.submit(payload)
}

/// Control answer for `Apps`.
pub fn control_apps() -> Result<Value, String> {
    Ok(current().ok_or_else(no_cluster)?.apps())
}

fn no_cluster() -> String {
    "this node has no [cluster] section".into()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auction::gpu::GpuId;

    fn node() -> ClusterNode {
        let cfg = toml::from_str(
            "node_id = 2\nlisten = \"127.0.0.1:2\"\nkey_file = \"k\"\narbiter = \"127.0.0.1:1\"\nlease_s = 10.0\nround_s = 1.0\n",
        )
        .unwrap();
        ClusterNode::new(cfg, tokio::sync::mpsc::channel(8).0)
    }

    fn grant(id: LeaseId, app: AppId, start: f64, expiry: f64) -> Message {
        let gpus = vec![GpuId { node: 2, index: id as u32 }];
        Message::Grant { lease: Lease { id, app, gpus, start, expiry, renewal: false }, command: vec!["true".into()] }
    }

    #[test]
    fn a_lease_neither_renewed_nor_revoked_lapses_on_the_node() {
        let n = node();
        assert_eq!(n.lapse_after_s(), 3.0);
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let apply = |m: Message, s: f64| n.apply_at(1, m, at(s));
        apply(Message::Welcome { arbiter: 1, lease_s: 10.0, now: 100.0 }, 0.0).unwrap();
        // A resynced lease granted long ago and one granted now, both to 110.
        apply(grant(1, 7, 90.0, 110.0), 0.0).unwrap();
        apply(grant(2, 8, 100.0, 110.0), 0.0).unwrap();
        assert!(n.lapse(at(12.9)).is_empty(), "within the slack after the expiry");
        assert_eq!(n.desired().len(), 2);
        // At 11 s the arbiter revokes app 7's lease and renews it as lease 3,
        // granted at 110.5 on its clock (it runs 0.5 s ahead of the welcome's reading).
        apply(Message::Revoke { lease: 1, app: 7, reason: "expired".into() }, 10.0).unwrap();
        apply(grant(3, 7, 110.5, 120.5), 10.0).unwrap();
        let gone = n.lapse(at(12.6));
        assert_eq!(gone.iter().map(|l| l.id).collect::<Vec<_>>(), [2], "the lease nobody renewed or revoked ends");
        let d = n.desired();
        assert!(d.contains_key(&7) && !d.contains_key(&8), "{d:?}");
        assert_eq!(n.apps()["lapsed"], 1);
        // Lease 3 lapses once the arbiter's clock passes 123.5 (local 23 s).
        assert!(n.lapse(at(22.9)).is_empty());
        assert_eq!(n.lapse(at(23.1)).len(), 1);
        assert!(n.desired().is_empty());
        // A revoke after the lapse changes nothing; a new welcome starts a fresh clock.
        apply(Message::Revoke { lease: 3, app: 7, reason: "expired".into() }, 24.0).unwrap();
        apply(Message::Welcome { arbiter: 1, lease_s: 10.0, now: 500.0 }, 24.0).unwrap();
        apply(grant(4, 7, 499.0, 509.0), 24.0).unwrap();
        assert!(n.lapse(at(35.9)).is_empty());
        assert_eq!(n.lapse(at(36.1)).len(), 1);
    }

    #[test]
    fn without_the_arbiters_time_grants_set_the_clock_and_bad_grants_are_refused() {
        let n = node();
        let t0 = Instant::now();
        n.apply_at(1, Message::Welcome { arbiter: 1, lease_s: 10.0, now: 0.0 }, t0).unwrap();
        assert!(n.lock().clock.is_none());
        n.apply_at(1, grant(1, 7, 50.0, 60.0), t0).unwrap();
        assert!(n.lapse(t0 + Duration::from_secs(12)).is_empty());
        assert_eq!(n.lapse(t0 + Duration::from_secs(14)).len(), 1);
        assert!(n.apply(1, grant(2, 7, 70.0, f64::NAN)).is_err());
        assert!(n.apply(1, grant(2, 7, 70.0, 60.0)).is_err());
        assert!(n.apply(1, Message::Renew { lease: 2, app: 7, expiry: f64::INFINITY }).is_err());
        // The view is bounded: a grant past MAX_VIEW_LEASES is refused.
        {
            let mut v = n.lock();
            for id in 10..10 + MAX_VIEW_LEASES as u64 {
                let l = Lease { id, app: 9, gpus: vec![], start: 70.0, expiry: 80.0, renewal: false };
                v.leases.insert(id, l);
            }
        }
        assert!(n.apply(1, grant(1, 7, 70.0, 80.0)).unwrap_err().contains("65536"));
    }
}
