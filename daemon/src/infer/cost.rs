//! Per-stage cost model: measured at load, corrected online.
//!
//! cost(stage, rows) = scale × (fixed + rows × per_row). `fixed` and `per_row`
//! come from timing batch 1 and batch B at load; `scale` is an EWMA of
//! observed / predicted, so drift (other load, thermal) is tracked cheaply.
//! Shared between the batcher (writer) and admission control (readers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Cost of one stage.
#[derive(Debug)]
pub struct StageCost {
    fixed_ns: f64,
    per_row_ns: f64,
    scale: AtomicU64,
}

impl StageCost {
    /// From measured times of a 1-row and a `rows`-row batch.
    pub fn from_measurements(t1: Duration, rows: usize, tn: Duration) -> Self {
        let (t1, tn) = (t1.as_nanos() as f64, tn.as_nanos() as f64);
        let per_row = if rows > 1 { ((tn - t1) / (rows - 1) as f64).max(0.0) } else { t1 };
        let fixed = (t1 - per_row).max(0.0);
        Self { fixed_ns: fixed, per_row_ns: per_row, scale: AtomicU64::new(1f64.to_bits()) }
    }

    /// Predicted time for `rows` rows.
    pub fn predict(&self, rows: usize) -> Duration {
        let s = f64::from_bits(self.scale.load(Ordering::Relaxed));
        Duration::from_nanos((s * (self.fixed_ns + rows as f64 * self.per_row_ns)) as u64)
    }

    /// Folds an observed run into the online correction (EWMA, weight 1/8).
    pub fn observe(&self, rows: usize, took: Duration) {
        let base = self.fixed_ns + rows as f64 * self.per_row_ns;
        if base <= 0.0 {
            return;
        }
        let ratio = (took.as_nanos() as f64 / base).clamp(0.05, 50.0);
        let old = f64::from_bits(self.scale.load(Ordering::Relaxed));
        self.scale.store((old * 0.875 + ratio * 0.125).to_bits(), Ordering::Relaxed);
    }
}

/// Costs of all stages of a model.
#[derive(Debug)]
pub struct ModelCost {
    pub stages: Vec<StageCost>,
}

impl ModelCost {
    /// Predicted time to run every stage on `rows` rows.
    pub fn predict(&self, rows: usize) -> Duration {
        self.stages.iter().map(|s| s.predict(rows)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_model_and_online_correction() {
        let c = StageCost::from_measurements(Duration::from_micros(110), 11, Duration::from_micros(210));
        assert_eq!(c.predict(1), Duration::from_micros(110));
        assert_eq!(c.predict(21), Duration::from_micros(310));
        for _ in 0..100 {
            c.observe(1, Duration::from_micros(220));
        }
        let p = c.predict(1).as_micros();
        assert!((215..=225).contains(&p), "{p}");
    }
}
