//! Cluster-wide GPU auctions (Themis): long-running GPU apps get GPU leases
//! through partial-allocation auctions that keep finish-time fairness
//! ρ = T_shared / T_independent low.
//!
//! - [`gpu`]: GPU ids, bundles (counts per node), the free pool, placement;
//! - [`throughput`]: an app's rate over GPU count and placement;
//! - [`app`]: an app's progress and its ρ;
//! - [`bid`]: an agent's placement-aware bid (ρ over bundles);
//! - [`agent`]: an app's agent on its home node (answers offers with bids,
//!   keeps its submit until the arbiter has it);
//! - [`nsw`] + [`pa`]: the mechanism (Nash-welfare allocation, fractions c_i);
//! - [`lease`]: leases (never two on one GPU), expiry, revocation;
//! - [`arbiter`]: the lease round that ties them together;
//! - [`peer`]: the authenticated peer protocol between nodes, and the
//!   node's peer service;
//! - [`etcd`]: membership and the arbiter election on etcd (the
//!   alternative to a static arbiter), and what the arbiter stores there;
//! - [`node`], [`node_arbiter`], [`node_enforce`]: a gatid node's side of the
//!   cluster (its view and control answers, the arbiter it may run, and the
//!   enforcement of leases on its app processes); [`devices`]: the cgroup
//!   device rules that keep an app's processes to their GPUs; [`gang`]: what
//!   each node's process of a multi-node app is told (rank, world, nodes);
//! - [`sim`]: the trace-driven simulator that runs the same arbiter against
//!   the baseline policies (`gatid bench auction`).

pub mod agent;
pub mod app;
pub mod arbiter;
pub mod bid;
pub mod devices;
pub mod etcd;
pub mod gang;
pub mod gpu;
pub mod lease;
pub mod node;
pub mod node_arbiter;
pub mod node_enforce;
pub mod nsw;
pub mod pa;
pub mod peer;
pub mod sim;
pub mod throughput;

/// Errors of the auction model.
#[derive(Debug, thiserror::Error)]
pub enum AuctionError {
    #[error("throughput model: {0}")]
    Throughput(String),
    #[error("GPU {0:?} is already leased")]
    AlreadyLeased(gpu::GpuId),
    #[error("arbiter config: {0}")]
    Config(String),
}
