//! A long-running GPU app (a training job): what it asks for, how far it has
//! got, and its finish-time fairness ρ = T_sh / T_id.
//!
//! - T_sh = elapsed + remaining work / rate under an allocation;
//! - T_id = total work / rate on a 1/N̄ share of the cluster (N̄ = the
//!   contention the app has observed: the time-mean of active apps since it
//!   arrived), capped at its demand, packed if the share fits on one node
//!   (spread otherwise).
//!
//! An app holding no GPUs is priced as if it waited one more lease and then
//! ran on its fair share ([`App::rho_with`] with an empty bundle), so ρ stays
//! finite and grows with its wait.

use std::sync::Arc;

use super::gpu::{Bundle, Placement};
use super::throughput::ThroughputModel;

/// An app's cluster-wide id.
pub type AppId = u64;

/// What a submitted app asks for.
#[derive(Clone, Debug)]
pub struct AppSpec {
    pub id: AppId,
    /// What it is (a job type; informational).
    pub name: String,
    /// The most GPUs it can use.
    pub demand: u32,
    /// Work to do, in the throughput model's units (e.g. training steps).
    pub total_work: f64,
    pub model: Arc<ThroughputModel>,
    /// Submission time, seconds.
    pub arrival: f64,
}

/// An app's progress as the cluster sees it.
#[derive(Clone, Debug)]
pub struct App {
    pub spec: AppSpec,
    done: f64,
    /// ∫ active apps dt since arrival.
    contention_s: f64,
    /// Contention at the last observation (for an app that has not yet seen any time pass).
    contention_now: f64,
    /// GPU-seconds received.
    attained: f64,
    last: f64,
    /// Seconds of running still to spend restarting (checkpoint restore) before progress resumes.
    stall: f64,
}

/// An app's progress as [`App::progress`] saves it and [`App::resume`] restores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Work done.
    pub done: f64,
    /// ∫ active apps dt since arrival.
    pub contention_s: f64,
    /// GPU-seconds received.
    pub attained: f64,
    /// When it was last advanced (seconds on the arbiter's clock).
    pub last: f64,
    /// Active apps at the last observation (used while no time has passed;
    /// absent in records of older versions: 1).
    #[serde(default = "one")]
    pub contention_now: f64,
}

fn one() -> f64 {
    1.0
}

/// What [`App::rho_with`] needs about the cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterView {
    pub now: f64,
    /// GPUs in the cluster.
    pub gpus: u32,
    /// GPUs of the largest node: a fair share above it cannot be packed.
    pub node_gpus: u32,
    /// Lease length, seconds (the wait priced into an app with no GPUs).
    pub lease_s: f64,
}

impl ClusterView {
    /// The best placement a share of `gpus` GPUs can have.
    pub fn ideal_placement(&self, gpus: f64) -> Placement {
        if gpus > f64::from(self.node_gpus) {
            Placement::Spread
        } else {
            Placement::Packed
        }
    }
}

impl App {
    pub fn new(spec: AppSpec) -> App {
        let last = spec.arrival;
        App { spec, done: 0.0, contention_s: 0.0, contention_now: 1.0, attained: 0.0, last, stall: 0.0 }
    }

    /// Runs the app from its last observation to `now` on `held`, with
    /// `active` apps contending; returns the time it finished, if it did.
    /// A pending restart ([`App::restart`]) is spent first, holding the GPUs
    /// without progress.
    pub fn advance(&mut self, now: f64, held: &Bundle, active: usize) -> Option<f64> {
        let dt = (now - self.last).max(0.0);
        self.contention_now = active.max(1) as f64;
        let rate = self.rate(held);
        let stalled = if rate > 0.0 { self.stall.min(dt) } else { 0.0 };
        self.stall = if rate > 0.0 { self.stall - stalled } else { 0.0 };
        let (start, dt_run) = (self.last + stalled, dt - stalled);
        let left = self.remaining();
        // (A relative tolerance: the simulator steps to a completion time computed from this rate.)
        let (run, finished) = if rate > 0.0 && left <= rate * dt_run * (1.0 + 1e-9) + 1e-9 {
            (stalled + left / rate, Some(start + left / rate))
        } else {
            (dt, None)
        };
        self.done = if finished.is_some() { self.spec.total_work } else { self.done + rate * dt_run };
        self.attained += f64::from(held.total()) * run;
        self.contention_s += self.contention_now * dt;
        self.last = now;
        finished
    }

    /// What the app has done so far, to be carried over to another arbiter.
    pub fn progress(&self) -> Progress {
        Progress {
            done: self.done,
            contention_s: self.contention_s,
            attained: self.attained,
            last: self.last,
            contention_now: self.contention_now,
        }
    }

