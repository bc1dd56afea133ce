//! The learned cache: a small predictor on standardised pooled features —
//! softmax regression, or one hidden ReLU layer of `hidden` units before it —
//! trained on the full model's answers; its confidence is the predicted class's
//! probability (max-softmax selector) or, with a [`Gate`], the learned
//! selector's probability that the guess is the full model's answer.
//!
//! It answers only among the classes its training rows had (a stream shows a
//! few dozen of an ImageNet model's 1000: a 1000-output predictor would cost
//! ~30× the training time and memory for outputs it never learns). With the
//! stream prior, a row's last column is the stream's previous answer (model
//! class + 1, 0 for none) and each output gets one learned weight for "the
//! previous answer was this class" — what a one-hot prior feeds the right
//! logit, without `classes` extra inputs per row.

use serde::{Deserialize, Serialize};

use super::selector::Gate;
use super::{CutCache, Samples};

/// Training settings.
#[derive(Debug, Clone)]
pub struct LearnedParams {
    /// Hidden ReLU units; 0 = softmax regression.
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub l2: f32,
    pub seed: u64,
}

impl Default for LearnedParams {
    fn default() -> Self {
        Self { hidden: 0, epochs: 30, batch: 32, learning_rate: 0.05, l2: 1e-4, seed: 1 }
    }
}

/// A trained predictor for one cut.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LearnedCache {
    /// Feature columns (the prior column, if any, not counted).
    dim: usize,
    /// Rows carry one more column after the features: the stream prior.
    prior: bool,
    /// The model class of each output: the classes of the training rows, ascending.
    ids: Vec<u32>,
    classes: usize,
    hidden: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `hidden × dim`, one row per hidden unit (empty without a hidden layer).
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// `classes × width`, one row per class; width = hidden or dim.
    weights: Vec<f32>,
    bias: Vec<f32>,
    /// Per output: added to its logit when the stream's previous answer is its class.
    prior_w: Vec<f32>,
    /// Novelty guard: per class, the centroid of its training rows (`classes ×
    /// dim`, standardised) and the squared distance within which 99 % of them
    /// lie. A row farther than that from its predicted class's centroid is
    /// unlike anything the predictor was trained on — a class it never saw can
    /// still get a sure softmax — so its confidence is 0 (a miss).
    centroids: Vec<f32>,
    radius2: Vec<f32>,
    /// The learned selector; `None`: max-softmax.
    gate: Option<Gate>,
}

/// What the predictor made of one row.
#[derive(Debug, Clone)]
pub struct Judgement {
    /// Probabilities of the predictor's outputs.
    pub probs: Vec<f32>,
    /// The guessed (most probable) output.
    pub class: usize,
    /// The guessed output's model class.
    pub id: u32,
    /// The stream's previous answer (model class), when the row carried one.
    pub prior: Option<u32>,
    /// The standardised feature row.
    pub z: Vec<f32>,
    /// Squared distance to the guessed class's centroid over its novelty
    /// radius²: above 1 (or infinite, for a class never seen) the guess is a miss.
    pub novelty: f32,
}

impl Judgement {
    /// Within the novelty guard's radius.
    pub fn known(&self) -> bool {
        self.novelty <= 1.0
    }
}

/// Scratch buffers for one forward/backward pass.
struct Scratch {
    h: Vec<f32>,
    p: Vec<f32>,
    gh: Vec<f32>,
}

