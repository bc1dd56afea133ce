//! Placement: which cuts carry an active cache, with which predictor, so that
//! the expected latency is lowest within the accuracy and memory budgets.
//!
//! Expected latency per row = Σ stage cost × share of rows reaching the stage
//! + Σ over active cuts of lookup cost × share of rows reaching the cut
//! + the shadow checks' share of the work a hit skipped (they run on the same
//!   executor after the hit is answered, so the next request can wait for them).
//!
//! Thresholds come from [`tune`] on held-out predictions, so the budget is
//! shared by the active cuts only. Greedy forward selection: start with no
//! cache, add (or swap) the (cut, predictor) that lowers the expectation most,
//! stop when nothing lowers it by at least [`MIN_GAIN`]. A cut that does not
//! pay for itself is never switched on; re-planning after every retraining
//! follows hit rates as they drift.

use super::policy::{tune_shared, OFF};

/// Budget shares the first cuts may spend before the last active one (see
/// [`tune_shared`]); every assignment is evaluated with each and keeps the best.
const SHARES: [f32; 3] = [1.0, 0.5, 0.25];

/// Smallest relative improvement of the expected latency worth a change.
pub const MIN_GAIN: f64 = 0.02;

/// One predictor that could serve a cut, judged on held-out rows.
#[derive(Debug, Clone)]
pub struct CutOption {
    /// Held-out (class, confidence) per row.
    pub preds: Vec<(u32, f32)>,
    /// Time to compute the cut's features and consult the cache, µs per row.
    pub lookup_us: f64,
    pub mem_bytes: usize,
}

/// Why a cut is on or off (`gatictl stats`, `gati_cache_cut_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutState {
    /// Answers rows: the plan keeps it.
    Active,
    /// Not trained yet (too few rows in the window for a training that can certify).
    Untrained,
    /// No predictor could be fitted (no features at this cut, or too few rows).
    NoFeatures,
    /// Alone, its held-out predictions certify too few rows within the budget.
    Uncertifiable,
    /// It certifies rows, but alone its lookup costs more than the work its exits skip.
    DoesNotPay,
    /// It would pay alone, but with the chosen cuts it adds less than it costs
    /// (earlier cuts already answer its rows, or they spend the budget).
    NotChosen,
    /// Its cheapest predictor does not fit the memory budget.
    OverMemory,
    /// Switched off in service: shadow checks put live disagreement over budget.
    LiveDisagreement,
}

impl CutState {
    pub const ALL: [CutState; 8] = [
        Self::Active,
        Self::Untrained,
        Self::NoFeatures,
        Self::Uncertifiable,
        Self::DoesNotPay,
        Self::NotChosen,
        Self::OverMemory,
        Self::LiveDisagreement,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Untrained => "untrained",
            Self::NoFeatures => "no_features",
            Self::Uncertifiable => "uncertifiable",
            Self::DoesNotPay => "does_not_pay",
            Self::NotChosen => "not_chosen",
            Self::OverMemory => "over_memory",
            Self::LiveDisagreement => "live_disagreement",
        }
    }
}

/// What the optimizer chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Per cut: the chosen option's index and its threshold.
    pub choice: Vec<Option<(usize, f32)>>,
    /// Expected µs per row with this plan and with no cache at all.
    pub expected_us: f64,
    pub baseline_us: f64,
    /// Expected share of rows answered at each cut (held-out estimate).
    pub exit_share: Vec<f64>,
    /// Why each cut is on or off.
    pub state: Vec<CutState>,
}

/// Inputs every evaluation shares.
pub struct Problem<'a> {
    /// `options[c]`: the predictors that could serve cut `c` (cut 0 = the input,
    /// cut i = the end of stage i).
    pub options: &'a [Vec<CutOption>],
    pub labels: &'a [u32],
    /// Requests each row stands for (see `policy::tune`); empty = 1 each.
    pub weights: &'a [f32],
    /// Cost of stage i+1 (the stage after cut i), µs per row.
    pub stage_us: &'a [f64],
    pub budget: f32,
    pub max_memory_bytes: usize,
    pub shadow_fraction: f64,
    /// A cut must answer at least this many held-out (weighted) rows to be switched on.
    pub min_hits: f32,
}

