//! The messages of the peer protocol (the payload of a frame, JSON-encoded).
//! Node ↔ arbiter: join, heartbeat, inventory; arbiter → agents: offers;
//! agents → arbiter: ρ reports and bids; arbiter → nodes: grants, renewals,
//! revocations (a node enforces them on its GPUs).

use serde::{Deserialize, Serialize};

use crate::auction::app::{AppId, Progress};
use crate::auction::gpu::{GpuId, NodeId};
use crate::auction::lease::{Lease, LeaseId};
use crate::auction::throughput::ThroughputModel;

/// One bid line on the wire: GPUs per node and the ρ they would give.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireOption {
    pub per_node: Vec<(NodeId, u32)>,
    pub rho: f64,
}

/// The cluster as an agent prices an offer (the arbiter's [`ClusterView`]
/// of the round).
///
/// [`ClusterView`]: crate::auction::app::ClusterView
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferView {
    /// The round's time on the arbiter's clock.
    pub now: f64,
    /// GPUs in the cluster.
    pub gpus: u32,
    /// GPUs of the largest node.
    pub node_gpus: u32,
    /// Lease length, seconds.
    pub lease_s: f64,
}

/// A peer message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// A node asks to join; `listen` is where its peers reach it.
    Join { node: NodeId, listen: String, gpus: Vec<GpuId> },
    /// The arbiter accepts a node; `now` is the arbiter's clock when it was
    /// sent (the node reads lease expiries on it; 0 from an arbiter that
    /// does not say).
    Welcome {
        arbiter: NodeId,
        lease_s: f64,
        #[serde(default)]
        now: f64,
    },
    /// Liveness, every heartbeat period.
    Heartbeat { node: NodeId },
    /// A node's GPUs (on join and when they change).
    Inventory { node: NodeId, gpus: Vec<GpuId> },
    /// An agent's ρ with what its app holds now (also arbiter → nodes after
    /// each round, so that every node can show it).
    RhoReport { app: AppId, rho: f64 },
    /// The arbiter offers these free GPUs (per node) in round `round` to the
    /// agent of `app` (on its home node), which holds `held` now; `view`,
    /// `arrival` and `progress` are the arbiter's record of the cluster and
    /// of the app (it keeps and stores the progress), which the agent prices
    /// with its own throughput model.
    Offer {
        round: u64,
        app: AppId,
        free: Vec<(NodeId, u32)>,
        held: Vec<(NodeId, u32)>,
        view: OfferView,
        arrival: f64,
        progress: Progress,
    },
    /// An agent's bid in round `round`: ρ without new GPUs, and ρ with each
    /// bundle of the offered GPUs (on top of what it holds).
    Bid { round: u64, app: AppId, rho_without: f64, options: Vec<WireOption> },
    /// A new app submitted on `node` (node → arbiter); `command` is what the
    /// nodes holding its GPUs run.
    Submit { node: NodeId, app: AppId, name: String, demand: u32, work: f64, command: Vec<String> },
    /// An app whose home `node` is (arbiter → that node, in every resync
    /// after `welcome`): the submit's fields and the throughput model its
    /// agent prices offers with, so a restarted home node gets its agent back.
    Home {
        node: NodeId,
        app: AppId,
        name: String,
        demand: u32,
        work: f64,
        command: Vec<String>,
        model: ThroughputModel,
    },
    /// A new lease (arbiter → every node); `command` is its app's.
    Grant {
        lease: Lease,
        #[serde(default)]
        command: Vec<String>,
    },
    /// A lease extended to `expiry` (the same GPUs, the app keeps running).
    Renew { lease: LeaseId, app: AppId, expiry: f64 },
    /// A lease ended early (its node left, the app was withdrawn).
    Revoke { lease: LeaseId, app: AppId, reason: String },
}
