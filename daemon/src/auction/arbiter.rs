//! The arbiter's lease round (Themis):
//!
//! 1. leases that expired return their GPUs to the pool;
//! 2. every app's agent reports ρ with what it holds; the ⌈(1 − f)·n⌉ apps
//!    with the worst ρ (among those that could use more GPUs), but never more
//!    apps than there are free GPUs, get the offer;
//! 3. their agents bid tables of ρ over bundles of the free GPUs ([`bid`]);
//! 4. the partial-allocation mechanism ([`pa`]) picks winners and fractions;
//!    a winner gets its whole bundle on a lease of c_i · `lease_s` (at least
//!    [`MIN_LEASE_SHARE`] of it): the fraction as a time share, so that a
//!    one-GPU winner is not rounded down to nothing;
//! 5. what is left (unallocated or withheld) goes to the apps outside the
//!    auction, worst ρ first, each its best option out of what remains.
//!
//! Why the two caps (docs/auction.md, "Why Themis lost"): rounding c_i to
//! whole GPUs gave a one-GPU winner with c_i < ½ nothing, so the auction's
//! GPUs went to the apps outside it, the best off; and when a few GPUs are
//! offered to many bidders, Π 1/ρ picks the bidder with the largest relative
//! gain, which is the one that has waited least (a long wait is sunk in both
//! ρ with and ρ without), so the most starved app never won.
//!
//! The same code runs in the daemon (agents answer over the peer protocol)
//! and in the simulator (agents are [`App`]s in memory).

use std::collections::BTreeMap;
use std::time::Instant;

use super::app::{App, AppId, ClusterView};
use super::bid::{bid, Bid};
use super::gpu::{Bundle, GpuId, NodeId, Pool};
use super::lease::{Lease, LeaseTable};
use super::nsw::{Agent, Choice, Problem};
use super::{pa, AuctionError};

/// The shortest lease a winner gets, as a share of a full one (c_i below it
/// is raised to it, so that a GPU is not re-auctioned every few seconds).
pub const MIN_LEASE_SHARE: f64 = 0.05;

/// The arbiter's knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArbiterConfig {
    /// Themis's f: the share of apps (best ρ first) left out of each auction, in [0, 1].
    pub fairness_f: f64,
    /// Lease length, seconds.
    pub lease_s: f64,
}

/// What a round did.
#[derive(Clone, Debug, Default)]
pub struct RoundReport {
    pub expired: Vec<Lease>,
    pub grants: Vec<Lease>,
    /// Apps offered GPUs (the auction's participants).
    pub offered_to: usize,
    /// GPUs free when the auction ran.
    pub offered_gpus: u32,
    /// GPU-seconds the mechanism withheld from its winners ((1 − c_i) of
    /// their bundles' lease time): their GPUs return to the pool that much
    /// earlier and go to the next round.
    pub withheld_gpu_s: f64,
    /// GPUs granted to apps outside the auction.
    pub leftover_gpus: u32,
    /// Apps granted a lease by the auction (the rest of `grants` are leftover).
    pub auctioned: Vec<AppId>,
    /// Offered apps whose agent did not bid (they took no part in the auction).
    pub no_bid: Vec<AppId>,
    /// Time spent in the round, ms.
    pub elapsed_ms: f64,
}

/// A round between its two phases: what was offered, to whom.
#[derive(Clone, Debug)]
pub struct OpenRound {
    /// The round's time and the cluster as the agents price it.
    pub view: ClusterView,
    /// Free GPUs per node, offered to every app of [`OpenRound::inside`].
    pub offer: Bundle,
    /// The apps offered GPUs, worst ρ first.
    pub inside: Vec<AppId>,
    /// The other apps that could use more GPUs, worst ρ first (the leftover's order).
    pub outside: Vec<AppId>,
    just_had: BTreeMap<AppId, Vec<GpuId>>,
    report: RoundReport,
    /// Time spent in the first phase, ms.
    ms: f64,
}

impl OpenRound {
    /// Leases that expired at the round's start (their GPUs are in the offer).
    pub fn expired(&self) -> &[Lease] {
        &self.report.expired
    }
}

