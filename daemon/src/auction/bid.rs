//! An app's agent and its bids: a table of ρ over the GPU bundles it could
//! win from an offer, placement-aware (a bundle that keeps the app on one
//! node prices the packed throughput, one over several nodes the spread one).
//!
//! Bundle sizes are the powers of two up to what the app can still use, and
//! exactly that; for each size the agent prices the best packed bundle (on the
//! node it already uses if that has room, else best fit), packed ones on up
//! to [`PACKED_NODES`] other nodes (so that bidders do not all want the same
//! node), and the fewest-node spread one. Only bundles that lower its ρ are bid.

use serde::{Deserialize, Serialize};

use super::app::{App, AppId, ClusterView};
use super::gpu::{best_bundle, spread_bundle, Bundle, NodeId};

/// Packed bundles priced per size: on this many nodes at most (besides the best one).
pub const PACKED_NODES: usize = 3;

/// One line of a bid: this bundle (on top of what the app holds) gives it this ρ.
#[derive(Clone, Debug, PartialEq)]
pub struct BidOption {
    pub bundle: Bundle,
    pub rho: f64,
}

/// An agent's answer to an offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Bid {
    pub app: AppId,
    /// ρ with no new GPUs (what it keeps holding, or none).
    pub rho_without: f64,
    pub options: Vec<BidOption>,
}

/// ρ an agent reports when the arbiter picks whom to offer to.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RhoReport {
    pub app: AppId,
    pub rho: f64,
}

/// The agent of `app`, which holds `held`: its bid for GPUs out of `offer` (free counts per node).
pub fn bid(app: &App, held: &Bundle, offer: &Bundle, view: &ClusterView) -> Bid {
    let rho_without = app.rho_with(held, view);
    let mut options: Vec<BidOption> = Vec::new();
    let room = app.spec.demand.saturating_sub(held.total()).min(offer.total());
    let mut sizes: Vec<u32> = (0..32).map(|i| 1u32 << i).take_while(|&k| k < room).collect();
    if room > 0 {
        sizes.push(room);
    }
    for k in sizes {
        let mut candidates: Vec<Bundle> = best_bundle(offer, k, held).into_iter().collect();
        // Other nodes it fits on, best fit first, so that bidders need not all want one node.
        let mut fitting: Vec<(u32, NodeId)> =
            offer.iter().filter(|&(_, n)| n >= k).map(|(node, n)| (n, node)).collect();
        fitting.sort_unstable();
        candidates.extend(fitting.into_iter().take(PACKED_NODES).map(|(_, node)| Bundle::on(node, k)));
        candidates.push(spread_bundle(offer, k));
        for b in candidates {
            if b.total() != k || options.iter().any(|o| o.bundle == b) {
                continue;
            }
            let rho = app.rho_with(&held.union(&b), view);
            if rho < rho_without {
                options.push(BidOption { bundle: b, rho });
            }
        }
    }
    Bid { app: app.spec.id, rho_without, options }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::auction::app::AppSpec;
    use crate::auction::throughput::ThroughputModel;

    #[test]
    fn bids_price_packing() {
        let app = App::new(AppSpec {
            id: 7,
            name: "t".into(),
            demand: 4,
            total_work: 1000.0,
            model: Arc::new(ThroughputModel::linear(1.0, 0.5)),
            arrival: 0.0,
        });
        let offer = Bundle::on(0, 2).union(&Bundle::on(1, 4));
        let view = ClusterView { now: 0.0, gpus: 8, node_gpus: 4, lease_s: 60.0 };
        let b = bid(&app, &Bundle::default(), &offer, &view);
        assert_eq!(b.app, 7);
        // Sizes 1, 2, 4; 4 packed on node 1 beats any spread 4.
        let best = b.options.iter().min_by(|x, y| x.rho.total_cmp(&y.rho)).unwrap();
        assert_eq!(best.bundle, Bundle::on(1, 4));
        let spread4 = b.options.iter().find(|o| o.bundle.total() == 4 && o.bundle != Bundle::on(1, 4));
        assert!(spread4.is_none_or(|o| o.rho > best.rho));
        assert!(b.options.iter().all(|o| o.rho < b.rho_without));
    }
}
