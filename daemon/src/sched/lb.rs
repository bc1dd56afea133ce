//! The load balancer: which SGSs serve each DAG, scaled out and in on slack
//! and queueing signals with hysteresis.
//!
//! Every `period` (1 s) [`Lb::rebalance`] sums each DAG's counters over the
//! SGSs serving it and takes the period's deltas:
//! - miss rate = requests answered `DeadlineMissed` / requests finished;
//! - queue share = mean ready → dispatch delay of its functions / the DAG's deadline.
//!
//! A period is *hot* when miss rate > `out_miss_rate` or queue share >
//! `out_queue_share`; *cold* when nothing missed and queue share <
//! `in_queue_share`; else neutral. `out_periods` hot periods in a row add an
//! SGS (the one serving the fewest DAGs), up to `max_sgs`; `in_periods` cold
//! periods in a row remove the most recently added one, down to `min_sgs`.
//! Any change resets both streaks, so a change is followed by at least
//! `out_periods` periods of observation. Routes (equal weights) are published
//! through the [`RouteTable`] after every change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dag::Dag;
use super::function::Deployment;
use super::route::{Route, RouteTable, SgsIndex};
use super::signals::{DagSample, SgsStats};

/// Thresholds of the scaling rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbPolicy {
    pub period: Duration,
    pub out_miss_rate: f64,
    pub out_queue_share: f64,
    pub out_periods: u32,
    pub in_queue_share: f64,
    pub in_periods: u32,
}

impl Default for LbPolicy {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(1),
            out_miss_rate: 0.02,
            out_queue_share: 0.2,
            out_periods: 2,
            in_queue_share: 0.02,
            in_periods: 5,
        }
    }
}

/// A scaling decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Out { dag: usize, sgs: SgsIndex },
    In { dag: usize, sgs: SgsIndex },
}

#[derive(Debug)]
struct DagRoutes {
    id: u32,
    min: usize,
    max: usize,
    /// Serving SGSs in the order they were added.
    sgs: Vec<SgsIndex>,
    hot: u32,
    cold: u32,
    deadline: Duration,
    /// Counters at the last rebalance, per SGS.
    last: Vec<DagSample>,
}

#[derive(Debug)]
struct State {
    dags: Vec<DagRoutes>,
    last_run: Option<Instant>,
}

/// DAG → SGS routing and its scaling.
pub struct Lb {
    table: Arc<dyn RouteTable>,
    policy: LbPolicy,
    sgs_count: usize,
    state: Mutex<State>,
    counter: AtomicU64,
}

impl Lb {
    /// Gives each DAG its `min_sgs` SGSs (spread: DAG i starts at SGS i) and publishes them.
    pub fn new(dep: &Deployment, sgs_count: usize, table: Arc<dyn RouteTable>, policy: LbPolicy) -> Self {
        let n = sgs_count.max(1);
        let dags = dep
            .dags
            .iter()
            .map(|d| DagRoutes {
                id: d.id,
                min: d.min_sgs.min(n),
                max: d.max_sgs.min(n),
                sgs: (0..d.min_sgs.min(n)).map(|k| (d.index + k) % n).collect(),
                hot: 0,
                cold: 0,
                deadline: d.deadline,
                last: vec![DagSample::default(); n],
            })
            .collect();
        let lb = Self {
            table,
            policy,
            sgs_count: n,
            state: Mutex::new(State { dags, last_run: None }),
            counter: AtomicU64::new(0),
        };
        for d in &lb.lock().dags {
            lb.publish(d);
        }
        lb
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, d: &DagRoutes) {
        let routes: Vec<Route> = d.sgs.iter().map(|&sgs| Route { sgs, weight: 1 }).collect();
        self.table.publish(d.id, &routes);
    }

    /// The SGS for the next request of `dag`.
    pub fn route(&self, dag: &Dag) -> SgsIndex {
        let key = self.counter.fetch_add(1, Ordering::Relaxed);
        self.table.lookup(dag.id, key).filter(|&s| s < self.sgs_count).unwrap_or(dag.index % self.sgs_count)
    }

