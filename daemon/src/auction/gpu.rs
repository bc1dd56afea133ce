//! GPUs of a cluster: ids, bundles (how many GPUs on which node) and the pool
//! of free GPUs an arbiter round offers.
//!
//! GPUs of one node are interchangeable for an app, so a bid prices a
//! [`Bundle`] (counts per node), and only a grant names concrete [`GpuId`]s.
//! A bundle on one node is [`Placement::Packed`]; over several, `Spread`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node of the cluster (dense small integers: the order nodes joined).
pub type NodeId = u32;

/// One GPU: its node and its index on that node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GpuId {
    pub node: NodeId,
    pub index: u32,
}

/// Where an app's GPUs are: all on one node or over several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    Packed,
    Spread,
}

/// GPU counts per node, sorted by node, every count > 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bundle {
    per_node: Vec<(NodeId, u32)>,
}

impl Bundle {
    /// The bundle of these GPUs.
    pub fn of(gpus: &[GpuId]) -> Bundle {
        let mut b = Bundle::default();
        for g in gpus {
            b.add(g.node, 1);
        }
        b
    }

    /// `n` GPUs on `node`.
    pub fn on(node: NodeId, n: u32) -> Bundle {
        let mut b = Bundle::default();
        b.add(node, n);
        b
    }

    /// Adds `n` GPUs on `node`.
    pub fn add(&mut self, node: NodeId, n: u32) {
        if n == 0 {
            return;
        }
        match self.per_node.binary_search_by_key(&node, |p| p.0) {
            Ok(i) => self.per_node[i].1 += n,
            Err(i) => self.per_node.insert(i, (node, n)),
        }
    }

    /// This bundle and `other` together.
    pub fn union(&self, other: &Bundle) -> Bundle {
        let mut b = self.clone();
        for &(node, n) in &other.per_node {
            b.add(node, n);
        }
        b
    }

    /// Total GPUs.
    pub fn total(&self) -> u32 {
        self.per_node.iter().map(|p| p.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.per_node.is_empty()
    }

    /// `(node, count)` pairs, by node.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u32)> + '_ {
        self.per_node.iter().copied()
    }

    /// GPUs on `node`.
    pub fn on_node(&self, node: NodeId) -> u32 {
        self.per_node.binary_search_by_key(&node, |p| p.0).map(|i| self.per_node[i].1).unwrap_or(0)
    }

    /// Packed when on at most one node.
    pub fn placement(&self) -> Placement {
        if self.per_node.len() <= 1 {
            Placement::Packed
        } else {
            Placement::Spread
        }
    }

    /// The first `k` GPUs of this bundle, taken from the nodes with the most first
    /// (so a cut-down bundle stays as packed as it can).
    pub fn truncate(&self, k: u32) -> Bundle {
        let mut by_size: Vec<(NodeId, u32)> = self.per_node.clone();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Bundle::default();
        let mut left = k;
        for (node, n) in by_size {
            let take = n.min(left);
            out.add(node, take);
            left -= take;
        }
        out
    }
}

/// The free GPUs of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    free: BTreeMap<NodeId, Vec<u32>>,
}

impl Pool {
    /// A pool with every GPU of `nodes` (node id, GPU count) free.
    pub fn with_nodes(nodes: &[(NodeId, u32)]) -> Pool {
        let mut p = Pool::default();
        for &(node, n) in nodes {
            p.free.entry(node).or_default().extend(0..n);
        }
        p
    }

    /// Free GPUs in all.
    pub fn total(&self) -> u32 {
        self.free.values().map(|v| v.len() as u32).sum()
    }

    /// Free GPUs per node (nodes with none left out).
    pub fn counts(&self) -> Bundle {
        let mut b = Bundle::default();
        for (&node, v) in &self.free {
            b.add(node, v.len() as u32);
        }
        b
    }

    /// Whether every GPU of `b` is free.
    pub fn fits(&self, b: &Bundle) -> bool {
        b.iter().all(|(node, n)| self.free.get(&node).map_or(0, |v| v.len() as u32) >= n)
    }

    /// Takes the GPUs of `b` (lowest indices first); `None` if they are not all free.
    pub fn take(&mut self, b: &Bundle) -> Option<Vec<GpuId>> {
        if !self.fits(b) {
            return None;
        }
        let mut out = Vec::with_capacity(b.total() as usize);
        for (node, n) in b.iter() {
            let v = self.free.get_mut(&node)?;
            v.sort_unstable();
            out.extend(v.drain(..n as usize).map(|index| GpuId { node, index }));
        }
        Some(out)
    }