/// The cluster's GPUs, who leases them, and the rounds.
#[derive(Clone, Debug)]
pub struct Arbiter {
    cfg: ArbiterConfig,
    nodes: BTreeMap<NodeId, u32>,
    pool: Pool,
    leases: LeaseTable,
}

impl Arbiter {
    /// An arbiter over `nodes` (node, GPUs), all free.
    pub fn new(cfg: ArbiterConfig, nodes: &[(NodeId, u32)]) -> Result<Arbiter, AuctionError> {
        if !(0.0..=1.0).contains(&cfg.fairness_f) || cfg.lease_s.is_nan() || cfg.lease_s <= 0.0 {
            return Err(AuctionError::Config(format!(
                "fairness_f {} must be in [0, 1], lease_s {} > 0",
                cfg.fairness_f, cfg.lease_s
            )));
        }
        Ok(Arbiter {
            cfg,
            nodes: nodes.iter().copied().collect(),
            pool: Pool::with_nodes(nodes),
            leases: LeaseTable::default(),
        })
    }

    pub fn config(&self) -> ArbiterConfig {
        self.cfg
    }

    /// GPUs in the cluster.
    pub fn gpus(&self) -> u32 {
        self.nodes.values().sum()
    }

    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Free GPUs per node.
    pub fn free(&self) -> Bundle {
        self.pool.counts()
    }

    /// A node joins with `gpus` free GPUs (or rejoins: its old leases are gone).
    pub fn add_node(&mut self, node: NodeId, gpus: u32) {
        self.remove_node(node);
        self.nodes.insert(node, gpus);
        self.pool.put(&(0..gpus).map(|index| GpuId { node, index }).collect::<Vec<_>>());
    }

    /// A node left: its leases are revoked (their GPUs elsewhere return to the pool).
    pub fn remove_node(&mut self, node: NodeId) -> Vec<Lease> {
        let revoked = self.leases.revoke_node(node);
        for l in &revoked {
            self.pool.put(&l.gpus);
        }
        self.pool.remove_node(node);
        self.nodes.remove(&node);
        revoked
    }

    /// Puts back a lease another arbiter granted (failover); refuses one
    /// whose GPUs are not all free here (unknown node, or leased already).
    pub fn restore_lease(&mut self, lease: Lease) -> Result<(), AuctionError> {
        if let Some(g) = lease.gpus.iter().find(|g| self.nodes.get(&g.node).is_none_or(|&n| g.index >= n)) {
            return Err(AuctionError::Config(format!("lease {}: GPU {g:?} is not in the cluster", lease.id)));
        }
        if !self.pool.take_exact(&lease.gpus) {
            return Err(AuctionError::Config(format!("lease {}: a GPU of it is leased already", lease.id)));
        }
        let gpus = lease.gpus.clone();
        self.leases.restore(lease).inspect_err(|_| self.pool.put(&gpus))
    }

    /// New lease ids are above `id`.
    pub fn skip_lease_ids_to(&mut self, id: u64) {
        self.leases.skip_ids_to(id);
    }

    /// An app finished or was withdrawn: its leases end now.
    pub fn release_app(&mut self, app: AppId) -> Vec<Lease> {
        let ended = self.leases.release_app(app);
        for l in &ended {
            self.pool.put(&l.gpus);
        }
        ended
    }

    /// One lease round at `now` over the active `apps`, every agent answering
    /// in process (the simulator): [`Arbiter::open_round`], [`bid`] for each
    /// offered app, [`Arbiter::close_round`].
    pub fn round(&mut self, now: f64, apps: &[&App]) -> RoundReport {
        let open = self.open_round(now, apps);
        let by_id: BTreeMap<AppId, &App> = apps.iter().map(|a| (a.spec.id, *a)).collect();
        let bids: Vec<Bid> = open
            .inside
            .iter()
            .filter_map(|id| by_id.get(id))
            .map(|a| bid(a, &self.leases.held(a.spec.id), &open.offer, &open.view))
            .collect();
        self.close_round(open, bids, apps)
    }