    /// An app resumed at `p` (failover: a new arbiter continues from the
    /// last progress the old one stored).
    pub fn resume(spec: AppSpec, p: Progress) -> App {
        let mut a = App::new(spec);
        a.done = p.done.clamp(0.0, a.spec.total_work);
        a.contention_s = p.contention_s.max(0.0);
        a.attained = p.attained.max(0.0);
        a.last = p.last.max(a.spec.arrival);
        a.contention_now = if p.contention_now.is_finite() { p.contention_now.max(1.0) } else { 1.0 };
        a
    }

    /// The app's GPUs changed: it spends `seconds` restarting from its
    /// checkpoint before it progresses again (the simulator's preemption cost).
    pub fn restart(&mut self, seconds: f64) {
        self.stall = seconds.max(0.0);
    }

    /// Seconds of restart still to spend.
    pub fn pending_restart(&self) -> f64 {
        self.stall
    }

    /// Work per second on `b`.
    pub fn rate(&self, b: &Bundle) -> f64 {
        self.spec.model.rate(f64::from(b.total().min(self.spec.demand)), b.placement())
    }

    pub fn remaining(&self) -> f64 {
        (self.spec.total_work - self.done).max(0.0)
    }

    pub fn is_done(&self) -> bool {
        self.remaining() <= 0.0
    }

    /// GPU-seconds received so far (least-attained-service priority).
    pub fn attained(&self) -> f64 {
        self.attained
    }

    /// Mean contention observed since arrival.
    pub fn contention(&self, now: f64) -> f64 {
        let elapsed = now - self.spec.arrival;
        if elapsed > 0.0 && self.contention_s > 0.0 {
            self.contention_s / elapsed
        } else {
            self.contention_now
        }
    }

    /// GPUs of the 1/N̄ share, capped at demand.
    pub fn fair_share(&self, c: &ClusterView) -> f64 {
        (f64::from(c.gpus) / self.contention(c.now)).min(f64::from(self.spec.demand))
    }

    /// Work per second on the fair share, placed as well as such a share can be.
    fn fair_rate(&self, c: &ClusterView) -> f64 {
        let share = self.fair_share(c);
        self.spec.model.rate(share, c.ideal_placement(share)).max(1e-12)
    }

    /// T_id: the whole job on its fair share.
    pub fn t_id(&self, c: &ClusterView) -> f64 {
        self.spec.total_work / self.fair_rate(c)
    }

    /// ρ if the app runs on `b` from now on (empty: waits one lease, then its fair share).
    pub fn rho_with(&self, b: &Bundle, c: &ClusterView) -> f64 {
        let elapsed = (c.now - self.spec.arrival).max(0.0);
        let t_sh = if b.is_empty() {
            elapsed + c.lease_s + self.remaining() / self.fair_rate(c)
        } else {
            elapsed + self.remaining() / self.rate(b).max(1e-12)
        };
        t_sh / self.t_id(c)
    }

    /// ρ of a finished app: its completion time over T_id.
    pub fn final_rho(&self, finished: f64, cluster_gpus: u32, node_gpus: u32) -> f64 {
        let c = ClusterView { now: finished, gpus: cluster_gpus, node_gpus, lease_s: 0.0 };
        (finished - self.spec.arrival) / self.t_id(&c).max(1e-12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(demand: u32, work: f64) -> App {
        App::new(AppSpec {
            id: 1,
            name: "t".into(),
            demand,
            total_work: work,
            model: Arc::new(ThroughputModel::linear(1.0, 0.5)),
            arrival: 0.0,
        })
    }

    #[test]
    fn rho_is_one_on_the_fair_share_from_the_start() {
        let a = app(4, 100.0);
        let c = ClusterView { now: 0.0, gpus: 4, node_gpus: 4, lease_s: 10.0 };
        assert!((a.rho_with(&Bundle::on(0, 4), &c) - 1.0).abs() < 1e-9);
        assert!((a.rho_with(&Bundle::on(0, 2), &c) - 2.0).abs() < 1e-9);
        // Spread runs at half speed in this model: twice as long.
        let spread = Bundle::on(0, 2).union(&Bundle::on(1, 2));
        assert!((a.rho_with(&spread, &c) - 2.0).abs() < 1e-9);
        assert!(a.rho_with(&Bundle::default(), &c) > 1.0);
    }

    #[test]
    fn advance_finishes_and_counts_service() {
        let mut a = app(2, 10.0);
        assert_eq!(a.advance(4.0, &Bundle::on(0, 2), 1), None);
        assert_eq!(a.advance(10.0, &Bundle::on(0, 2), 1), Some(5.0));
        assert!(a.is_done());
        assert!((a.attained() - 10.0).abs() < 1e-9);
        // A restart holds the GPUs 3 s without progress.
        let mut b = app(2, 10.0);
        b.restart(3.0);
        assert_eq!(b.advance(10.0, &Bundle::on(0, 2), 1), Some(8.0));
    }
}
