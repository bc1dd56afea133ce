//! The learned selector: a logistic regression that says how likely a learned
//! predictor's guess for one row is to be the full model's answer.
//!
//! Max-softmax trusts the predictor's own probability; a predictor that cannot
//! tell a region of its inputs apart (the full model answers there from
//! detail the pooled features lose) is as sure there as anywhere, and wrong.
//! The selector learns from the predictor's out-of-fold record instead. Its
//! inputs start with what the predictor made of the row (log odds of the top
//! class, log margin over the second, certainty, distance to the class
//! centroid within the novelty radius, whether the stream has a previous
//! answer and whether the guess repeats it); then come the guessed class's
//! one-hot and the row's standardised features, with which it can pick out
//! regions where the guess goes wrong — and overfit where there are none. A
//! gate reads the first [`OUTPUT_INPUTS`] or all of them; the trainer fits
//! both and the placement keeps what certifies more out of fold.
//!
//! A gate never sees a row the novelty guard rejects (those stay misses) and
//! costs one short dot product per lookup.

use serde::{Deserialize, Serialize};

use super::learned::{axpy, dot, shuffle, Judgement};

/// Selector inputs that describe the predictor's output (they come first; the
/// guessed class's one-hot and the standardised features follow). A gate
/// reads a prefix of the inputs: these, or all of them.
pub const OUTPUT_INPUTS: usize = 6;

/// Training settings.
#[derive(Debug, Clone)]
pub struct GateParams {
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub l2: f32,
    pub seed: u64,
}

impl Default for GateParams {
    fn default() -> Self {
        Self { epochs: 20, batch: 32, learning_rate: 0.05, l2: 1e-3, seed: 3 }
    }
}

/// A fitted selector for one cut.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gate {
    classes: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    weights: Vec<f32>,
    bias: f32,
}

/// Width of all the selector's inputs for `dim` features and `classes` classes.
pub fn width(dim: usize, classes: usize) -> usize {
    OUTPUT_INPUTS + classes + dim
}

/// Appends the selector's inputs for one row to `out`: `j` is what the
/// predictor made of the row (its guess, the stream prior the row carried,
/// its standardised features), `classes` the model's classes.
pub fn inputs(j: &Judgement, classes: usize, out: &mut Vec<f32>) {
    let top = j.probs.get(j.class).copied().unwrap_or(0.0);
    let second = j.probs.iter().enumerate().filter(|&(k, _)| k != j.class).map(|(_, &p)| p).fold(0.0, f32::max);
    let entropy: f32 = j.probs.iter().filter(|&&p| p > 0.0).map(|&p| -p * p.ln()).sum();
    let max_entropy = (classes.max(2) as f32).ln();
    let (seen, agrees) = (j.prior.is_some(), j.prior == Some(j.id));
    // Log odds, not probabilities: at the top of the ranking, where thresholds
    // under a 1 % budget sit, 0.999 and 0.99999 differ by 5 in log odds and
    // by nothing a linear model on probabilities could use.
    let ln = |p: f32| p.max(1e-12).ln();
    out.extend([
        (ln(top) - ln(1.0 - top)).clamp(-30.0, 30.0),
        (ln(top) - ln(second)).min(30.0),
        1.0 - entropy / max_entropy,
        j.novelty.clamp(0.0, 1.0),
        f32::from(u8::from(seen)),
        f32::from(u8::from(agrees)),
    ]);
    out.extend((0..classes).map(|k| f32::from(u8::from(k == j.id as usize))));
    out.extend_from_slice(&j.z);
}

impl Gate {
    /// Fits on `xs` (`agree.len() × n` selector inputs: the first n of
    /// [`inputs`], n = [`OUTPUT_INPUTS`] or [`width`]) to predict `agree`
    /// (the predictor's guess was the full model's answer), by mini-batch SGD
    /// (momentum 0.9) on the log loss.
    pub fn fit(xs: &[f32], agree: &[bool], classes: usize, p: &GateParams) -> Self {
        let rows = agree.len();
        let width = xs.len().checked_div(rows).unwrap_or(0);
        let (mean, inv_std) = standardisation(xs, width);
        let mut g = Self { classes, mean, inv_std, weights: vec![0.0; width], bias: 0.0 };
        if rows == 0 || width == 0 {
            return g;
        }
        let zs: Vec<f32> = xs.chunks_exact(width).flat_map(|x| g.standardise(x)).collect();
        // Start from the base rate, so few epochs on few rows still rank sensibly.
        let rate = (agree.iter().filter(|&&a| a).count() as f32 + 0.5) / (rows as f32 + 1.0);
        g.bias = (rate / (1.0 - rate)).ln();
        let (mut gw, mut vw, mut vb) = (vec![0.0; width], vec![0.0; width], 0.0f32);
        let mut order: Vec<usize> = (0..rows).collect();
        let mut rng = p.seed.max(1);
        for epoch in 0..p.epochs {
            shuffle(&mut order, &mut rng);
            let lr = p.learning_rate / (1.0 + epoch as f32 * 0.1);
            for chunk in order.chunks(p.batch.max(1)) {
                super::pace();
                gw.fill(0.0);
                let mut gb = 0.0;
                for &r in chunk {
                    let z = &zs[r * width..(r + 1) * width];
                    let err = sigmoid(g.bias + dot(&g.weights, z)) - f32::from(u8::from(agree[r]));
                    axpy(&mut gw, err, z);
                    gb += err;
                }
                let inv = 1.0 / chunk.len() as f32;
                for ((w, g), v) in g.weights.iter_mut().zip(&gw).zip(vw.iter_mut()) {
                    *v = 0.9 * *v - lr * (g * inv + p.l2 * *w);
                    *w += *v;
                }
                vb = 0.9 * vb - lr * gb * inv;
                g.bias += vb;
            }
        }
        g
    }

