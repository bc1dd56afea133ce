//! The messages of the peer protocol (the payload of a frame, JSON-encoded).
//! Node ↔ arbiter: join, heartbeat, inventory; arbiter → agents: offers;
//! agents → arbiter: ρ reports and bids; arbiter → nodes: grants, renewals,
//! revocations (a node enforces them on its GPUs).

use serde::{Deserialize, Serialize};

use crate::auction::app::AppId;
use crate::auction::gpu::{GpuId, NodeId};
use crate::auction::lease::{Lease, LeaseId};

/// One bid line on the wire: GPUs per node and the ρ they would give.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireOption {
    pub per_node: Vec<(NodeId, u32)>,
    pub rho: f64,
}

/// A peer message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// A node asks to join; `listen` is where its peers reach it.
    Join { node: NodeId, listen: String, gpus: Vec<GpuId> },
    /// The arbiter accepts a node.
    Welcome { arbiter: NodeId, lease_s: f64 },
    /// Liveness, every heartbeat period.
    Heartbeat { node: NodeId },
    /// A node's GPUs (on join and when they change).
    Inventory { node: NodeId, gpus: Vec<GpuId> },
    /// An agent's ρ with what its app holds now (also arbiter → nodes after
    /// each round, so that every node can show it).
    RhoReport { app: AppId, rho: f64 },
    /// The arbiter offers these free GPUs (per node) in round `round`.
    Offer { round: u64, app: AppId, free: Vec<(NodeId, u32)> },
    /// An agent's bid in round `round`.
    Bid { round: u64, app: AppId, rho_without: f64, options: Vec<WireOption> },
    /// A new app submitted on `node` (node → arbiter); `command` is what the
    /// nodes holding its GPUs run.
    Submit { node: NodeId, app: AppId, name: String, demand: u32, work: f64, command: Vec<String> },
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