impl LearnedCache {
    /// Fits on `s` with mini-batch SGD (momentum 0.9) on the cross-entropy.
    pub fn fit(s: &Samples<'_>, p: &LearnedParams) -> Self {
        let dim = s.dim.saturating_sub(usize::from(s.prior));
        let (rows, hidden) = (s.rows(), p.hidden);
        let mut ids: Vec<u32> = s.labels.to_vec();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            ids.push(0);
        }
        let classes = ids.len();
        let local = |y: u32| ids.binary_search(&y).unwrap_or(0);
        let (mean, inv_std) = standardisation(s, dim);
        let width = if hidden > 0 { hidden } else { dim };
        let mut rng = p.seed.max(1);
        // He initialisation for the hidden layer; the output layer starts at zero.
        let scale = (2.0 / dim.max(1) as f32).sqrt();
        let w1: Vec<f32> = (0..dim * hidden).map(|_| (uniform(&mut rng) * 2.0 - 1.0) * scale * 1.73).collect();
        let mut c = Self {
            dim,
            prior: s.prior,
            ids: ids.clone(),
            classes,
            hidden,
            mean,
            inv_std,
            w1,
            b1: vec![0.0; hidden],
            weights: vec![0.0; width * classes],
            bias: vec![0.0; classes],
            prior_w: vec![0.0; classes],
            centroids: vec![0.0; classes * dim],
            radius2: vec![-1.0; classes],
            gate: None,
        };
        if rows == 0 {
            return c;
        }
        let xs: Vec<f32> = (0..rows).flat_map(|i| c.standardise(&s.row(i)[..dim])).collect();
        let ys: Vec<usize> = s.labels.iter().map(|&y| local(y)).collect();
        let priors: Vec<Option<usize>> =
            (0..rows).map(|i| c.prior_of(s.row(i)).and_then(|id| ids.binary_search(&id).ok())).collect();
        c.fit_guard(&xs, &ys);
        let mut grads = c.zeros_like();
        let mut vel = c.zeros_like();
        let mut order: Vec<usize> = (0..rows).collect();
        let mut sc = Scratch { h: vec![0.0; width], p: vec![0.0; classes], gh: vec![0.0; hidden] };
        for epoch in 0..p.epochs {
            shuffle(&mut order, &mut rng);
            let lr = p.learning_rate / (1.0 + epoch as f32 * 0.1);
            for chunk in order.chunks(p.batch.max(1)) {
                super::pace();
                grads.iter_mut().for_each(|g| g.fill(0.0));
                for &r in chunk {
                    c.backward(&xs[r * dim..(r + 1) * dim], priors[r], ys[r], &mut sc, &mut grads);
                }
                let inv = 1.0 / chunk.len() as f32;
                for ((param, g), v) in c.params_mut().into_iter().zip(&grads).zip(vel.iter_mut()) {
                    for ((w, g), v) in param.iter_mut().zip(g).zip(v.iter_mut()) {
                        *v = 0.9 * *v - lr * (g * inv + p.l2 * *w);
                        *w += *v;
                    }
                }
            }
        }
        c
    }

    /// Class centroids and 99th-percentile radii of the standardised rows `xs`.
    fn fit_guard(&mut self, xs: &[f32], labels: &[usize]) {
        let (dim, classes) = (self.dim, self.classes);
        let mut counts = vec![0usize; classes];
        for (row, &k) in xs.chunks_exact(dim).zip(labels) {
            counts[k] += 1;
            axpy(&mut self.centroids[k * dim..(k + 1) * dim], 1.0, row);
        }
        for (k, &n) in counts.iter().enumerate() {
            self.centroids[k * dim..(k + 1) * dim].iter_mut().for_each(|v| *v /= n.max(1) as f32);
        }
        let mut dists: Vec<Vec<f32>> = vec![Vec::new(); classes];
        for (row, &k) in xs.chunks_exact(dim).zip(labels) {
            dists[k].push(self.distance2(row, k));
        }
        for (k, d) in dists.iter_mut().enumerate() {
            if d.is_empty() {
                continue;
            }
            d.sort_by(f32::total_cmp);
            self.radius2[k] = d[((d.len() - 1) as f32 * 0.99).round() as usize];
        }
    }

    fn distance2(&self, z: &[f32], class: usize) -> f32 {
        let c = &self.centroids[class * self.dim..(class + 1) * self.dim];
        z.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum()
    }

    fn zeros_like(&self) -> Vec<Vec<f32>> {
        vec![
            vec![0.0; self.w1.len()],
            vec![0.0; self.b1.len()],
            vec![0.0; self.weights.len()],
            vec![0.0; self.bias.len()],
            vec![0.0; self.prior_w.len()],
        ]
    }

    fn params_mut(&mut self) -> [&mut Vec<f32>; 5] {
        [&mut self.w1, &mut self.b1, &mut self.weights, &mut self.bias, &mut self.prior_w]
    }

    /// The stream prior a raw row carries (its last column: model class + 1, 0 = none).
    fn prior_of(&self, row: &[f32]) -> Option<u32> {
        let v = *row.get(self.dim).filter(|_| self.prior)?;
        (1.0..16_777_216.0).contains(&v).then(|| v as u32 - 1)
    }

    fn width(&self) -> usize {
        if self.hidden > 0 {
            self.hidden
        } else {
            self.dim
        }
    }

    /// Adds the cross-entropy gradient of one standardised row to `grads`.
    fn backward(&self, x: &[f32], prior: Option<usize>, label: usize, sc: &mut Scratch, grads: &mut [Vec<f32>]) {
        self.forward(x, prior, sc);
        softmax(&mut sc.p);
        sc.p[label] -= 1.0;
        let width = self.width();
        let (gw1, rest) = grads.split_at_mut(1);
        let (gb1, rest) = rest.split_at_mut(1);
        let (gw2, rest) = rest.split_at_mut(1);
        let (gb2, gp) = rest.split_at_mut(1);
        if let Some(k) = prior {
            gp[0][k] += sc.p[k];
        }
        let input: &[f32] = if self.hidden > 0 { &sc.h } else { x };
        for (k, &pk) in sc.p.iter().enumerate() {
            axpy(&mut gw2[0][k * width..(k + 1) * width], pk, input);
            gb2[0][k] += pk;
        }
        if self.hidden == 0 {
            return;
        }
        sc.gh.fill(0.0);
        for (k, &pk) in sc.p.iter().enumerate() {
            axpy(&mut sc.gh, pk, &self.weights[k * width..(k + 1) * width]);
        }
        for (j, gh) in sc.gh.iter().enumerate() {
            if sc.h[j] > 0.0 {
                axpy(&mut gw1[0][j * self.dim..(j + 1) * self.dim], *gh, x);
                gb1[0][j] += gh;
            }
        }
    }

    /// Logits of one standardised row into `sc.p` (hidden activations into
    /// `sc.h`); `prior`: the output the stream's previous answer was.
    fn forward(&self, x: &[f32], prior: Option<usize>, sc: &mut Scratch) {
        if self.hidden > 0 {
            for (j, h) in sc.h.iter_mut().enumerate() {
                *h = (self.b1[j] + dot(&self.w1[j * self.dim..(j + 1) * self.dim], x)).max(0.0);
            }
        }
        let input: &[f32] = if self.hidden > 0 { &sc.h } else { x };
        let width = input.len();
        for (k, p) in sc.p.iter_mut().enumerate() {
            *p = self.bias[k] + dot(&self.weights[k * width..(k + 1) * width], input);
        }
        if let Some(k) = prior {
            sc.p[k] += self.prior_w[k];
        }
    }

    fn standardise(&self, row: &[f32]) -> Vec<f32> {
        row.iter().zip(&self.mean).zip(&self.inv_std).map(|((&x, m), s)| (clean(x) - m) * s).collect()
    }

    /// Class probabilities for one raw (unstandardised) feature row.
    pub fn probabilities(&self, row: &[f32]) -> Vec<f32> {
        self.judge(row).probs
    }

    /// What the predictor makes of one raw feature row: probabilities, guess,
    /// standardised row and where it lies relative to the guess's novelty radius.
    pub fn judge(&self, row: &[f32]) -> Judgement {
        let mut sc = Scratch { h: vec![0.0; self.width()], p: vec![0.0; self.classes], gh: Vec::new() };
        if row.len() != self.row_len() {
            softmax(&mut sc.p);
            let (id, z) = (self.ids[0], vec![0.0; self.dim]);
            return Judgement { probs: sc.p, class: 0, id, prior: None, z, novelty: f32::INFINITY };
        }
        let z = self.standardise(&row[..self.dim]);
        let prior = self.prior_of(row);
        self.forward(&z, prior.and_then(|id| self.ids.binary_search(&id).ok()), &mut sc);
        softmax(&mut sc.p);
        let class = sc.p.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        let novelty = match self.radius2.get(class) {
            Some(&r) if r >= 0.0 => {
                let d = self.distance2(&z, class);
                if d <= r {
                    d / r.max(f32::MIN_POSITIVE)
                } else {
                    f32::INFINITY
                }
            }
            _ => f32::INFINITY,
        };
        Judgement { probs: sc.p, class, id: self.ids[class], prior, z, novelty }
    }

    /// Columns of a raw row: the features and the prior column, if any.
    pub fn row_len(&self) -> usize {
        self.dim + usize::from(self.prior)
    }

    /// The model classes it answers among.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// This predictor with a learned selector for its confidence.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The learned selector, if any.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// Hidden units (0 = softmax regression).
    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

