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
        let mut v = self.lock();
        if let Message::Welcome { arbiter, .. } = &msg {
            if *arbiter != sender {
                return Err(format!("welcome naming arbiter {arbiter} sent by node {sender}"));
            }
            // A fresh view follows (the arbiter resends every lease).
            v.arbiter = Some(sender);
            v.leases.clear();
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
