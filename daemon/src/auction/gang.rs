//! Gang launch: an app whose leases span GPUs on several nodes runs one
//! process per node, and each process is told where it stands so that a
//! distributed job can find its peers: its rank among the nodes, the world
//! size, the nodes in order (ascending node id, the same on every node) and
//! their GPU counts, and when its lease ends. The environment is
//! documented in `docs/auction.md`, "What an app's process sees".
//!
//! A change of the gang (a node joins or leaves it, or a node's GPU count
//! changes) restarts every rank: the enforcer compares [`Want::key`].

use std::collections::BTreeMap;

use super::app::AppId;
use super::gpu::NodeId;
use super::lease::Lease;

/// Where one node's process of an app stands in its gang.
#[derive(Clone, Debug, PartialEq)]
pub struct Gang {
    /// The nodes holding the app's GPUs, ascending.
    pub nodes: Vec<NodeId>,
    /// GPUs on each of `nodes`.
    pub node_gpus: Vec<u32>,
    /// This node's position in `nodes`.
    pub rank: usize,
    /// The earliest expiry of the app's leases (on the arbiter's clock).
    pub expiry: f64,
}

impl Gang {
    /// `app`'s gang from the leases this node sees; `None` when it holds no GPU on `node`.
    pub fn of<'a>(app: AppId, node: NodeId, leases: impl IntoIterator<Item = &'a Lease>) -> Option<Gang> {
        let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut expiry = f64::INFINITY;
        for l in leases.into_iter().filter(|l| l.app == app) {
            for g in &l.gpus {
                *per_node.entry(g.node).or_default() += 1;
            }
            expiry = expiry.min(l.expiry);
        }
        let rank = per_node.keys().position(|&n| n == node)?;
        Some(Gang {
            nodes: per_node.keys().copied().collect(),
            node_gpus: per_node.values().copied().collect(),
            rank,
            expiry,
        })
    }

    pub fn world_size(&self) -> usize {
        self.nodes.len()
    }

    /// The gang's part of an app process's environment; `unix_clock`: lease
    /// expiries are Unix seconds (on etcd), else seconds on the static arbiter's clock.
    pub fn env(&self, unix_clock: bool) -> Vec<(&'static str, String)> {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        vec![
            ("GATI_RANK", self.rank.to_string()),
            ("GATI_WORLD_SIZE", self.world_size().to_string()),
            ("GATI_NODES", list(&self.nodes)),
            ("GATI_NODE_GPUS", list(&self.node_gpus)),
            ("GATI_LEASE_EXPIRY", format!("{:.3}", self.expiry)),
            ("GATI_LEASE_CLOCK", if unix_clock { "unix" } else { "arbiter" }.to_string()),
        ]
    }
}

/// What an app should have on this node.
#[derive(Clone, Debug, PartialEq)]
pub struct Want {
    /// Local GPU indices, ascending.
    pub gpus: Vec<u32>,
    pub command: Vec<String>,
    pub gang: Gang,
}

/// What must stay the same for an app's process to keep running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantKey {
    gpus: Vec<u32>,
    nodes: Vec<NodeId>,
    node_gpus: Vec<u32>,
}

impl Want {
    pub fn key(&self) -> WantKey {
        WantKey { gpus: self.gpus.clone(), nodes: self.gang.nodes.clone(), node_gpus: self.gang.node_gpus.clone() }
    }
}

impl WantKey {
    pub fn gpus(&self) -> &[u32] {
        &self.gpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auction::gpu::GpuId;

    fn lease(id: u64, app: AppId, gpus: &[(NodeId, u32)], expiry: f64) -> Lease {
        Lease {
            id,
            app,
            gpus: gpus.iter().map(|&(node, index)| GpuId { node, index }).collect(),
            start: 0.0,
            expiry,
            renewal: false,
        }
    }

    #[test]
    fn a_spread_lease_gives_each_node_its_rank_and_the_same_world() {
        let leases =
            [lease(1, 7, &[(3, 0), (3, 1), (1, 2)], 40.0), lease(2, 7, &[(2, 0)], 35.5), lease(3, 8, &[(4, 0)], 9.0)];
        let ranks: Vec<Gang> = [1, 2, 3].iter().map(|&n| Gang::of(7, n, &leases).unwrap()).collect();
        for (r, g) in ranks.iter().enumerate() {
            assert_eq!((g.rank, g.world_size(), g.expiry), (r, 3, 35.5));
            assert_eq!((g.nodes.as_slice(), g.node_gpus.as_slice()), (&[1, 2, 3][..], &[1, 1, 2][..]));
        }
        assert_eq!(Gang::of(7, 4, &leases), None, "no GPU of app 7 on node 4");
        let env: BTreeMap<_, _> = ranks[2].env(true).into_iter().collect();
        assert_eq!(env["GATI_RANK"], "2");
        assert_eq!(env["GATI_WORLD_SIZE"], "3");
        assert_eq!(env["GATI_NODES"], "1,2,3");
        assert_eq!(env["GATI_NODE_GPUS"], "1,1,2");
        assert_eq!(env["GATI_LEASE_EXPIRY"], "35.500");
        assert_eq!(env["GATI_LEASE_CLOCK"], "unix");
        let solo = Gang::of(8, 4, &leases).unwrap();
        assert_eq!((solo.rank, solo.world_size()), (0, 1));
        assert_eq!(Gang::of(8, 4, &leases).unwrap().env(false)[5].1, "arbiter");
    }
}