/// Per-dimension mean and 1/std of the finite values of the first `dim` columns of `s`.
fn standardisation(s: &Samples<'_>, dim: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = s.rows().max(1) as f32;
    let mut mean = vec![0f32; dim];
    let mut var = vec![0f32; dim];
    for i in 0..s.rows() {
        for (m, &x) in mean.iter_mut().zip(s.row(i)) {
            *m += clean(x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    for i in 0..s.rows() {
        for ((v, &x), m) in var.iter_mut().zip(s.row(i)).zip(&mean) {
            *v += (clean(x) - m).powi(2);
        }
    }
    (mean, var.iter().map(|v| 1.0 / (v / rows).sqrt().max(1e-6)).collect())
}

impl CutCache for LearnedCache {
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)> {
        if dim != self.row_len() || dim == 0 {
            return vec![(0, 0.0); features.len().checked_div(dim).unwrap_or(0)];
        }
        features
            .chunks_exact(dim)
            .map(|row| {
                let j = self.judge(row);
                let conf = match &self.gate {
                    _ if !j.known() => 0.0,
                    Some(g) => g.confidence(&j),
                    None => j.probs[j.class],
                };
                (j.id, conf)
            })
            .collect()
    }

    fn mem_bytes(&self) -> usize {
        4 * (self.mean.len()
            + self.inv_std.len()
            + self.w1.len()
            + self.b1.len()
            + self.weights.len()
            + self.bias.len()
            + self.ids.len()
            + self.prior_w.len()
            + self.centroids.len()
            + self.radius2.len())
            + self.gate.as_ref().map_or(0, Gate::mem_bytes)
    }

    fn kind(&self) -> &'static str {
        match &self.gate {
            None => "learned",
            Some(g) if g.reads() <= super::selector::OUTPUT_INPUTS => "learned+output-selector",
            Some(_) => "learned+features-selector",
        }
    }

    fn persist(&self) -> Option<super::Persisted> {
        Some(super::Persisted::Learned(self.clone()))
    }
}

/// Σ a·b in 8 lanes (vectorises; the order of the sum is fixed, so results repeat).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for ((s, a), b) in acc.iter_mut().zip(x).zip(y) {
            *s += a * b;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// y += a·x.
pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn clean(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

fn softmax(v: &mut [f32]) {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    v.iter_mut().for_each(|x| *x /= sum.max(f32::MIN_POSITIVE));
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn uniform(state: &mut u64) -> f32 {
    (next(state) >> 40) as f32 / (1u64 << 24) as f32
}

/// A uniform draw in [0, 1) from a xorshift state (tests elsewhere in `cache`).
#[cfg(test)]
pub(super) fn uniform_for_tests(state: &mut u64) -> f32 {
    uniform(state)
}

pub(super) fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        v.swap(i, (next(state) % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests;