    /// Probability that the predictor's guess `j` for raw row `row` is the full model's answer.
    pub fn confidence(&self, j: &Judgement) -> f32 {
        let mut x = Vec::with_capacity(width(j.z.len(), self.classes));
        inputs(j, self.classes, &mut x);
        self.score(&x)
    }

    /// Probability of agreement for one row of selector inputs (the gate reads
    /// as many of them as it was fitted on).
    pub fn score(&self, x: &[f32]) -> f32 {
        let Some(x) = x.get(..self.weights.len()) else { return 0.0 };
        let z = self.standardise(x);
        sigmoid(self.bias + dot(&self.weights, &z))
    }

    fn standardise(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(&self.mean).zip(&self.inv_std).map(|((&v, m), s)| (finite(v) - m) * s).collect()
    }

    /// How many of the inputs it reads.
    pub fn reads(&self) -> usize {
        self.weights.len()
    }

    /// Bytes of state.
    pub fn mem_bytes(&self) -> usize {
        4 * (self.mean.len() + self.inv_std.len() + self.weights.len() + 1)
    }
}

/// Per-column mean and 1/std of `xs` (`width` columns).
fn standardisation(xs: &[f32], width: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = xs.len().checked_div(width).unwrap_or(0).max(1) as f32;
    let (mut mean, mut var) = (vec![0f32; width], vec![0f32; width]);
    for x in xs.chunks_exact(width.max(1)) {
        axpy(&mut mean, 1.0, &x.iter().copied().map(finite).collect::<Vec<_>>());
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    for x in xs.chunks_exact(width.max(1)) {
        for ((v, &a), m) in var.iter_mut().zip(x).zip(&mean) {
            *v += (finite(a) - m).powi(2);
        }
    }
    (mean, var.iter().map(|v| 1.0 / (v / rows).sqrt().max(1e-6)).collect())
}

fn finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::learned::{LearnedCache, LearnedParams};
    use crate::cache::{CutCache, Samples};

    fn judgement(class: usize, prior: Option<u32>) -> Judgement {
        let mut probs = vec![0.05f32; 4];
        probs[class] = 0.85;
        Judgement { probs, class, id: class as u32, prior, z: vec![0.5, -0.5], novelty: 0.25 }
    }

    #[test]
    fn inputs_read_the_guess_the_stream_prior_and_the_features() {
        let at = |j: &Judgement| {
            let mut x = Vec::new();
            inputs(j, 4, &mut x);
            assert_eq!(x.len(), width(2, 4));
            x
        };
        let x = at(&judgement(2, Some(2)));
        assert!((x[0] - (0.85f32 / 0.15).ln()).abs() < 1e-4, "log odds {}", x[0]);
        assert!((x[1] - 17f32.ln()).abs() < 1e-4, "log margin {}", x[1]);
        assert_eq!(x[3], 0.25);
        assert_eq!(&x[4..6], &[1.0, 1.0], "a previous answer, and the guess repeats it");
        assert_eq!(&x[6..10], &[0.0, 0.0, 1.0, 0.0], "the guessed class");
        assert_eq!(&x[10..], &judgement(2, None).z[..]);
        assert_eq!(&at(&judgement(1, Some(2)))[4..6], &[1.0, 0.0]);
        assert_eq!(&at(&judgement(1, None))[4..6], &[0.0, 0.0], "no prior on the row");
    }

    #[test]
    fn gated_cache_keeps_the_novelty_guard_and_ranks_by_its_gate() {
        // Blobs at 3·e_k in 4 dims.
        let mut s = 3u64;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..400 {
            let k = i % 4;
            x.extend((0..4).map(|d| if d == k { 3.0 } else { 0.0 } + crate::cache::learned::uniform_for_tests(&mut s)));
            y.push(k as u32);
        }
        let c = LearnedCache::fit(
            &Samples { features: &x, dim: 4, labels: &y, classes: 4, prior: false },
            &LearnedParams::default(),
        );
        // A gate that learned "class 3 guesses are wrong".
        let mut xs = Vec::new();
        let agree: Vec<bool> = (0..400)
            .map(|i| {
                let j = c.judge(&x[i * 4..i * 4 + 4]);
                inputs(&j, 4, &mut xs);
                j.class != 3
            })
            .collect();
        let gate = Gate::fit(&xs, &agree, 4, &GateParams::default());
        assert_eq!(gate.reads(), width(4, 4));
        let gated = c.clone().with_gate(gate);
        let p = gated.predict(&x[..16], 4);
        assert!(p[0].1 > 0.9 && p[3].1 < 0.1, "{p:?}");
        assert_eq!(
            p.iter().map(|p| p.0).collect::<Vec<_>>(),
            c.predict(&x[..16], 4).iter().map(|p| p.0).collect::<Vec<_>>()
        );
        let mut far = vec![0.0f32; 4];
        far[0] = 40.0;
        assert_eq!(gated.predict(&far, 4)[0].1, 0.0, "outside the novelty radius: a miss");
        assert!(gated.mem_bytes() > c.mem_bytes());
        assert_eq!((c.kind(), gated.kind()), ("learned", "learned+features-selector"));
        // An output-only gate reads the first inputs of the same rows.
        let narrow: Vec<f32> = xs.chunks_exact(width(4, 4)).flat_map(|r| r[..OUTPUT_INPUTS].to_vec()).collect();
        let g = Gate::fit(&narrow, &agree, 4, &GateParams::default());
        assert_eq!(g.reads(), OUTPUT_INPUTS);
        assert!(g.score(&xs[..width(4, 4)]).is_finite());
    }
}