    /// SGSs serving DAG `index`, in the order they were added.
    pub fn routes(&self, index: usize) -> Vec<SgsIndex> {
        self.lock().dags.get(index).map(|d| d.sgs.clone()).unwrap_or_default()
    }

    /// Which route table implementation is active.
    pub fn table_kind(&self) -> &'static str {
        self.table.kind()
    }

    pub fn policy(&self) -> &LbPolicy {
        &self.policy
    }

    /// Reads every SGS's counters and scales. Call once per `policy.period`;
    /// calls closer than half a period to the previous one are ignored.
    pub fn rebalance(&self, now: Instant, stats: &[Arc<SgsStats>]) -> Vec<Scale> {
        let mut st = self.lock();
        if st.last_run.is_some_and(|t| now.saturating_duration_since(t) < self.policy.period / 2) {
            return Vec::new();
        }
        st.last_run = Some(now);
        let mut changes = Vec::new();
        for di in 0..st.dags.len() {
            let mut period = DagSample::default();
            for (k, s) in stats.iter().enumerate().take(self.sgs_count) {
                let Some(c) = s.dags.get(di) else { continue };
                let cur = c.sample();
                period.add(&cur.since(&st.dags[di].last[k]));
                st.dags[di].last[k] = cur;
            }
            let load = assign_load(&st.dags);
            let d = &mut st.dags[di];
            let Some(change) = decide(&self.policy, d, &period, &load, di) else { continue };
            self.publish(d);
            tracing::info!(dag = di, ?change, sgs = ?d.sgs, "LB rescaled");
            changes.push(change);
        }
        changes
    }
}

/// DAGs served per SGS.
fn assign_load(dags: &[DagRoutes]) -> Vec<usize> {
    let n = dags.first().map_or(0, |d| d.last.len());
    let mut load = vec![0; n];
    for d in dags {
        for &s in &d.sgs {
            if let Some(l) = load.get_mut(s) {
                *l += 1;
            }
        }
    }
    load
}

