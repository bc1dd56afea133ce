//! The arbiter's lease rounds in the peer service: every `round_s` a round
//! opens (offers go to the agents' home nodes), and it closes when the last
//! offered agent has bid ([`ArbiterState::take_bid`]) or at the bid deadline
//! ([`crate::config::ClusterConfig::bid_deadline_s`]), whichever is first.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::auction::arbiter::RoundReport;
use crate::auction::node_arbiter::ArbiterState;
use crate::config::ClusterConfig;
use crate::telemetry::names;

/// A round waiting for bids: its id and when it closes regardless.
pub(super) type Deadline = (u64, Instant);

/// Opens a round if this node arbitrates now.
pub(super) fn begin(shared: &Arc<Shared>, cfg: &ClusterConfig) -> Option<Deadline> {
    let now = shared.now();
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.bid_deadline_s());
    let id = shared.step(|a: &mut ArbiterState| {
        let r = a.begin_round(now);
        metrics::gauge!(names::CLUSTER_NODES).set(a.members().len() as f64);
        r
    });
    id.flatten().map(|id| (id, deadline))
}

/// Closes round `id` at its deadline (a no-op if every bid came in before).
pub(super) fn close(shared: &Arc<Shared>, id: u64) {
    let now = shared.now();
    if let Some(Some(r)) = shared.step(|a| a.close_round(id, now)) {
        log(&r);
    }
}

/// Until the open round's deadline (forever when none is open).
pub(super) async fn until(d: Option<Deadline>) {
    match d {
        Some((_, at)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn log(r: &RoundReport) {
    if !r.grants.is_empty() || !r.expired.is_empty() || !r.no_bid.is_empty() {
        tracing::info!(
            grants = r.grants.len(),
            auctioned = r.auctioned.len(),
            expired = r.expired.len(),
            offered_to = r.offered_to,
            no_bid = r.no_bid.len(),
            ms = r.elapsed_ms,
            "lease round"
        );
    }
}

/// On the arbiter node: its last rounds into this node's view (`gatictl apps`).
pub(super) fn publish(shared: &Shared) {
    let rounds = shared.arbiter_lock().as_ref().map(|a| {
        let v: Vec<_> = a.recent_rounds().collect();
        serde_json::to_value(v).unwrap_or_default()
    });
    shared.node.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rounds = rounds;
}
