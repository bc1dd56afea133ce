//! GPU leases: which app holds which GPUs until when. The table refuses a
//! grant of a GPU that is already leased, so no GPU is ever leased to two
//! apps at once; leases end by expiry, by their app finishing, or by their
//! node leaving (revocation).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::app::AppId;
use super::gpu::{Bundle, GpuId, NodeId};
use super::AuctionError;

/// A lease's id (arbiter-wide, increasing).
pub type LeaseId = u64;

/// GPUs held by one app from `start` until `expiry` (seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub app: AppId,
    pub gpus: Vec<GpuId>,
    pub start: f64,
    pub expiry: f64,
    /// The app held these same GPUs under the lease that just expired: its
    /// processes keep running (no checkpoint, no restart).
    pub renewal: bool,
}

/// Every live lease, indexed by GPU and by app.
#[derive(Clone, Debug, Default)]
pub struct LeaseTable {
    leases: BTreeMap<LeaseId, Lease>,
    by_gpu: HashMap<GpuId, LeaseId>,
    by_app: HashMap<AppId, Vec<LeaseId>>,
    next: LeaseId,
}

impl LeaseTable {
    /// Leases `gpus` to `app` for `[now, now + len_s)`; refuses (and changes
    /// nothing) if any of them is leased already.
    pub fn grant(
        &mut self,
        app: AppId,
        gpus: Vec<GpuId>,
        now: f64,
        len_s: f64,
        renewal: bool,
    ) -> Result<&Lease, AuctionError> {
        if let Some(g) = gpus.iter().find(|g| self.by_gpu.contains_key(g)) {
            return Err(AuctionError::AlreadyLeased(*g));
        }
        self.next += 1;
        let id = self.next;
        for g in &gpus {
            self.by_gpu.insert(*g, id);
        }
        self.by_app.entry(app).or_default().push(id);
        Ok(self.leases.entry(id).or_insert(Lease { id, app, gpus, start: now, expiry: now + len_s, renewal }))
    }

    /// Puts back a lease another arbiter granted (failover: the new arbiter
    /// honours it until it expires), keeping its id; refuses (and changes
    /// nothing) if its id or any of its GPUs is taken. Later grants get
    /// higher ids.
    pub fn restore(&mut self, lease: Lease) -> Result<(), AuctionError> {
        if let Some(g) = lease.gpus.iter().find(|g| self.by_gpu.contains_key(g)) {
            return Err(AuctionError::AlreadyLeased(*g));
        }
        if self.leases.contains_key(&lease.id) {
            return Err(AuctionError::Config(format!("lease {} restored twice", lease.id)));
        }
        self.next = self.next.max(lease.id);
        for g in &lease.gpus {
            self.by_gpu.insert(*g, lease.id);
        }
        self.by_app.entry(lease.app).or_default().push(lease.id);
        self.leases.insert(lease.id, lease);
        Ok(())
    }

    /// Lease ids from here on are above `id` (a new arbiter continues above
    /// every id the old one may have used).
    pub fn skip_ids_to(&mut self, id: LeaseId) {
        self.next = self.next.max(id);
    }

    fn remove(&mut self, id: LeaseId) -> Option<Lease> {
        let l = self.leases.remove(&id)?;
        for g in &l.gpus {
            self.by_gpu.remove(g);
        }
        if let Some(v) = self.by_app.get_mut(&l.app) {
            v.retain(|&x| x != id);
            if v.is_empty() {
                self.by_app.remove(&l.app);
            }
        }
        Some(l)
    }

    /// Ends every lease with `expiry <= now`.
    pub fn expire(&mut self, now: f64) -> Vec<Lease> {
        let ids: Vec<LeaseId> = self.leases.values().filter(|l| l.expiry <= now).map(|l| l.id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Ends every lease of `app`.
    pub fn release_app(&mut self, app: AppId) -> Vec<Lease> {
        let ids = self.by_app.get(&app).cloned().unwrap_or_default();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Ends every lease with a GPU on `node` (the whole lease: a gang cannot run on part of its GPUs).
    pub fn revoke_node(&mut self, node: NodeId) -> Vec<Lease> {
        let ids: Vec<LeaseId> =
            self.leases.values().filter(|l| l.gpus.iter().any(|g| g.node == node)).map(|l| l.id).collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// The GPUs `app` holds, as a bundle.
    pub fn held(&self, app: AppId) -> Bundle {
        Bundle::of(&self.held_gpus(app))
    }

    /// The GPUs `app` holds.
    pub fn held_gpus(&self, app: AppId) -> Vec<GpuId> {
        self.by_app
            .get(&app)
            .into_iter()
            .flatten()
            .filter_map(|id| self.leases.get(id))
            .flat_map(|l| l.gpus.iter().copied())
            .collect()
    }

    /// The app holding `gpu`, if any.
    pub fn holder(&self, gpu: GpuId) -> Option<AppId> {
        self.by_gpu.get(&gpu).and_then(|id| self.leases.get(id)).map(|l| l.app)
    }

    /// Live leases, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The earliest expiry of a live lease.
    pub fn next_expiry(&self) -> Option<f64> {
        self.leases.values().map(|l| l.expiry).min_by(f64::total_cmp)
    }

    /// GPUs under lease.
    pub fn leased_gpus(&self) -> usize {
        self.by_gpu.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(node: NodeId, index: u32) -> GpuId {
        GpuId { node, index }
    }

    #[test]
    fn a_gpu_is_never_leased_twice() {
        let mut t = LeaseTable::default();
        t.grant(1, vec![g(0, 0), g(0, 1)], 0.0, 10.0, false).unwrap();
        assert!(matches!(t.grant(2, vec![g(0, 2), g(0, 1)], 0.0, 10.0, false), Err(AuctionError::AlreadyLeased(_))));
        assert_eq!(t.holder(g(0, 2)), None);
        assert_eq!(t.held(1).total(), 2);
        assert_eq!(t.expire(9.9).len(), 0);
        assert_eq!(t.expire(10.0).len(), 1);
        t.grant(2, vec![g(0, 1), g(1, 0)], 10.0, 10.0, false).unwrap();
        assert_eq!(t.revoke_node(1).len(), 1);
        assert_eq!(t.leased_gpus(), 0);
        // Restored leases keep their ids and block their GPUs.
        let old = Lease { id: 40, app: 7, gpus: vec![g(0, 0)], start: 0.0, expiry: 5.0, renewal: false };
        t.restore(old.clone()).unwrap();
        assert!(t.restore(Lease { id: 41, ..old.clone() }).is_err(), "GPU taken");
        assert_eq!(t.holder(g(0, 0)), Some(7));
        assert!(t.grant(8, vec![g(0, 1)], 0.0, 1.0, false).unwrap().id > 40);
    }
}