/// Updates streaks from one period and applies the rule (see the module docs).
fn decide(p: &LbPolicy, d: &mut DagRoutes, s: &DagSample, load: &[usize], di: usize) -> Option<Scale> {
    let finished = s.answered + s.missed + s.failed;
    let miss = if finished == 0 { 0.0 } else { s.missed as f64 / finished as f64 };
    let queue = if s.dispatched == 0 || d.deadline.is_zero() {
        0.0
    } else {
        s.queue_ns as f64 / s.dispatched as f64 / d.deadline.as_nanos() as f64
    };
    let hot = miss > p.out_miss_rate || queue > p.out_queue_share;
    let cold = s.missed == 0 && queue < p.in_queue_share;
    (d.hot, d.cold) = (if hot { d.hot + 1 } else { 0 }, if cold { d.cold + 1 } else { 0 });
    if d.hot >= p.out_periods && d.sgs.len() < d.max {
        let pick = (0..load.len()).filter(|k| !d.sgs.contains(k)).min_by_key(|&k| (load[k], k))?;
        d.sgs.push(pick);
        (d.hot, d.cold) = (0, 0);
        return Some(Scale::Out { dag: di, sgs: pick });
    }
    if d.cold >= p.in_periods && d.sgs.len() > d.min {
        let gone = d.sgs.pop()?;
        (d.hot, d.cold) = (0, 0);
        return Some(Scale::In { dag: di, sgs: gone });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::route::UserRouteTable;
    use crate::sched::signals::bump;

    fn setup(max_sgs: usize) -> (Deployment, Arc<UserRouteTable>, Vec<Arc<SgsStats>>) {
        let dag = Dag::new("d", 0, Duration::from_millis(100), vec![0], &[], (1, max_sgs)).unwrap();
        let dep = Deployment::new(Vec::new(), vec![Arc::new(dag)]);
        let stats = (0..3).map(|_| Arc::new(SgsStats::new(1))).collect();
        (dep, Arc::new(UserRouteTable::default()), stats)
    }

    /// One period of traffic on SGS `k`: `n` finished, `missed` of them late,
    /// functions queued `queue_ms` on average.
    fn period(stats: &[Arc<SgsStats>], k: usize, n: u64, missed: u64, queue_ms: u64) {
        let c = &stats[k].dags[0];
        bump(&c.answered, n - missed);
        bump(&c.missed, missed);
        bump(&c.dispatched, n);
        bump(&c.queue_ns, n * queue_ms * 1_000_000);
    }

    #[test]
    fn scales_out_after_two_hot_periods_and_in_after_five_cold() {
        let (dep, table, stats) = setup(3);
        let lb = Lb::new(&dep, 3, table.clone(), LbPolicy::default());
        let dag = &dep.dags[0];
        assert_eq!(lb.routes(0), vec![0]);
        assert_eq!(lb.route(dag), 0);
        let mut t = Instant::now();
        let mut tick = |lb: &Lb| {
            t += Duration::from_secs(1);
            lb.rebalance(t, &stats)
        };

        // Hot (10 % missed): the first period only starts the streak.
        period(&stats, 0, 100, 10, 1);
        assert!(tick(&lb).is_empty());
        period(&stats, 0, 100, 10, 1);
        assert_eq!(tick(&lb), vec![Scale::Out { dag: 0, sgs: 1 }]);
        assert_eq!(lb.routes(0), vec![0, 1]);
        let spread: std::collections::HashSet<_> = (0..4).map(|_| lb.route(dag)).collect();
        assert_eq!(spread.len(), 2, "requests now go to both SGSs");

        // Queueing alone (30 ms of a 100 ms deadline) is also hot.
        period(&stats, 0, 50, 0, 30);
        period(&stats, 1, 50, 0, 30);
        assert!(tick(&lb).is_empty());
        period(&stats, 0, 50, 0, 30);
        assert_eq!(tick(&lb), vec![Scale::Out { dag: 0, sgs: 2 }]);
        // At max_sgs hot periods change nothing.
        for _ in 0..3 {
            period(&stats, 2, 50, 10, 1);
            assert!(tick(&lb).is_empty());
        }

        // Neutral periods (some queueing, no misses) break a cold streak.
        for i in 0..4 {
            period(&stats, 0, 50, 0, 1);
            assert!(tick(&lb).is_empty(), "cold period {i}");
        }
        period(&stats, 0, 50, 0, 5);
        assert!(tick(&lb).is_empty(), "neutral period resets the streak");
        for _ in 0..4 {
            period(&stats, 0, 50, 0, 0);
            assert!(tick(&lb).is_empty());
        }
        // Idle periods are cold too: the fifth cold one in a row scales in.
        assert_eq!(tick(&lb), vec![Scale::In { dag: 0, sgs: 2 }]);
        for _ in 0..4 {
            assert!(tick(&lb).is_empty());
        }
        assert_eq!(tick(&lb), vec![Scale::In { dag: 0, sgs: 1 }]);
        for _ in 0..10 {
            assert!(tick(&lb).is_empty(), "never below min_sgs");
        }
        assert_eq!(lb.routes(0), vec![0]);
        assert_eq!(table.lookup(dag.id, 5), Some(0), "routes published to the table");
    }

    #[test]
    fn calls_within_half_a_period_are_ignored() {
        let (dep, table, stats) = setup(2);
        let lb = Lb::new(&dep, 2, table, LbPolicy::default());
        let t = Instant::now();
        period(&stats, 0, 10, 10, 0);
        assert!(lb.rebalance(t, &stats).is_empty());
        period(&stats, 0, 10, 10, 0);
        assert!(lb.rebalance(t + Duration::from_millis(100), &stats).is_empty(), "too soon: not a period");
        assert_eq!(lb.rebalance(t + Duration::from_secs(1), &stats).len(), 1);
    }
}
