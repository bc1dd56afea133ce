//! Live judgement of the caches: shadow checks of served hits, the probation
//! of caches nothing live has judged yet, the live disagreement estimate, and
//! the switch-off of a cut that runs over budget.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ModelCaches;
use crate::cache::placement::CutState;

/// Hits withheld after the first training and after caches were trained on
/// rows that were not live traffic (calibration rows, a restored state, a
/// retraining forced by over-budget mismatches): the full model answers them
/// and judges what the cache would have said, before any cache answer goes
/// out. Live traffic can differ from what the caches were certified on; a
/// cut that is wrong there is switched off on its probes, never served.
/// Measured on the second half of vtest after a warm start on the first: 5 %
/// shadow checks let a drifted cut answer hundreds of rows (1.5 %
/// disagreement); checking every hit (answered) still served the 9 wrong
/// hits it took the dilute live estimate to switch the cut off (2.3 %).
pub const PROBATION_HITS: u64 = 32;

/// Share of batches that still go through the cache path (features pooled at
/// every cut, rows recorded in the window) while a training has left every
/// cut off: the rest run the plain pipeline, so caches that cannot pay cost
/// a quarter of their feature work (measured on the Fashion-MNIST ResNet,
/// ~0.35 ms a request: the full cache path cost 9 % with nothing active),
/// and the window still refills for the next training, 4× slower.
pub const IDLE_RECORD_SHARE: f64 = 0.25;

impl ModelCaches {
    /// Whether a batch can skip the cache path: a training has left every cut
    /// off, the batch has no calibration rows, and `draw` (uniform in [0, 1))
    /// falls outside [`IDLE_RECORD_SHARE`]. Before the first training every
    /// batch is recorded (the window must fill to certify anything).
    pub fn idle_skip(&self, calibrating: bool, draw: f64) -> bool {
        if calibrating || draw < IDLE_RECORD_SHARE {
            return false;
        }
        let active = self.active();
        active.plan.is_some() && active.cuts.iter().all(Option::is_none)
    }

    /// Bookkeeping for a batch that skipped the cache path: rows counted, the
    /// full model's answers remembered for the stream prior.
    pub fn idle_served(&self, rows: u64, answers: impl IntoIterator<Item = (u64, u32)>) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        if self.config.stream_prior {
            self.remember(answers);
        }
    }
    /// Whether the hit about to be answered is one of the [`PROBATION_HITS`]
    /// withheld (counts it).
    pub fn on_probation(&self) -> bool {
        self.probation.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    /// Starts a probation: the next [`PROBATION_HITS`] hits are withheld, and
    /// the live counters start over, so the live estimate judges these caches
    /// on their own probes (counted since long before, their hit rate would be
    /// diluted and a cut wrong on every probe could stay on).
    pub(super) fn start_probation(&self) {
        self.rows.store(0, Ordering::Relaxed);
        for s in &self.stats {
            s.hits.store(0, Ordering::Relaxed);
            s.shadow_checks.store(0, Ordering::Relaxed);
            s.shadow_mismatches.store(0, Ordering::Relaxed);
        }
        self.probation.store(PROBATION_HITS, Ordering::Relaxed);
    }

    /// A shadow-checked hit at `cut` said `cached`; the full model said `full`.
    /// A mismatch that puts the live disagreement over budget switches that cut
    /// off at once and asks for a retraining.
    pub fn shadow(&self, cut: usize, cached: u32, full: u32) {
        let s = &self.stats[cut];
        s.shadow_checks.fetch_add(1, Ordering::Relaxed);
        if cached == full {
            return;
        }
        s.shadow_mismatches.fetch_add(1, Ordering::Relaxed);
        // An ~80 % lower bound, not the point estimate: one unlucky mismatch among
        // few checks must not switch off a cut the held-out data certified, while
        // a cache that is wrong on every check (a class it never saw) goes at once.
        if self.live_estimate(0.84) > self.config.budget {
            // Over budget: this cut stops answering now (its confidences cannot be
            // trusted — a cache that never saw a new class can be sure and wrong)
            // and the trainer refits on the traffic that proved it wrong.
            let mut guard = self.active.write().unwrap_or_else(|p| p.into_inner());
            let mut next = (**guard).clone();
            if next.cuts.get_mut(cut).and_then(Option::take).is_some() {
                tracing::info!(model = %self.name, cut, live = self.live_disagreement(), "live disagreement over budget: cut switched off until the next training");
                crate::telemetry::cache_cut_state(&self.name, cut, CutState::LiveDisagreement, 0.0);
            }
            let old = std::mem::replace(&mut *guard, Arc::new(next));
            drop(guard);
            self.offered.lock().unwrap_or_else(|p| p.into_inner()).retired.push(old);
            self.train_now();
        }
    }

    /// Estimated fraction of rows answered differently from the full model:
    /// Σ over cuts of hit rate × shadow mismatch rate.
    pub fn live_disagreement(&self) -> f32 {
        self.live_estimate(0.0)
    }

    /// Σ over cuts of hit rate × a bound on the shadow mismatch rate: the
    /// mismatches counted as m − z·√m (z = 0: the point estimate).
    pub(super) fn live_estimate(&self, z: f32) -> f32 {
        let rows = self.rows.load(Ordering::Relaxed).max(1) as f32;
        self.stats
            .iter()
            .map(|s| {
                let checks = s.shadow_checks.load(Ordering::Relaxed);
                if checks == 0 {
                    return 0.0;
                }
                let m = s.shadow_mismatches.load(Ordering::Relaxed) as f32;
                let rate = (m - z * m.sqrt()).max(0.0) / checks as f32;
                s.hits.load(Ordering::Relaxed) as f32 / rows * rate
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::model_caches::Active;
    use crate::cache::placement::Plan;

    #[test]
    fn only_a_training_that_left_every_cut_off_lets_batches_skip_the_cache_path() {
        let config: crate::config::CacheConfig = toml::from_str("kind = \"learned\"").unwrap();
        let c = ModelCaches::start(config, 3, 10, "m", Box::new(|| vec![1.0; 3]), 0).unwrap();
        assert!(!c.idle_skip(false, 0.99), "before the first training every batch is recorded");
        let plan = Plan {
            choice: vec![None; 3],
            expected_us: 3.0,
            baseline_us: 3.0,
            exit_share: vec![0.0; 3],
            state: vec![CutState::Uncertifiable; 3],
        };
        c.install(Active { cuts: vec![None; 3], generation: 1, plan: Some(plan) });
        assert!(c.idle_skip(false, 0.99), "every cut off: most batches skip");
        assert!(!c.idle_skip(false, IDLE_RECORD_SHARE / 2.0), "a share is still recorded");
        assert!(!c.idle_skip(true, 0.99), "calibration rows always feed the window");
        let rows = c.rows.load(Ordering::Relaxed);
        c.idle_served(4, [(7, 3)]);
        assert_eq!(c.rows.load(Ordering::Relaxed), rows + 4);
        assert_eq!(c.priors(&[7]), vec![Some(3)], "the stream prior follows skipped batches");
    }
}