impl Problem<'_> {
    /// Thresholds and expected µs per row for one assignment of options to
    /// cuts, with the budget share (of [`SHARES`]) that gives the lowest cost.
    fn evaluate(&self, assign: &[Option<usize>]) -> (Vec<f32>, f64, Vec<f64>) {
        let preds: Vec<Vec<(u32, f32)>> = assign
            .iter()
            .enumerate()
            .map(|(c, a)| a.map_or_else(Vec::new, |k| self.options[c][k].preds.clone()))
            .collect();
        let active = assign.iter().filter(|a| a.is_some()).count();
        let shares = if active > 1 { &SHARES[..] } else { &SHARES[..1] };
        let mut best: Option<(Vec<f32>, f64, Vec<f64>)> = None;
        for &share in shares {
            let t = tune_shared(&preds, self.labels, self.weights, self.budget, self.min_hits, share);
            let (cost, exit) = self.cost(assign, &preds, &t);
            if best.as_ref().is_none_or(|b| cost < b.1) {
                best = Some((t, cost, exit));
            }
        }
        best.unwrap_or_default()
    }

    /// Expected µs per row and exit shares of `assign` with `thresholds`.
    #[expect(clippy::needless_range_loop, reason = "r indexes every cut's predictions")]
    fn cost(&self, assign: &[Option<usize>], preds: &[Vec<(u32, f32)>], thresholds: &[f32]) -> (f64, Vec<f64>) {
        let n = self.labels.len();
        let w = |r: usize| f64::from(self.weights.get(r).copied().unwrap_or(1.0));
        let total: f64 = self.stage_us.iter().sum();
        let mut exit = vec![0f64; assign.len()];
        let mut cost = 0.0;
        for r in 0..n {
            let mut spent = 0.0;
            for (c, a) in assign.iter().enumerate() {
                if let Some(k) = a {
                    if thresholds[c] != OFF {
                        spent += self.options[c][*k].lookup_us;
                        if preds[c][r].1 >= thresholds[c] {
                            exit[c] += w(r);
                            let skipped: f64 = self.stage_us[c.min(self.stage_us.len())..].iter().sum();
                            spent += self.shadow_fraction * skipped;
                            break;
                        }
                    }
                }
                spent += self.stage_us.get(c).copied().unwrap_or(0.0);
            }
            cost += spent * w(r);
        }
        let nf: f64 = (0..n).map(w).sum::<f64>().max(f64::MIN_POSITIVE);
        let cost = if n == 0 { total } else { cost / nf };
        (cost, exit.iter().map(|e| e / nf).collect())
    }

    fn memory(&self, assign: &[Option<usize>]) -> usize {
        assign.iter().enumerate().filter_map(|(c, a)| a.map(|k| self.options[c][k].mem_bytes)).sum()
    }
}

/// A candidate assignment with its thresholds, expected µs and exit shares.
type Step = (Vec<Option<usize>>, Vec<f32>, f64, Vec<f64>);

/// Chooses the active cuts, their predictors and thresholds.
pub fn place(p: &Problem<'_>) -> Plan {
    let cuts = p.options.len();
    let baseline: f64 = p.stage_us.iter().sum();
    let mut assign: Vec<Option<usize>> = vec![None; cuts];
    let (mut best_t, mut best_cost, mut best_exit) = (vec![OFF; cuts], baseline, vec![0.0; cuts]);
    loop {
        let mut step: Option<Step> = None;
        for c in 0..cuts {
            for k in 0..p.options[c].len() {
                if assign[c] == Some(k) || p.options[c][k].preds.len() != p.labels.len() {
                    continue;
                }
                let mut next = assign.clone();
                next[c] = Some(k);
                if p.memory(&next) > p.max_memory_bytes {
                    continue;
                }
                let (t, cost, exit) = p.evaluate(&next);
                if t[c] == OFF {
                    continue;
                }
                if step.as_ref().is_none_or(|s| cost < s.2) {
                    step = Some((next, t, cost, exit));
                }
            }
        }
        match step {
            Some((next, t, cost, exit)) if cost < best_cost * (1.0 - MIN_GAIN) => {
                // Cuts the new tuning switched off are dropped from the plan.
                assign = next.iter().zip(&t).map(|(a, &t)| a.filter(|_| t != OFF)).collect();
                (best_t, best_cost, best_exit) = (t, cost, exit);
            }
            _ => break,
        }
    }
    let choice: Vec<Option<(usize, f32)>> = assign.iter().zip(&best_t).map(|(a, &t)| a.map(|k| (k, t))).collect();
    let state = (0..cuts).map(|c| if choice[c].is_some() { CutState::Active } else { p.alone(c, baseline) }).collect();
    Plan { choice, expected_us: best_cost, baseline_us: baseline, exit_share: best_exit, state }
}