    /// The first phase of a round at `now`: expired leases return, the apps
    /// are ranked by ρ and the worst get the offer ([`OpenRound::inside`],
    /// each offered [`OpenRound::offer`] on top of what it holds).
    pub fn open_round(&mut self, now: f64, apps: &[&App]) -> OpenRound {
        let t0 = Instant::now();
        let mut report = RoundReport { expired: self.leases.expire(now), ..RoundReport::default() };
        for l in &report.expired {
            self.pool.put(&l.gpus);
        }
        let just_had: BTreeMap<AppId, Vec<GpuId>> = report.expired.iter().fold(BTreeMap::new(), |mut m, l| {
            m.entry(l.app).or_insert_with(Vec::new).extend(&l.gpus);
            m
        });
        let view = ClusterView {
            now,
            gpus: self.gpus(),
            node_gpus: self.nodes.values().copied().max().unwrap_or(0),
            lease_s: self.cfg.lease_s,
        };
        report.offered_gpus = self.pool.total();
        let mut open = OpenRound {
            view,
            offer: self.pool.counts(),
            inside: Vec::new(),
            outside: Vec::new(),
            just_had,
            report,
            ms: 0.0,
        };
        if open.report.offered_gpus == 0 {
            open.ms = t0.elapsed().as_secs_f64() * 1e3;
            return open;
        }
        // Agents' ρ reports; only apps that could use more GPUs take part.
        let mut eligible: Vec<(f64, &App)> = apps
            .iter()
            .filter(|a| !a.is_done() && self.leases.held(a.spec.id).total() < a.spec.demand)
            .map(|a| (a.rho_with(&self.leases.held(a.spec.id), &view), *a))
            .collect();
        eligible.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.spec.id.cmp(&y.1.spec.id)));
        let n_offered = (((1.0 - self.cfg.fairness_f) * eligible.len() as f64).ceil() as usize)
            .min(open.report.offered_gpus as usize);
        let (inside, outside) = eligible.split_at(n_offered.min(eligible.len()));
        open.report.offered_to = inside.len();
        open.inside = inside.iter().map(|(_, a)| a.spec.id).collect();
        open.outside = outside.iter().map(|(_, a)| a.spec.id).collect();
        open.ms = t0.elapsed().as_secs_f64() * 1e3;
        open
    }

    /// The second phase: the mechanism over the `bids` received (one per
    /// offered app at most; an offered app without one takes no part, and
    /// counts as outside the auction for the leftover), then the leftover to
    /// the apps outside, worst ρ first. `apps` are the active apps (those of
    /// [`OpenRound`] missing from it are skipped). Options that no longer fit
    /// the free GPUs (a node left since the offer) are dropped.
    pub fn close_round(&mut self, open: OpenRound, bids: Vec<Bid>, apps: &[&App]) -> RoundReport {
        let t0 = Instant::now();
        let OpenRound { view, offer, inside, outside, just_had, mut report, ms } = open;
        let now = view.now;
        // The GPUs offered that are still free.
        let free = self.pool.counts();
        let mut capacity = Bundle::default();
        for (n, k) in offer.iter() {
            capacity.add(n, k.min(free.on_node(n)));
        }
        let mut bids = bids;
        for b in &mut bids {
            b.options.retain(|o| o.bundle.iter().all(|(n, k)| k <= capacity.on_node(n)));
        }
        let by_id: BTreeMap<AppId, &App> = apps.iter().map(|a| (a.spec.id, *a)).collect();
        if !capacity.is_empty() && !bids.is_empty() {
            let problem = to_problem(&capacity, &bids);
            let outcome = pa::run(&problem);
            for award in &outcome.awards {
                let b = &bids[award.agent];
                let bundle = &b.options[award.option].bundle;
                // c_i as a time share: the whole bundle (a gang needs all of it at once) for c_i of a lease.
                let share = award.fraction.clamp(MIN_LEASE_SHARE, 1.0);
                report.withheld_gpu_s += (1.0 - share) * f64::from(bundle.total()) * self.cfg.lease_s;
                let bundle = bundle.clone();
                let before = report.grants.len();
                self.grant(now, b.app, &bundle, share * self.cfg.lease_s, &just_had, &mut report);
                if report.grants.len() > before {
                    report.auctioned.push(b.app);
                }
            }
        }
        // Leftover to the apps outside the auction, worst ρ first: offered
        // apps that did not bid (they ranked worst), then the rest.
        let bidders: Vec<AppId> = bids.iter().map(|b| b.app).collect();
        report.no_bid = inside.iter().copied().filter(|a| !bidders.contains(a)).collect();
        let leftover_to: Vec<AppId> = report.no_bid.iter().chain(&outside).copied().collect();
        for id in leftover_to {
            if self.pool.total() == 0 {
                break;
            }
            let Some(a) = by_id.get(&id) else { continue };
            let held = self.leases.held(id);
            let b = bid(a, &held, &self.pool.counts(), &view);
            if let Some(best) = b.options.iter().min_by(|x, y| x.rho.total_cmp(&y.rho)) {
                report.leftover_gpus += best.bundle.total();
                let bundle = best.bundle.clone();
                self.grant(now, id, &bundle, self.cfg.lease_s, &just_had, &mut report);
            }
        }
        report.elapsed_ms = ms + t0.elapsed().as_secs_f64() * 1e3;
        report
    }

    fn grant(
        &mut self,
        now: f64,
        app: AppId,
        b: &Bundle,
        len_s: f64,
        just_had: &BTreeMap<AppId, Vec<GpuId>>,
        report: &mut RoundReport,
    ) {
        let prefer = just_had.get(&app).map(Vec::as_slice).unwrap_or(&[]);
        let Some(gpus) = self.pool.take_preferring(b, prefer) else {
            return; // cannot happen: every bundle was built from the pool and the solver keeps within it
        };
        let renewal = !prefer.is_empty() && gpus.iter().all(|g| prefer.contains(g));
        match self.leases.grant(app, gpus.clone(), now, len_s, renewal) {
            Ok(l) => report.grants.push(l.clone()),
            Err(_) => self.pool.put(&gpus),
        }
    }
}

