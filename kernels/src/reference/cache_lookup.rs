//! The fused cache lookup (`cu/cache_lookup.cu`): a learned cache's predictor
//! (standardisation, optional hidden ReLU layer, linear head), softmax, first
//! argmax, the novelty guard and the threshold, per row.

use super::check_len;
use crate::KernelError;

/// A learned cache's parameters, row-major (`weight`: `classes × width`,
/// width = `hidden` or `dim`; `w1`: `hidden × dim`; `centroids`: `classes × dim`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheHead<'a> {
    pub dim: usize,
    pub classes: usize,
    /// Hidden ReLU units; 0 = softmax regression (`w1`, `b1` empty).
    pub hidden: usize,
    /// Standardisation `(x − mean) · inv_std`; both or neither.
    pub mean: Option<&'a [f32]>,
    pub inv_std: Option<&'a [f32]>,
    pub w1: &'a [f32],
    pub b1: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    /// Novelty guard: per-class centroid of standardised rows and squared radius
    /// (negative: class never seen). Both or neither.
    pub centroids: Option<&'a [f32]>,
    pub radius2: Option<&'a [f32]>,
}

/// One row's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lookup {
    pub hit: bool,
    pub class: u32,
    /// The guessed class's probability, 0 when the novelty guard refuses it.
    pub conf: f32,
}

impl CacheHead<'_> {
    /// Checks every buffer against `dim`, `hidden` and `classes`.
    pub fn check(&self) -> Result<(), KernelError> {
        if self.dim == 0 || self.classes == 0 {
            return Err(KernelError::Shape("a cache head needs dim > 0 and classes > 0".into()));
        }
        let width = if self.hidden > 0 { self.hidden } else { self.dim };
        check_len("weight", self.weight.len(), self.classes * width)?;
        check_len("bias", self.bias.len(), self.classes)?;
        check_len("w1", self.w1.len(), self.hidden * self.dim)?;
        check_len("b1", self.b1.len(), self.hidden)?;
        match (self.mean, self.inv_std) {
            (Some(m), Some(s)) => {
                check_len("mean", m.len(), self.dim)?;
                check_len("inv_std", s.len(), self.dim)?;
            }
            (None, None) => {}
            _ => return Err(KernelError::Shape("mean and inv_std come together".into())),
        }
        match (self.centroids, self.radius2) {
            (Some(c), Some(r)) => {
                check_len("centroids", c.len(), self.classes * self.dim)?;
                check_len("radius2", r.len(), self.classes)?;
            }
            (None, None) => {}
            _ => return Err(KernelError::Shape("centroids and radius2 come together".into())),
        }
        Ok(())
    }
}