impl Problem<'_> {
    /// Why cut `c`, left out of the plan, was left out: how its best option does alone.
    fn alone(&self, c: usize, baseline: f64) -> CutState {
        let usable: Vec<usize> =
            (0..self.options[c].len()).filter(|&k| self.options[c][k].preds.len() == self.labels.len()).collect();
        if usable.is_empty() {
            return CutState::NoFeatures;
        }
        let fits: Vec<usize> =
            usable.into_iter().filter(|&k| self.options[c][k].mem_bytes <= self.max_memory_bytes).collect();
        if fits.is_empty() {
            return CutState::OverMemory;
        }
        let mut state = CutState::Uncertifiable;
        for k in fits {
            let mut assign = vec![None; self.options.len()];
            assign[c] = Some(k);
            let (t, cost, _) = self.evaluate(&assign);
            if t[c] == OFF {
                continue;
            }
            if cost < baseline * (1.0 - MIN_GAIN) {
                return CutState::NotChosen;
            }
            state = CutState::DoesNotPay;
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(preds: Vec<(u32, f32)>, lookup_us: f64) -> CutOption {
        CutOption { preds, lookup_us, mem_bytes: 1000 }
    }

    /// 2000 rows, all label 0; `sure` rows (from the front) predicted right at 0.9,
    /// the rest wrong at 0.1.
    fn cut(sure: usize, lookup_us: f64) -> CutOption {
        option((0..2000).map(|r| if r < sure { (0, 0.9) } else { (1, 0.1) }).collect(), lookup_us)
    }

    #[test]
    fn picks_the_cut_that_saves_most_and_skips_one_that_does_not_pay() {
        let labels = vec![0u32; 2000];
        // Cut 0 answers half the rows before a 100 µs stage; cut 1 answers 1 % of the
        // rest before a 1 µs stage for a 5 µs lookup: not worth it.
        let options = vec![vec![cut(1000, 2.0)], vec![cut(1020, 5.0)], vec![]];
        let stage_us = [100.0, 1.0, 1.0];
        let p = Problem {
            options: &options,
            labels: &labels,
            weights: &[],
            stage_us: &stage_us,
            budget: 0.01,
            max_memory_bytes: 1 << 20,
            shadow_fraction: 0.0,
            min_hits: 1.0,
        };
        let plan = place(&p);
        assert!(plan.choice[0].is_some(), "{plan:?}");
        assert_eq!(plan.choice[1], None, "{plan:?}");
        assert_eq!(plan.state, vec![CutState::Active, CutState::DoesNotPay, CutState::NoFeatures]);
        assert!((plan.baseline_us - 102.0).abs() < 1e-9);
        // Half the rows pay 2 µs; the other half 2 + 102.
        assert!((plan.expected_us - 53.0).abs() < 0.5, "{plan:?}");
        assert!((plan.exit_share[0] - 0.5).abs() < 1e-9);
    }

    #[test]
    fn no_cache_when_lookups_cost_more_than_they_save() {
        let labels = vec![0u32; 2000];
        let options = vec![vec![cut(100, 20.0)]];
        let p = Problem {
            options: &options,
            labels: &labels,
            weights: &[],
            stage_us: &[100.0],
            budget: 0.01,
            max_memory_bytes: 1 << 20,
            shadow_fraction: 0.05,
            min_hits: 1.0,
        };
        let plan = place(&p);
        assert_eq!(plan.choice, vec![None]);
        assert_eq!(plan.expected_us, plan.baseline_us);
        assert_eq!(plan.state, vec![CutState::DoesNotPay]);
        // Nothing sure enough to certify: uncertifiable, whatever it costs.
        let options = vec![vec![option((0..2000).map(|r| (u32::from(r % 2 == 0), 0.5)).collect(), 0.0)]];
        assert_eq!(place(&Problem { options: &options, ..p }).state, vec![CutState::Uncertifiable]);
    }

    #[test]
    fn prefers_the_better_predictor_and_respects_memory() {
        let labels = vec![0u32; 2000];
        let mut big = cut(1800, 3.0);
        big.mem_bytes = 50_000;
        let options = vec![vec![cut(600, 1.0), big]];
        let mut p = Problem {
            options: &options,
            labels: &labels,
            weights: &[],
            stage_us: &[100.0],
            budget: 0.01,
            max_memory_bytes: 1 << 20,
            shadow_fraction: 0.0,
            min_hits: 1.0,
        };
        assert_eq!(place(&p).choice[0].map(|c| c.0), Some(1));
        p.max_memory_bytes = 10_000;
        assert_eq!(place(&p).choice[0].map(|c| c.0), Some(0));
        p.max_memory_bytes = 100;
        assert_eq!(place(&p).state, vec![CutState::OverMemory]);
    }
}
