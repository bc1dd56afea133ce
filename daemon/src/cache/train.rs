//! One training round for one cut: fit every candidate predictor on the
//! window, and predict every window row *out of fold* so thresholds are judged
//! on rows the predictor did not see, as they will be in service.
//!
//! Folds are contiguous runs of the window (3 of them): neighbouring requests
//! of a stream look alike, so interleaved folds would leak and flatter the
//! predictor. Every row is held out once, so the budget can be certified from
//! a window 4× smaller than a fixed held-out quarter needs (~300 rows at zero
//! errors for a 1 % budget; see `policy::tune`).
//!
//! With `selector = "learned"` each learned predictor comes as three
//! candidates sharing its fits: max-softmax and two learned selectors
//! (`selector.rs`). A selector is trained on the predictor's out-of-fold
//! record (was its guess the full model's?), nested in the same folds: the
//! selector that scores fold f never saw fold f's rows, so thresholds are
//! tuned on scores that are out of fold twice over. (Not thrice: the guesses
//! it learned from on the other folds came from predictors that saw fold f.)
//! The served selector is fitted on every out-of-fold row and judges the
//! predictor fitted on every row.

use std::sync::Arc;
use std::time::Instant;

use super::knn::{KmeansCache, KmeansParams, KnnCache, KnnParams};
use super::learned::{LearnedCache, LearnedParams};
use super::placement::CutOption;
use super::selector::{self, Gate, GateParams};
use super::{CutCache, Samples};
use crate::config::{CacheConfig, CacheKind, CacheSelector};

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
    if kind == CacheKind::Learned {
        return Arc::new(fit_learned(hidden, s));
    }
    // Freeze Inference's caches see the features only, never the stream prior.
    let stripped: Vec<f32>;
    let features = if s.prior {
        stripped = s.features.chunks_exact(s.dim.max(1)).flat_map(|r| &r[..s.dim - 1]).copied().collect();
        Samples { features: &stripped, dim: s.dim - 1, prior: false, ..*s }
    } else {
        *s
    };
    let cache: Arc<dyn CutCache> = match kind {
        CacheKind::Knn => Arc::new(KnnCache::fit(&features, &KnnParams::default())),
        _ => Arc::new(KmeansCache::fit(&features, &KmeansParams::default())),
    };
    if s.prior {
        Arc::new(FeaturesOnly(cache))
    } else {
        cache
    }
}

/// A cache fitted without the rows' stream-prior column: drops it at lookup.
struct FeaturesOnly(Arc<dyn CutCache>);

impl CutCache for FeaturesOnly {
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)> {
        if dim < 2 {
            return self.0.predict(&[], 1);
        }
        let rows: Vec<f32> = features.chunks_exact(dim).flat_map(|r| &r[..dim - 1]).copied().collect();
        self.0.predict(&rows, dim - 1)
    }

    fn mem_bytes(&self) -> usize {
        self.0.mem_bytes()
    }

    fn kind(&self) -> &'static str {
        self.0.kind()
    }
}

fn fit_learned(hidden: usize, s: &Samples<'_>) -> LearnedCache {
    // About 16 000 row-steps whatever the window size, 2 to 30 epochs: the
    // trainer must keep up with the stream on a small CPU share.
    let epochs = (16_000 / s.rows().max(1)).clamp(2, 30);
    LearnedCache::fit(s, &LearnedParams { hidden, epochs, ..LearnedParams::default() })
}

fn fit_gate(xs: &[f32], agree: &[bool], classes: usize) -> Gate {
    // A logistic regression ranks rows well after a few thousand row-steps
    // (measured on the Fashion-MNIST class-run stream: 4 000, 8 000 and 30 000
    // steps certify the same exits; a step costs 60–200 ns by input width).
    let epochs = (6_000 / agree.len().max(1)).clamp(3, 20);
    Gate::fit(xs, agree, classes, &GateParams { epochs, ..GateParams::default() })
}