/// The bids in solver form: nodes indexed in the offer's order, values ln(1/ρ).
fn to_problem(offer: &Bundle, bids: &[Bid]) -> Problem {
    let nodes: Vec<NodeId> = offer.iter().map(|(n, _)| n).collect();
    let index = |n: NodeId| nodes.binary_search(&n).unwrap_or(0);
    Problem {
        capacity: offer.iter().map(|(_, k)| k).collect(),
        agents: bids
            .iter()
            .map(|b| Agent {
                base: -b.rho_without.ln(),
                options: b
                    .options
                    .iter()
                    .map(|o| Choice {
                        need: o.bundle.iter().map(|(n, k)| (index(n), k)).collect(),
                        size: o.bundle.total(),
                        log_value: -o.rho.ln(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::auction::app::AppSpec;
    use crate::auction::throughput::ThroughputModel;

    fn apps(n: u64, demand: u32) -> Vec<App> {
        (0..n)
            .map(|id| {
                App::new(AppSpec {
                    id,
                    name: "t".into(),
                    demand,
                    total_work: 1000.0 * (id + 1) as f64,
                    model: Arc::new(ThroughputModel::linear(1.0, 0.7)),
                    arrival: 0.0,
                })
            })
            .collect()
    }

    #[test]
    fn round_grants_disjoint_leases_and_leftover_goes_outside() {
        let cfg = ArbiterConfig { fairness_f: 0.5, lease_s: 100.0 };
        let mut arb = Arbiter::new(cfg, &[(0, 4), (1, 4)]).unwrap();
        let apps = apps(6, 4);
        let refs: Vec<&App> = apps.iter().collect();
        let r = arb.round(0.0, &refs);
        assert_eq!(r.offered_to, 3);
        let mut seen = std::collections::HashSet::new();
        for l in &r.grants {
            for g in &l.gpus {
                assert!(seen.insert(*g), "GPU {g:?} granted twice");
            }
        }
        let granted: u32 = r.grants.iter().map(|l| l.gpus.len() as u32).sum();
        assert_eq!(granted + arb.free().total(), 8);
        // Leftover only to apps outside the auction (the 3 best ρ: the shortest jobs, ids 0–2).
        let offered: Vec<AppId> = vec![3, 4, 5];
        assert!(r.leftover_gpus == 0 || r.grants.iter().any(|l| !offered.contains(&l.app)));
        // Expiry: all back, then re-auctioned; the same GPUs to the same app are renewals.
        let r2 = arb.round(100.0, &refs);
        assert_eq!(r2.expired.len(), r.grants.len());
        assert!(r2.grants.iter().any(|l| l.renewal) || r2.grants.is_empty());
    }

    #[test]
    fn a_removed_node_loses_its_leases() {
        let cfg = ArbiterConfig { fairness_f: 0.0, lease_s: 100.0 };
        let mut arb = Arbiter::new(cfg, &[(0, 2), (1, 2)]).unwrap();
        let apps = apps(2, 2);
        let refs: Vec<&App> = apps.iter().collect();
        arb.round(0.0, &refs);
        let revoked = arb.remove_node(1);
        assert!(!revoked.is_empty());
        assert!(arb.leases().iter().all(|l| l.gpus.iter().all(|g| g.node != 1)));
        assert_eq!(arb.gpus(), 2);
        assert!(Arbiter::new(ArbiterConfig { fairness_f: 1.5, lease_s: 1.0 }, &[]).is_err());
    }

    /// The most starved app wins a scarce offer: not withheld to the apps
    /// outside the auction (c_i < ½ once rounded the one GPU away), not lost
    /// to a bidder that waited less (the larger relative gain under Π 1/ρ).
    #[test]
    fn a_scarce_gpu_goes_to_the_most_starved_app() {
        let spec = |id: AppId, arrival: f64| AppSpec {
            id,
            name: "t".into(),
            demand: 1,
            total_work: 100.0,
            model: Arc::new(ThroughputModel::linear(1.0, 0.9)),
            arrival,
        };
        // App 0 has waited 10 000 s for a 100 s job, apps 1–9 for 10 s.
        let apps: Vec<App> = (0..10).map(|id| App::new(spec(id, if id == 0 { 0.0 } else { 9_990.0 }))).collect();
        let refs: Vec<&App> = apps.iter().collect();
        for f in [0.0, 0.5, 0.8] {
            let cfg = ArbiterConfig { fairness_f: f, lease_s: 600.0 };
            let mut arb = Arbiter::new(cfg, &[(0, 1)]).unwrap();
            let r = arb.round(10_000.0, &refs);
            assert_eq!(r.offered_to, 1, "f = {f}: one GPU is offered to one app");
            assert_eq!(r.grants.len(), 1, "f = {f}");
            let l = &r.grants[0];
            assert_eq!(l.app, 0, "f = {f}: the GPU went to app {}", l.app);
            let len = l.expiry - l.start;
            assert!((MIN_LEASE_SHARE * 600.0 - 1e-9..=600.0 + 1e-9).contains(&len), "lease {len} s");
        }
    }

    /// A winner's fraction is a time share of its whole bundle.
    #[test]
    fn fractions_shorten_leases_not_bundles() {
        let cfg = ArbiterConfig { fairness_f: 0.0, lease_s: 1000.0 };
        let mut arb = Arbiter::new(cfg, &[(0, 2)]).unwrap();
        let apps = apps(3, 1);
        let refs: Vec<&App> = apps.iter().collect();
        let r = arb.round(0.0, &refs);
        assert_eq!(r.offered_to, 2);
        let granted: usize = r.grants.iter().map(|l| l.gpus.len()).sum();
        assert_eq!(granted, 2, "no GPU withheld as idle: {:?}", r.grants);
        assert!(r.grants.iter().all(|l| l.expiry - l.start <= 1000.0 + 1e-9));
        let short = r.grants.iter().filter(|l| l.expiry - l.start < 1000.0 - 1e-9).count();
        let withheld = r.withheld_gpu_s;
        assert!(withheld >= 0.0 && (short > 0) == (withheld > 1e-9), "{short} short leases, {withheld} GPU-s withheld");
    }
}
