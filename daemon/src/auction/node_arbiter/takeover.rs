//! The arbiter a node runs once elected on etcd ([`ArbiterState::elected`]):
//! it takes over what the previous one stored — members, apps with their
//! progress and throughput models, and the leases in force — and each app's
//! running on its stored leases since its last stored progress.

use std::sync::Arc;

use super::{member, ArbiterState, Out, TrackedApp};
use crate::auction::app::{App, AppSpec};
use crate::auction::etcd::record::{Op, Snapshot};
use crate::auction::gpu::{Bundle, GpuId, NodeId};
use crate::auction::lease::Lease;
use crate::auction::AuctionError;
use crate::config::ClusterConfig;

impl ArbiterState {
    /// The arbiter a node runs once elected on etcd, from what the previous
    /// one stored: the members registered now, the apps, and the leases in
    /// force — honoured until they expire (a lease on a GPU of a node that is
    /// gone, of an app that is gone, or already expired at `now` is dropped).
    /// Returns the state and what brings every member's view to it.
    pub fn elected(
        me: NodeId,
        cfg: &ClusterConfig,
        snap: Snapshot,
        now: f64,
    ) -> Result<(ArbiterState, Vec<Out>), AuctionError> {
        let mut s = ArbiterState::new(me, cfg)?;
        s.on_etcd = true;
        for (n, rec) in snap.members {
            if let Some(m) = member(&rec, now) {
                s.arbiter.add_node(n, m.gpus);
                s.members.insert(n, m);
            }
        }
        for a in snap.apps {
            let model = match a.model.checked() {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    tracing::warn!(app = a.id, error = %e, "stored throughput model refused; using the submitted-app model");
                    Arc::clone(&s.model)
                }
            };
            let spec =
                AppSpec { id: a.id, name: a.name, demand: a.demand, total_work: a.work, model, arrival: a.arrival };
            s.apps.insert(a.id, TrackedApp { app: App::resume(spec, a.progress), command: a.command, node: a.node });
        }
        // Each app ran on its stored leases since its last stored progress,
        // up to their expiry (or now): counted, and stored (a lease that
        // expired before this election is dropped below, and its time would
        // count as without GPUs).
        let (active, mut ran) = (s.apps.len(), Vec::new());
        for (&id, t) in &mut s.apps {
            // Only leases on nodes that are still members, and only up to the
            // earliest expiry: never more progress than the app made.
            let members = &s.members;
            let live = |l: &&Lease| l.app == id && l.gpus.iter().all(|g| members.contains_key(&g.node));
            let gpus: Vec<GpuId> = snap.leases.iter().filter(live).flat_map(|l| l.gpus.iter().copied()).collect();
            let until = snap.leases.iter().filter(live).map(|l| l.expiry).fold(now, f64::min);
            if !gpus.is_empty() && until > t.app.progress().last {
                t.app.advance(until, &Bundle::of(&gpus), active);
                ran.push(id);
            }
        }
        ran.into_iter().for_each(|id| s.journal_app(id)); // (the next arbiter has no dropped lease)
        s.arbiter.skip_lease_ids_to(snap.leases.iter().map(|l| l.id).max().unwrap_or(0));
        for l in snap.leases {
            let id = l.id;
            let keep = s.apps.contains_key(&l.app) && l.expiry > now;
            if !keep || s.arbiter.restore_lease(l).is_err() {
                s.ops.push(Op::DelLease(id));
            }
        }
        let out = s.members.keys().map(|&n| Out::Resync(n, s.resync(n, now))).collect();
        Ok((s, out))
    }
}