/// Fits the candidates for cut `cut`: `x` is `rows × dim`, `y` the full
/// model's classes; `prior`: each row's last column is the stream prior.
#[allow(clippy::too_many_arguments)]
pub fn candidates(
    config: &CacheConfig,
    cut: usize,
    x: &[f32],
    dim: usize,
    y: &[u32],
    classes: usize,
    prior: bool,
) -> Vec<Candidate> {
    let rows = y.len();
    if dim <= usize::from(prior) || rows < FOLDS * 2 || x.len() != rows * dim {
        return Vec::new();
    }
    let all = Samples { features: x, dim, labels: y, classes, prior };
    let selector = config.selector;
    let mut out: Vec<Candidate> =
        kinds(config).into_iter().flat_map(|kind| candidate(kind, 0, &all, selector)).collect();
    // The larger predictor is tried at the input (raw pixels are far from linearly
    // separable) and wherever the small one gets under 90 % of rows right out of
    // fold; elsewhere it would cost training time for nothing.
    let weak = |c: &Candidate| c.option.preds.iter().zip(y).filter(|(p, y)| p.0 == **y).count() * 10 < rows * 9;
    if config.kind == CacheKind::Learned && config.hidden > 0 && (cut == 0 || out.first().is_some_and(weak)) {
        out.extend(candidate(CacheKind::Learned, config.hidden, &all, selector));
    }
    out
}

/// Rows `lo..hi` of fold `f` of `rows`.
fn fold(rows: usize, f: usize) -> (usize, usize) {
    (rows * f / FOLDS, rows * (f + 1) / FOLDS)
}

/// Every row of `all` outside `lo..hi`.
fn without(all: &Samples<'_>, lo: usize, hi: usize) -> (Vec<f32>, Vec<u32>) {
    let (x, y, dim) = (all.features, all.labels, all.dim);
    let mut fx = Vec::with_capacity((all.rows() - (hi - lo)) * dim);
    fx.extend_from_slice(&x[..lo * dim]);
    fx.extend_from_slice(&x[hi * dim..]);
    (fx, y[..lo].iter().chain(&y[hi..]).copied().collect())
}

/// Fits one predictor on every fold and on all rows; with learned selectors,
/// the same predictor judged each way (max-softmax first).
fn candidate(kind: CacheKind, hidden: usize, all: &Samples<'_>, selector: CacheSelector) -> Vec<Candidate> {
    if kind == CacheKind::Learned && selector == CacheSelector::Learned {
        return gated(hidden, all);
    }
    let (x, dim, rows) = (all.features, all.dim, all.rows());
    let mut preds = vec![(0u32, 0f32); rows];
    for f in 0..FOLDS {
        let (lo, hi) = fold(rows, f);
        let (fx, fy) = without(all, lo, hi);
        let c = fit(kind, hidden, &Samples { features: &fx, labels: &fy, ..*all });
        preds[lo..hi].copy_from_slice(&c.predict(&x[lo * dim..hi * dim], dim));
    }
    vec![measured(fit(kind, hidden, all), preds, all)]
}

/// A learned predictor judged three ways: max-softmax and two learned
/// selectors, one reading the predictor's output only, one also the guessed
/// class and the row's features (it can find regions where the guess goes
/// wrong, and overfit where there are none). All three share the predictor's
/// fits; the placement optimizer keeps whichever certifies more out of fold.
///
/// The predictor's out-of-fold guesses give each row its selector inputs and
/// whether the guess agreed; selector scores are then out of fold again over
/// the same folds.
fn gated(hidden: usize, all: &Samples<'_>) -> Vec<Candidate> {
    let (x, y, dim, rows, classes) = (all.features, all.labels, all.dim, all.rows(), all.classes);
    let width = selector::width(dim - usize::from(all.prior), classes);
    let mut softmax = vec![(0u32, 0f32); rows];
    let mut known = vec![false; rows];
    let mut inputs = vec![0f32; rows * width];
    let mut buf = Vec::with_capacity(width);
    for f in 0..FOLDS {
        let (lo, hi) = fold(rows, f);
        let (fx, fy) = without(all, lo, hi);
        let c = fit_learned(hidden, &Samples { features: &fx, labels: &fy, ..*all });
        for r in lo..hi {
            let row = &x[r * dim..(r + 1) * dim];
            let j = c.judge(row);
            known[r] = j.known();
            softmax[r] = (j.id, if known[r] { j.probs[j.class] } else { 0.0 });
            buf.clear();
            selector::inputs(&j, classes, &mut buf);
            inputs[r * width..(r + 1) * width].copy_from_slice(&buf);
        }
    }
    let agree: Vec<bool> = softmax.iter().zip(y).map(|(g, y)| g.0 == *y).collect();
    let predictor = fit_learned(hidden, all);
    let mut out = Vec::with_capacity(3);
    for reads in [selector::OUTPUT_INPUTS, width] {
        // Rows the novelty guard rejects are misses whatever the selector says:
        // it neither learns from them nor scores them.
        let fit_on = |keep: &dyn Fn(usize) -> bool| {
            let rs: Vec<usize> = (0..rows).filter(|&r| known[r] && keep(r)).collect();
            let xs: Vec<f32> = rs.iter().flat_map(|&r| inputs[r * width..r * width + reads].iter().copied()).collect();
            let ys: Vec<bool> = rs.iter().map(|&r| agree[r]).collect();
            fit_gate(&xs, &ys, classes)
        };
        let mut preds: Vec<(u32, f32)> = softmax.iter().map(|&(g, _)| (g, 0.0)).collect();
        for f in 0..FOLDS {
            let (lo, hi) = fold(rows, f);
            let gate = fit_on(&|r| !(lo..hi).contains(&r));
            for r in (lo..hi).filter(|&r| known[r]) {
                preds[r].1 = gate.score(&inputs[r * width..(r + 1) * width]);
            }
        }
        out.push(measured(Arc::new(predictor.clone().with_gate(fit_on(&|_| true))), preds, all));
    }
    out.insert(0, measured(Arc::new(predictor), softmax, all));
    out
}

