//! One training round for one cut: fit every candidate predictor on the
//! window, and predict every window row *out of fold* so thresholds are judged
//! on rows the predictor did not see, as they will be in service.
//!
//! Folds are contiguous runs of the window (3 of them): neighbouring requests
//! of a stream look alike, so interleaved folds would leak and flatter the
//! predictor. Every row is held out once, so the budget can be certified from
//! a window 4× smaller than a fixed held-out quarter needs (~300 rows at zero
//! errors for a 1 % budget; see `policy::tune`).

use std::sync::Arc;
use std::time::Instant;

use super::knn::{KmeansCache, KmeansParams, KnnCache, KnnParams};
use super::learned::{LearnedCache, LearnedParams};
use super::placement::CutOption;
use super::{CutCache, Samples};
use crate::config::{CacheConfig, CacheKind};

/// Folds for out-of-fold predictions.
pub const FOLDS: usize = 3;

/// Fixed cost of an active cut besides the predictor, µs per row: the stage
/// also computes the pooled features (measured: features at all 7 cuts of the
/// Fashion-MNIST ResNet cost ~70 µs per request).
pub const CUT_OVERHEAD_US: f64 = 10.0;

/// A fitted predictor and how it did out of fold.
pub struct Candidate {
    pub cache: Arc<dyn CutCache>,
    pub option: CutOption,
}

/// The predictors this config may use, smallest first.
fn kinds(config: &CacheConfig) -> Vec<CacheKind> {
    vec![config.kind]
}

fn fit(kind: CacheKind, hidden: usize, s: &Samples<'_>) -> Arc<dyn CutCache> {
    match kind {
        CacheKind::Learned => {
            // About 16 000 row-steps whatever the window size, 2 to 30 epochs: the
            // trainer must keep up with the stream on a small CPU share.
            let epochs = (16_000 / s.rows().max(1)).clamp(2, 30);
            Arc::new(LearnedCache::fit(s, &LearnedParams { hidden, epochs, ..LearnedParams::default() }))
        }
        CacheKind::Knn => Arc::new(KnnCache::fit(s, &KnnParams::default())),
        CacheKind::Kmeans => Arc::new(KmeansCache::fit(s, &KmeansParams::default())),
    }
}

/// Fits the candidates for cut `cut`: `x` is `rows × dim`, `y` the full model's classes.
pub fn candidates(
    config: &CacheConfig,
    cut: usize,
    x: &[f32],
    dim: usize,
    y: &[u32],
    classes: usize,
) -> Vec<Candidate> {
    let rows = y.len();
    if dim == 0 || rows < FOLDS * 2 || x.len() != rows * dim {
        return Vec::new();
    }
    let all = Samples { features: x, dim, labels: y, classes };
    let mut out: Vec<Candidate> = kinds(config).into_iter().map(|kind| candidate(kind, 0, &all)).collect();
    // The larger predictor is tried at the input (raw pixels are far from linearly
    // separable) and wherever the small one gets under 90 % of rows right out of
    // fold; elsewhere it would cost training time for nothing.
    let weak = |c: &Candidate| c.option.preds.iter().zip(y).filter(|(p, y)| p.0 == **y).count() * 10 < rows * 9;
    if config.kind == CacheKind::Learned && config.hidden > 0 && (cut == 0 || out.first().is_some_and(weak)) {
        out.push(candidate(CacheKind::Learned, config.hidden, &all));
    }
    out
}

/// Fits one predictor on every fold and on all rows.
fn candidate(kind: CacheKind, hidden: usize, all: &Samples<'_>) -> Candidate {
    let (x, y, dim, rows, classes) = (all.features, all.labels, all.dim, all.rows(), all.classes);
    let mut preds = vec![(0u32, 0f32); rows];
    for f in 0..FOLDS {
        let (lo, hi) = (rows * f / FOLDS, rows * (f + 1) / FOLDS);
        let mut fx = Vec::with_capacity((rows - (hi - lo)) * dim);
        fx.extend_from_slice(&x[..lo * dim]);
        fx.extend_from_slice(&x[hi * dim..]);
        let fy: Vec<u32> = y[..lo].iter().chain(&y[hi..]).copied().collect();
        let c = fit(kind, hidden, &Samples { features: &fx, dim, labels: &fy, classes });
        preds[lo..hi].copy_from_slice(&c.predict(&x[lo * dim..hi * dim], dim));
    }
    let cache = fit(kind, hidden, all);
    let probe = rows.min(256);
    let t0 = Instant::now();
    std::hint::black_box(cache.predict(&x[..probe * dim], dim));
    let lookup_us = t0.elapsed().as_secs_f64() * 1e6 / probe as f64 + CUT_OVERHEAD_US;
    let mem_bytes = cache.mem_bytes();
    Candidate { cache, option: CutOption { preds, lookup_us, mem_bytes } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_fold_predictions_never_see_their_own_rows() {
        // Labels are a pure function of the row's position parity with no signal in
        // the features: a predictor that memorised its rows would look perfect in
        // fold, but out of fold it can do no better than chance.
        let rows = 400;
        let x: Vec<f32> = (0..rows).map(|i| ((i * 7919) % 1000) as f32).collect();
        let y: Vec<u32> = (0..rows).map(|i| (i % 2) as u32).collect();
        let config = CacheConfig {
            kind: CacheKind::Knn,
            budget: 0.01,
            window: 4096,
            min_samples: 256,
            retrain_every: 256,
            shadow_fraction: 0.05,
            trainer_cpu_share: 0.25,
            hidden: 0,
            max_memory_bytes: 1 << 20,
            stream_prior: false,
            state_file: None,
        };
        let c = candidates(&config, 1, &x, 1, &y, 2);
        assert_eq!(c.len(), 1);
        let right = c[0].option.preds.iter().zip(&y).filter(|(p, y)| p.0 == **y).count();
        assert!(right < rows * 6 / 10, "{right}/{rows} right out of fold");
        assert!(c[0].option.lookup_us >= CUT_OVERHEAD_US);
        assert!(candidates(&config, 1, &x, 1, &y[..3], 2).is_empty());
    }
}
