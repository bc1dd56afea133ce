//! The routing table: DAG id → SGSs with weights, published by the load
//! balancer through [`RouteTable`]. This file holds the userspace
//! implementation; the eBPF steering layer implements the same trait by
//! writing BPF maps (same semantics: weighted choice by a request key).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Index of an SGS in the scheduler.
pub type SgsIndex = usize;

/// One destination of a DAG's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub sgs: SgsIndex,
    /// Relative share of the DAG's requests (> 0).
    pub weight: u32,
}

/// Where the LB publishes routes and where requests find their SGS.
pub trait RouteTable: Send + Sync {
    /// Replaces the routes of DAG `dag` (wire id); an empty slice removes it.
    fn publish(&self, dag: u32, routes: &[Route]);
    /// The SGS for a request of `dag`; `key` spreads requests over the routes
    /// in proportion to their weights (a counter, a connection id, a hash).
    fn lookup(&self, dag: u32, key: u64) -> Option<SgsIndex>;
    /// Which implementation is active, for logs and `gatictl info`.
    fn kind(&self) -> &'static str;
}

/// The userspace table: a map behind a read-write lock.
#[derive(Debug, Default)]
pub struct UserRouteTable {
    routes: RwLock<HashMap<u32, Arc<[Route]>>>,
}

/// Weighted pick: `key` modulo the total weight, walked over the routes.
pub fn pick(routes: &[Route], key: u64) -> Option<SgsIndex> {
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return routes.first().map(|r| r.sgs);
    }
    let mut x = key % total;
    for r in routes {
        if x < u64::from(r.weight) {
            return Some(r.sgs);
        }
        x -= u64::from(r.weight);
    }
    None
}

impl RouteTable for UserRouteTable {
    fn publish(&self, dag: u32, routes: &[Route]) {
        let mut m = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.is_empty() {
            m.remove(&dag);
        } else {
            m.insert(dag, routes.into());
        }
    }

    fn lookup(&self, dag: u32, key: u64) -> Option<SgsIndex> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(&dag).cloned()?;
        pick(&routes, key)
    }

    fn kind(&self) -> &'static str {
        "userspace"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_follows_weights() {
        let t = UserRouteTable::default();
        t.publish(7, &[Route { sgs: 0, weight: 1 }, Route { sgs: 3, weight: 3 }]);
        let picks: Vec<_> = (0..8).map(|k| t.lookup(7, k).unwrap()).collect();
        assert_eq!(picks, vec![0, 3, 3, 3, 0, 3, 3, 3]);
        assert_eq!(t.lookup(8, 0), None);
        t.publish(7, &[]);
        assert_eq!(t.lookup(7, 0), None);
    }
}