/// Looks up `rows` feature rows (`features[r·stride ..][..dim]`); with `probs`,
/// also writes each row's probabilities (`rows × classes`).
pub fn cache_lookup(
    features: &[f32],
    stride: usize,
    rows: usize,
    head: &CacheHead<'_>,
    threshold: f32,
    mut probs: Option<&mut [f32]>,
) -> Result<Vec<Lookup>, KernelError> {
    head.check()?;
    if stride < head.dim || (rows > 0 && features.len() < (rows - 1) * stride + head.dim) {
        return Err(KernelError::Shape(format!(
            "{} feature values with stride {stride} do not hold {rows} rows of {}",
            features.len(),
            head.dim
        )));
    }
    if let Some(p) = &probs {
        check_len("probs", p.len(), rows * head.classes)?;
    }
    let dot = |w: &[f32], x: &[f32]| w.iter().zip(x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
    let mut out = Vec::with_capacity(rows);
    for r in 0..rows {
        let f = &features[r * stride..r * stride + head.dim];
        let z: Vec<f32> = f
            .iter()
            .enumerate()
            .map(|(d, &v)| {
                let v = if v.is_finite() { v } else { 0.0 };
                match (head.mean, head.inv_std) {
                    (Some(m), Some(s)) => (v - m[d]) * s[d],
                    _ => v,
                }
            })
            .collect();
        let h: Vec<f32> = (0..head.hidden)
            .map(|j| ((f64::from(head.b1[j]) + dot(&head.w1[j * head.dim..(j + 1) * head.dim], &z)) as f32).max(0.0))
            .collect();
        let input = if head.hidden > 0 { &h } else { &z };
        let width = input.len();
        let logits: Vec<f64> = (0..head.classes)
            .map(|k| f64::from(head.bias[k]) + dot(&head.weight[k * width..(k + 1) * width], input))
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
        let total: f64 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|&v| (v / total) as f32).collect();
        let (class, best) = p.iter().enumerate().fold((0, -1.0f32), |b, (k, &v)| if v > b.1 { (k, v) } else { b });
        let mut conf = best;
        if let (Some(c), Some(r2)) = (head.centroids, head.radius2) {
            let cen = &c[class * head.dim..(class + 1) * head.dim];
            let d2: f64 = z.iter().zip(cen).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
            if r2[class] < 0.0 || d2 > f64::from(r2[class]) {
                conf = 0.0;
            }
        }
        if let Some(out) = probs.as_mut() {
            out[r * head.classes..(r + 1) * head.classes].copy_from_slice(&p);
        }
        out.push(Lookup { hit: conf >= threshold, class: class as u32, conf });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head<'a>(weight: &'a [f32], bias: &'a [f32]) -> CacheHead<'a> {
        CacheHead { dim: 2, classes: 2, weight, bias, ..Default::default() }
    }

    #[test]
    fn linear_head_softmax_argmax_threshold() {
        // class 0 scores x0, class 1 scores x1.
        let h = head(&[1.0, 0.0, 0.0, 1.0], &[0.0, 0.0]);
        let feats = [3.0, 0.0, 0.0, 0.1, 0.0, 0.0];
        let mut probs = [0.0; 6];
        let out = cache_lookup(&feats, 2, 3, &h, 0.9, Some(&mut probs)).unwrap();
        let p0 = 1.0 / (1.0 + (-3.0f32).exp());
        assert_eq!(out[0].class, 0);
        assert!((out[0].conf - p0).abs() < 1e-6 && out[0].hit);
        assert_eq!(out[1].class, 1);
        assert!(!out[1].hit);
        // A tie: the first class wins, with probability one half.
        assert_eq!(out[2], Lookup { hit: false, class: 0, conf: 0.5 });
        assert!((probs[0] + probs[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn standardisation_hidden_layer_and_non_finite_features() {
        let mean = [1.0, 1.0];
        let inv = [2.0, 2.0];
        // hidden unit j copies z_j; head as identity.
        let h = CacheHead {
            dim: 2,
            classes: 2,
            hidden: 2,
            mean: Some(&mean),
            inv_std: Some(&inv),
            w1: &[1.0, 0.0, 0.0, 1.0],
            b1: &[0.0, 0.0],
            weight: &[1.0, 0.0, 0.0, 1.0],
            bias: &[0.0, 0.0],
            ..Default::default()
        };
        // z = (2-1)·2 = 2, (NaN→0 - 1)·2 = -2 → h = [2, 0] → class 0.
        let out = cache_lookup(&[2.0, f32::NAN], 2, 1, &h, 0.5, None).unwrap();
        assert_eq!(out[0].class, 0);
        let want = 1.0 / (1.0 + (-2.0f32).exp());
        assert!((out[0].conf - want).abs() < 1e-6);
    }

    #[test]
    fn novelty_guard_turns_far_rows_and_unseen_classes_into_misses() {
        let cen = [5.0, 0.0, 0.0, 5.0];
        let h =
            CacheHead { centroids: Some(&cen), radius2: Some(&[1.0, -1.0]), ..head(&[1.0, 0.0, 0.0, 1.0], &[0.0; 2]) };
        let out = cache_lookup(&[5.5, 0.0, 9.0, 0.0, 0.0, 5.0], 2, 3, &h, 0.5, None).unwrap();
        assert!(out[0].hit, "within the radius");
        assert_eq!((out[1].class, out[1].conf, out[1].hit), (0, 0.0, false), "too far");
        assert_eq!((out[2].class, out[2].conf), (1, 0.0), "class never seen");
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(cache_lookup(&[0.0; 4], 2, 2, &head(&[1.0; 3], &[0.0; 2]), 0.5, None).is_err());
        assert!(cache_lookup(&[0.0; 3], 2, 2, &head(&[1.0; 4], &[0.0; 2]), 0.5, None).is_err());
        let no_std = CacheHead { mean: Some(&[0.0, 0.0]), ..head(&[1.0; 4], &[0.0; 2]) };
        assert!(cache_lookup(&[0.0; 4], 2, 2, &no_std, 0.5, None).is_err());
    }
}
