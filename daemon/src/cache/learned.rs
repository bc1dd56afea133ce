//! The learned cache: a softmax-regression predictor on standardised pooled
//! features, trained on the full model's answers; its confidence is the
//! predicted class's probability (max-softmax selector).

use super::{CutCache, Samples};

/// Training settings.
#[derive(Debug, Clone)]
pub struct LearnedParams {
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub l2: f32,
    pub seed: u64,
}

impl Default for LearnedParams {
    fn default() -> Self {
        Self { epochs: 30, batch: 32, learning_rate: 0.05, l2: 1e-4, seed: 1 }
    }
}

/// A trained predictor for one cut.
#[derive(Debug, Clone)]
pub struct LearnedCache {
    dim: usize,
    classes: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `dim × classes`, row-major by input dimension.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl LearnedCache {
    /// Fits on `s` with mini-batch SGD (momentum 0.9) on the cross-entropy.
    pub fn fit(s: &Samples<'_>, p: &LearnedParams) -> Self {
        let (dim, classes, rows) = (s.dim, s.classes.max(1), s.rows());
        let mut mean = vec![0f32; dim];
        let mut var = vec![0f32; dim];
        for i in 0..rows {
            for (m, &x) in mean.iter_mut().zip(s.row(i)) {
                *m += clean(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows.max(1) as f32);
        for i in 0..rows {
            for ((v, &x), m) in var.iter_mut().zip(s.row(i)).zip(&mean) {
                *v += (clean(x) - m).powi(2);
            }
        }
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v / rows.max(1) as f32).sqrt().max(1e-6)).collect();
        let mut cache =
            Self { dim, classes, mean, inv_std, weights: vec![0.0; dim * classes], bias: vec![0.0; classes] };
        if rows == 0 {
            return cache;
        }
        let xs: Vec<f32> = (0..rows).flat_map(|i| cache.standardise(s.row(i))).collect();
        let mut vel_w = vec![0f32; dim * classes];
        let mut vel_b = vec![0f32; classes];
        let mut order: Vec<usize> = (0..rows).collect();
        let mut rng = p.seed.max(1);
        let mut grad_w = vec![0f32; dim * classes];
        let mut grad_b = vec![0f32; classes];
        let mut probs = vec![0f32; classes];
        for epoch in 0..p.epochs {
            shuffle(&mut order, &mut rng);
            let lr = p.learning_rate / (1.0 + epoch as f32 * 0.1);
            for chunk in order.chunks(p.batch.max(1)) {
                grad_w.fill(0.0);
                grad_b.fill(0.0);
                for &r in chunk {
                    let x = &xs[r * dim..(r + 1) * dim];
                    cache.logits_into(x, &mut probs);
                    softmax(&mut probs);
                    probs[s.labels[r] as usize % classes] -= 1.0;
                    for (d, &xv) in x.iter().enumerate() {
                        let g = &mut grad_w[d * classes..(d + 1) * classes];
                        for (gk, pk) in g.iter_mut().zip(&probs) {
                            *gk += xv * pk;
                        }
                    }
                    for (gb, pk) in grad_b.iter_mut().zip(&probs) {
                        *gb += pk;
                    }
                }
                let scale = 1.0 / chunk.len() as f32;
                for ((w, v), g) in cache.weights.iter_mut().zip(vel_w.iter_mut()).zip(&grad_w) {
                    *v = 0.9 * *v - lr * (g * scale + p.l2 * *w);
                    *w += *v;
                }
                for ((b, v), g) in cache.bias.iter_mut().zip(vel_b.iter_mut()).zip(&grad_b) {
                    *v = 0.9 * *v - lr * g * scale;
                    *b += *v;
                }
            }
        }
        cache
    }

    fn standardise(&self, row: &[f32]) -> Vec<f32> {
        row.iter().zip(&self.mean).zip(&self.inv_std).map(|((&x, m), s)| (clean(x) - m) * s).collect()
    }

    fn logits_into(&self, x: &[f32], out: &mut [f32]) {
        out.copy_from_slice(&self.bias);
        for (d, &xv) in x.iter().enumerate() {
            for (o, w) in out.iter_mut().zip(&self.weights[d * self.classes..(d + 1) * self.classes]) {
                *o += xv * w;
            }
        }
    }

    /// Class probabilities for one raw (unstandardised) feature row.
    pub fn probabilities(&self, row: &[f32]) -> Vec<f32> {
        let mut p = vec![0f32; self.classes];
        if row.len() == self.dim {
            self.logits_into(&self.standardise(row), &mut p);
        }
        softmax(&mut p);
        p
    }
}

impl CutCache for LearnedCache {
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)> {
        if dim != self.dim || dim == 0 {
            return vec![(0, 0.0); features.len().checked_div(dim).unwrap_or(0)];
        }
        features
            .chunks_exact(dim)
            .map(|row| {
                let p = self.probabilities(row);
                let (k, v) = p.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                (k as u32, v)
            })
            .collect()
    }

    fn mem_bytes(&self) -> usize {
        4 * (self.mean.len() + self.inv_std.len() + self.weights.len() + self.bias.len())
    }

    fn kind(&self) -> &'static str {
        "learned"
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

fn shuffle(v: &mut [usize], state: &mut u64) {
    for i in (1..v.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        v.swap(i, (*state % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gaussian blobs: class k centred at e_k × 3 in `dim` dims.
    fn blobs(rows: usize, dim: usize, classes: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut s = seed;
        let mut noise = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..rows {
            let k = i % classes;
            for d in 0..dim {
                x.push(if d == k { 3.0 } else { 0.0 } + noise());
            }
            y.push(k as u32);
        }
        (x, y)
    }

    #[test]
    fn learns_separable_classes_and_is_sure_of_them() {
        let (x, y) = blobs(600, 16, 5, 7);
        let c =
            LearnedCache::fit(&Samples { features: &x, dim: 16, labels: &y, classes: 5 }, &LearnedParams::default());
        let (tx, ty) = blobs(200, 16, 5, 99);
        let pred = c.predict(&tx, 16);
        let correct = pred.iter().zip(&ty).filter(|(p, y)| p.0 == **y).count();
        assert!(correct >= 195, "{correct}/200");
        let mean_conf: f32 = pred.iter().map(|p| p.1).sum::<f32>() / 200.0;
        assert!(mean_conf > 0.8, "{mean_conf}");
        // A point between all classes is less certain.
        let mid = vec![0.6f32; 16];
        assert!(c.predict(&mid, 16)[0].1 < mean_conf);
        assert_eq!(c.mem_bytes(), 4 * (16 + 16 + 16 * 5 + 5));
    }

    #[test]
    fn empty_and_mismatched_inputs_do_not_panic() {
        let c =
            LearnedCache::fit(&Samples { features: &[], dim: 4, labels: &[], classes: 3 }, &LearnedParams::default());
        assert_eq!(c.predict(&[1.0; 8], 4).len(), 2);
        assert_eq!(c.predict(&[1.0; 9], 3), vec![(0, 0.0); 3]);
        assert!(c.predict(&[f32::NAN; 4], 4)[0].1.is_finite());
    }
}
