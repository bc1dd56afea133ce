//! Allocation policies compared by the simulator, all over the same apps:
//!
//! - `themis(f)`: the daemon's [`Arbiter`] (leases, PA auctions, leftover);
//! - `fairshare`: instantaneous max-min fair share — every round, GPUs are
//!   water-filled over the active apps (capped at demand; when apps outnumber
//!   GPUs, those served least recently go first, a round-robin time share);
//! - `tiresias`: Tiresias-style discretised least attained service — queues
//!   by GPU-seconds received (< 1 GPU-hour, < 10 GPU-hours, more), FIFO in a
//!   queue, gang (whole demand or nothing), preemptive every round;
//! - `gandiva`: Gandiva-style greedy packing — FIFO, gang, packed on one node
//!   when a node has room, else spread; never preempted (no time-slicing or
//!   migration modelled);
//! - `gavel_ftf`: Gavel's finish-time-fairness objective, greedily — each
//!   GPU in turn to the app with the worst ρ at its current count (elastic).
//!
//! Baselines place counts packed where they can ([`place`]).

use std::collections::{BTreeMap, HashMap};

use crate::auction::app::{App, AppId, ClusterView};
use crate::auction::arbiter::{Arbiter, ArbiterConfig};
use crate::auction::gpu::{Bundle, Pool};

use super::SimConfig;

/// A scheduling policy in the simulator.
pub trait Policy {
    fn name(&self) -> String;
    /// Decides the allocation until the next round (`alloc`: app → GPUs, updated in place).
    fn allocate(&mut self, now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>);
    /// `app` finished.
    fn release(&mut self, _app: AppId) {}
    /// When the policy next wants a round regardless of arrivals and completions.
    fn next_event(&self) -> Option<f64> {
        None
    }
}

/// Themis: the arbiter, one round per simulator round.
pub struct Themis {
    arbiter: Arbiter,
    pub round_ms: Vec<f64>,
}

impl Themis {
    pub fn new(cfg: &SimConfig, arbiter: ArbiterConfig) -> Result<Themis, crate::auction::AuctionError> {
        Ok(Themis { arbiter: Arbiter::new(arbiter, &cfg.node_list())?, round_ms: Vec::new() })
    }
}

impl Policy for Themis {
    fn name(&self) -> String {
        format!("themis_f{:.2}", self.arbiter.config().fairness_f)
    }

    fn allocate(&mut self, now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>) {
        let r = self.arbiter.round(now, apps);
        self.round_ms.push(r.elapsed_ms);
        alloc.clear();
        for a in apps {
            let held = self.arbiter.leases().held(a.spec.id);
            if !held.is_empty() {
                alloc.insert(a.spec.id, held);
            }
        }
    }

    fn release(&mut self, app: AppId) {
        self.arbiter.release_app(app);
    }

    fn next_event(&self) -> Option<f64> {
        self.arbiter.leases().next_expiry()
    }
}

/// Places GPU counts (largest first), each next to its previous GPUs where it can.
pub fn place(counts: &[(AppId, u32)], cfg: &SimConfig, prev: &HashMap<AppId, Bundle>) -> HashMap<AppId, Bundle> {
    let mut pool = Pool::with_nodes(&cfg.node_list());
    let mut order: Vec<(AppId, u32)> = counts.iter().copied().filter(|c| c.1 > 0).collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let empty = Bundle::default();
    let mut out = HashMap::new();
    for (app, k) in order {
        let before = prev.get(&app).unwrap_or(&empty);
        let b =
            if before.total() == k && pool.fits(before) { Some(before.clone()) } else { pool.best_bundle(k, before) };
        if let Some(b) = b {
            pool.take(&b);
            out.insert(app, b);
        }
    }
    out
}

/// Instantaneous max-min fair share.
#[derive(Default)]
pub struct FairShare {
    cfg: Option<SimConfig>,
    last_served: HashMap<AppId, u64>,
    round: u64,
}

impl FairShare {
    pub fn new(cfg: &SimConfig) -> FairShare {
        FairShare { cfg: Some(*cfg), ..FairShare::default() }
    }
}

impl Policy for FairShare {
    fn name(&self) -> String {
        "fairshare".into()
    }

    fn allocate(&mut self, _now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>) {
        let Some(cfg) = self.cfg else { return };
        self.round += 1;
        // Least recently served first (then id): the round-robin order for the last GPUs.
        let mut order: Vec<&App> = apps.to_vec();
        order.sort_by_key(|a| (self.last_served.get(&a.spec.id).copied().unwrap_or(0), a.spec.id));
        let mut counts: Vec<(AppId, u32)> = order.iter().map(|a| (a.spec.id, 0)).collect();
        let mut left = cfg.gpus();
        // Water-filling one GPU at a time in that order, passes until no one can take more.
        loop {
            let mut gave = false;
            for (i, a) in order.iter().enumerate() {
                if left == 0 {
                    break;
                }
                if counts[i].1 < a.spec.demand {
                    counts[i].1 += 1;
                    left -= 1;
                    gave = true;
                }
            }
            if !gave || left == 0 {
                break;
            }
        }
        for &(id, k) in &counts {
            if k > 0 {
                self.last_served.insert(id, self.round);
            }
        }
        *alloc = place(&counts, &cfg, alloc);
    }