    /// Takes the GPUs of `b`, choosing those in `prefer` first on each node
    /// (an app gets back the GPUs it just had); `None` if `b` is not all free.
    pub fn take_preferring(&mut self, b: &Bundle, prefer: &[GpuId]) -> Option<Vec<GpuId>> {
        if !self.fits(b) {
            return None;
        }
        let mut out = Vec::with_capacity(b.total() as usize);
        for (node, n) in b.iter() {
            let v = self.free.get_mut(&node)?;
            // Preferred GPUs first, then lowest index.
            v.sort_unstable_by_key(|&i| (!prefer.contains(&GpuId { node, index: i }), i));
            out.extend(v.drain(..n as usize).map(|index| GpuId { node, index }));
        }
        Some(out)
    }

    /// Takes these exact GPUs; `false` (and nothing taken) if any is not free.
    pub fn take_exact(&mut self, gpus: &[GpuId]) -> bool {
        let all = gpus.iter().all(|g| self.free.get(&g.node).is_some_and(|v| v.contains(&g.index)));
        if !all {
            return false;
        }
        for g in gpus {
            if let Some(v) = self.free.get_mut(&g.node) {
                v.retain(|&i| i != g.index);
            }
        }
        true
    }

    /// Gives GPUs back to the pool.
    pub fn put(&mut self, gpus: &[GpuId]) {
        for g in gpus {
            let v = self.free.entry(g.node).or_default();
            if !v.contains(&g.index) {
                v.push(g.index);
            }
        }
    }

    /// Removes a node's GPUs from the pool (the node left the cluster).
    pub fn remove_node(&mut self, node: NodeId) {
        self.free.remove(&node);
    }

    /// `k` GPUs placed as well as the free ones allow, next to `near` (an app's
    /// GPUs) where it can: the node of `near` if it alone has room; else the
    /// node with the least room that fits all `k` (best fit); else spread over
    /// the nodes with the most free first. `None` if fewer than `k` are free.
    pub fn best_bundle(&self, k: u32, near: &Bundle) -> Option<Bundle> {
        best_bundle(&self.counts(), k, near)
    }
}

/// [`Pool::best_bundle`] over free counts per node.
pub fn best_bundle(free: &Bundle, k: u32, near: &Bundle) -> Option<Bundle> {
    if k == 0 {
        return Some(Bundle::default());
    }
    if free.total() < k {
        return None;
    }
    if let [(node, _)] = near.per_node[..] {
        if free.on_node(node) >= k {
            return Some(Bundle::on(node, k));
        }
    }
    if let Some((node, _)) = free.iter().filter(|&(_, n)| n >= k).min_by_key(|&(node, n)| (n, node)) {
        return Some(Bundle::on(node, k));
    }
    Some(spread_bundle(free, k))
}

/// `k` GPUs over the nodes with the most free first (fewest nodes); assumes `free.total() >= k`.
pub fn spread_bundle(free: &Bundle, k: u32) -> Bundle {
    let mut by_size: Vec<(NodeId, u32)> = free.iter().collect();
    by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = Bundle::default();
    let mut left = k;
    for (node, n) in by_size {
        if left == 0 {
            break;
        }
        let take = n.min(left);
        out.add(node, take);
        left -= take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_bundle_packs_best_fit_then_spreads() {
        let free = Bundle::of(&[
            GpuId { node: 0, index: 0 },
            GpuId { node: 0, index: 1 },
            GpuId { node: 0, index: 2 },
            GpuId { node: 1, index: 0 },
            GpuId { node: 1, index: 1 },
        ]);
        assert_eq!(best_bundle(&free, 2, &Bundle::default()), Some(Bundle::on(1, 2)));
        assert_eq!(best_bundle(&free, 2, &Bundle::on(0, 1)), Some(Bundle::on(0, 2)));
        let b = best_bundle(&free, 4, &Bundle::default()).unwrap();
        assert_eq!((b.total(), b.placement()), (4, Placement::Spread));
        assert_eq!(b.on_node(0), 3);
        assert_eq!(best_bundle(&free, 6, &Bundle::default()), None);
    }

    #[test]
    fn pool_take_and_put_round_trip() {
        let mut p = Pool::with_nodes(&[(0, 4), (1, 4)]);
        let g = p.take(&Bundle::on(1, 3)).unwrap();
        assert_eq!(p.total(), 5);
        assert!(p.take(&Bundle::on(1, 2)).is_none());
        assert!(!p.take_exact(&g));
        p.put(&g);
        assert_eq!(p.total(), 8);
        assert!(p.take_exact(&g));
        assert_eq!(Bundle::of(&g).truncate(2), Bundle::on(1, 2));
    }
}