/// The served cache with its out-of-fold predictions, lookup time and memory.
fn measured(cache: Arc<dyn CutCache>, preds: Vec<(u32, f32)>, all: &Samples<'_>) -> Candidate {
    let (x, dim, rows) = (all.features, all.dim, all.rows());
    let probe = rows.min(256);
    let t0 = Instant::now();
    std::hint::black_box(cache.predict(&x[..probe * dim], dim));
    let lookup_us = t0.elapsed().as_secs_f64() * 1e6 / probe as f64 + CUT_OVERHEAD_US;
    let mem_bytes = cache.mem_bytes();
    Candidate { cache, option: CutOption { preds, lookup_us, mem_bytes } }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn out_of_fold_predictions_never_see_their_own_rows() {
        // Labels are a pure function of the row's position parity with no signal in
        // the features: a predictor that memorised its rows would look perfect in
        // fold, but out of fold it can do no better than chance.
        let rows = 400;
        let x: Vec<f32> = (0..rows).map(|i| ((i * 7919) % 1000) as f32).collect();
        let y: Vec<u32> = (0..rows).map(|i| (i % 2) as u32).collect();
        let config = config(CacheKind::Knn, CacheSelector::Softmax);
        let c = candidates(&config, 1, &x, 1, &y, 2, false);
        assert_eq!(c.len(), 1);
        let right = c[0].option.preds.iter().zip(&y).filter(|(p, y)| p.0 == **y).count();
        assert!(right < rows * 6 / 10, "{right}/{rows} right out of fold");
        assert!(c[0].option.lookup_us >= CUT_OVERHEAD_US);
        assert!(candidates(&config, 1, &x, 1, &y[..3], 2, false).is_empty());
    }

    /// A cache config for tests: 1 % budget, no hidden layer, no stream prior.
    pub(crate) fn config(kind: CacheKind, selector: CacheSelector) -> CacheConfig {
        CacheConfig {
            kind,
            selector,
            budget: 0.01,
            window: 4096,
            min_samples: 256,
            retrain_every: 256,
            shadow_fraction: 0.05,
            trainer_cpu_share: 1.0,
            hidden: 0,
            max_memory_bytes: 1 << 20,
            stream_prior: false,
            state_file: None,
        }
    }

    /// `rows` rows of 4 classes: blob k at 3·e_k in the first 4 of 8 dims,
    /// noise elsewhere; the last dim u is uniform in [-1, 1]. Where u > 0.6
    /// the full model answers k + 1 instead: a linear predictor cannot express
    /// that, so it is as sure there as anywhere, and wrong.
    fn confidently_wrong_region(rows: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut s = seed;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..rows {
            let k = i % 4;
            let mut noise = || (0..4).map(|_| super::super::learned::uniform_for_tests(&mut s)).sum::<f32>() - 2.0;
            for d in 0..7 {
                x.push(if d == k { 3.0 } else { 0.0 } + noise() * 0.4);
            }
            let u = super::super::learned::uniform_for_tests(&mut s) * 2.0 - 1.0;
            x.push(u);
            y.push(if u > 0.6 { (k as u32 + 1) % 4 } else { k as u32 });
        }
        (x, y)
    }

    #[test]
    fn learned_selector_certifies_more_exits_within_the_budget() {
        let (x, y) = confidently_wrong_region(3000, 11);
        let (hx, hy) = confidently_wrong_region(3000, 12);
        let budget = 0.01;
        // Per selector setting: the candidate that certifies most out of fold (as
        // the placement would pick it), and its held-out exits and errors with
        // that threshold.
        let run = |selector: CacheSelector| {
            let c = candidates(&config(CacheKind::Learned, selector), 1, &x, 8, &y, 4, false);
            let certified = |c: &Candidate| {
                let t = crate::cache::policy::tune(std::slice::from_ref(&c.option.preds), &y, &[], budget, 1.0)[0];
                (c.option.preds.iter().filter(|p| p.1 >= t).count(), t)
            };
            let best = c.iter().max_by_key(|c| certified(c).0).unwrap();
            let (certified, t) = certified(best);
            let held = best.cache.predict(&hx, 8);
            let exits = held.iter().filter(|p| p.1 >= t).count();
            let errors = held.iter().zip(&hy).filter(|(p, y)| p.1 >= t && p.0 != **y).count();
            (certified, exits, errors, c.len())
        };
        let (soft_cert, soft_exits, soft_errors, n) = run(CacheSelector::Softmax);
        assert_eq!(n, 1, "max-softmax alone");
        let (cert, exits, errors, n) = run(CacheSelector::Learned);
        assert_eq!(n, 3, "max-softmax and two learned selectors");
        println!("softmax: {soft_cert} certified, {soft_exits} held-out exits, {soft_errors} errors");
        println!("learned: {cert} certified, {exits} held-out exits, {errors} errors");
        // ~20 % of rows are wrong at every softmax confidence: max-softmax certifies
        // (almost) nothing; the selector finds the region and certifies most of the rest.
        assert!(cert >= 3000 / 2 && cert >= soft_cert + 3000 * 3 / 10, "{cert} vs {soft_cert}");
        assert!(exits >= 3000 / 2 && exits >= soft_exits + 3000 * 3 / 10, "{exits} vs {soft_exits}");
        assert!(errors as f32 <= budget * 3000.0, "{errors} held-out errors");
        assert!(soft_errors as f32 <= budget * 3000.0, "{soft_errors} held-out errors");
    }

    #[test]
    fn selector_scores_are_out_of_fold() {
        // No signal at all: features are noise, labels a coin flip. A selector
        // scored on rows it was fitted on ranks the rows its guess got right
        // higher (it fits the noise: 56 inputs, 600 rows); out of fold it cannot
        // tell agreement from disagreement.
        let (rows, dim) = (900, 48);
        let mut s = 5u64;
        let x: Vec<f32> = (0..rows * dim).map(|_| super::super::learned::uniform_for_tests(&mut s)).collect();
        let y: Vec<u32> =
            (0..rows).map(|_| u32::from(super::super::learned::uniform_for_tests(&mut s) < 0.5)).collect();
        let c = candidates(&config(CacheKind::Learned, CacheSelector::Learned), 1, &x, dim, &y, 2, false);
        assert_eq!(c.len(), 3);
        for (k, c) in c.iter().enumerate().skip(1) {
            let auc = auc(&c.option.preds, &y);
            assert!((0.42..0.58).contains(&auc), "selector {k}: AUC {auc:.3} on noise");
        }
    }

    /// Area under the ROC curve of the confidences for "the guess was right",
    /// over the rows the novelty guard let through.
    fn auc(preds: &[(u32, f32)], y: &[u32]) -> f64 {
        let scored: Vec<(f32, bool)> =
            preds.iter().zip(y).filter(|(p, _)| p.1 > 0.0).map(|(p, y)| (p.1, p.0 == *y)).collect();
        let (pos, neg): (Vec<&(f32, bool)>, Vec<_>) = scored.iter().partition(|s| s.1);
        assert!(scored.len() > y.len() * 9 / 10 && !pos.is_empty() && !neg.is_empty());
        let beats = |a: f32, b: f32| match a.total_cmp(&b) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        };
        let wins: f64 = pos.iter().flat_map(|a| neg.iter().map(move |b| beats(a.0, b.0))).sum();
        wins / (pos.len() * neg.len()) as f64
    }
}