    fn release(&mut self, app: AppId) {
        self.last_served.remove(&app);
    }
}

/// Tiresias-style discretised least attained service (gang, preemptive).
pub struct Tiresias {
    cfg: SimConfig,
    /// Queue thresholds, GPU-seconds attained.
    pub thresholds: Vec<f64>,
}

impl Tiresias {
    pub fn new(cfg: &SimConfig) -> Tiresias {
        Tiresias { cfg: *cfg, thresholds: vec![3600.0, 36_000.0] }
    }
}

impl Policy for Tiresias {
    fn name(&self) -> String {
        "tiresias".into()
    }

    fn allocate(&mut self, _now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>) {
        let queue = |a: &App| self.thresholds.iter().filter(|&&t| a.attained() >= t).count();
        let mut order: Vec<&App> = apps.to_vec();
        order.sort_by(|x, y| {
            queue(x).cmp(&queue(y)).then(x.spec.arrival.total_cmp(&y.spec.arrival)).then(x.spec.id.cmp(&y.spec.id))
        });
        let mut left = self.cfg.gpus();
        let mut counts = Vec::new();
        for a in order {
            if a.spec.demand <= left {
                counts.push((a.spec.id, a.spec.demand));
                left -= a.spec.demand;
            }
        }
        *alloc = place(&counts, &self.cfg, alloc);
    }
}

/// Gandiva-style greedy packing (FIFO, gang, non-preemptive).
pub struct Gandiva {
    cfg: SimConfig,
    running: BTreeMap<AppId, Bundle>,
}

impl Gandiva {
    pub fn new(cfg: &SimConfig) -> Gandiva {
        Gandiva { cfg: *cfg, running: BTreeMap::new() }
    }
}

impl Policy for Gandiva {
    fn name(&self) -> String {
        "gandiva".into()
    }

    fn allocate(&mut self, _now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>) {
        let mut pool = Pool::with_nodes(&self.cfg.node_list());
        for b in self.running.values() {
            pool.take(b);
        }
        let mut waiting: Vec<&App> = apps.iter().copied().filter(|a| !self.running.contains_key(&a.spec.id)).collect();
        waiting.sort_by(|x, y| x.spec.arrival.total_cmp(&y.spec.arrival).then(x.spec.id.cmp(&y.spec.id)));
        for a in waiting {
            if let Some(b) = pool.best_bundle(a.spec.demand, &Bundle::default()) {
                pool.take(&b);
                self.running.insert(a.spec.id, b);
            }
        }
        alloc.clear();
        alloc.extend(self.running.iter().map(|(k, v)| (*k, v.clone())));
    }

    fn release(&mut self, app: AppId) {
        self.running.remove(&app);
    }
}

/// Gavel's finish-time-fairness objective, greedy min-max ρ (elastic).
pub struct GavelFtf {
    cfg: SimConfig,
    lease_s: f64,
}

impl GavelFtf {
    pub fn new(cfg: &SimConfig, lease_s: f64) -> GavelFtf {
        GavelFtf { cfg: *cfg, lease_s }
    }
}

impl Policy for GavelFtf {
    fn name(&self) -> String {
        "gavel_ftf".into()
    }

    fn allocate(&mut self, now: f64, apps: &[&App], alloc: &mut HashMap<AppId, Bundle>) {
        let view = ClusterView { now, gpus: self.cfg.gpus(), node_gpus: self.cfg.gpus_per_node, lease_s: self.lease_s };
        // ρ at a count, placed as well as a count can be (packed within a node).
        let per_node = self.cfg.gpus_per_node.max(1);
        let at = |k: u32| -> Bundle {
            let mut b = Bundle::default();
            for n in 0..k.div_ceil(per_node) {
                b.add(n, per_node.min(k - n * per_node));
            }
            b
        };
        let rho_at = |a: &App, k: u32| a.rho_with(&at(k), &view);
        let mut counts: Vec<(AppId, u32)> = apps.iter().map(|a| (a.spec.id, 0)).collect();
        // Max-heap on ρ at the current count (bits of a positive f64 order like the value).
        let mut heap: std::collections::BinaryHeap<(u64, usize)> =
            apps.iter().enumerate().map(|(i, a)| (rho_at(a, 0).to_bits(), i)).collect();
        let mut left = self.cfg.gpus();
        while left > 0 {
            let Some((_, i)) = heap.pop() else { break };
            counts[i].1 += 1;
            left -= 1;
            if counts[i].1 < apps[i].spec.demand {
                heap.push((rho_at(apps[i], counts[i].1).to_bits(), i));
            }
        }
        *alloc = place(&counts, &self.cfg, alloc);
    }
}
