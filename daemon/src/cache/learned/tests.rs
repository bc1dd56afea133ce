//! Tests of the learned cache.

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
    let c = LearnedCache::fit(
        &Samples { features: &x, dim: 16, labels: &y, classes: 5, prior: false },
        &LearnedParams::default(),
    );
    let (tx, ty) = blobs(200, 16, 5, 99);
    let pred = c.predict(&tx, 16);
    let correct = pred.iter().zip(&ty).filter(|(p, y)| p.0 == **y).count();
    assert!(correct >= 195, "{correct}/200");
    let mean_conf: f32 = pred.iter().map(|p| p.1).sum::<f32>() / 200.0;
    assert!(mean_conf > 0.8, "{mean_conf}");
    // A point between all classes is less certain.
    let mid = vec![0.6f32; 16];
    assert!(c.predict(&mid, 16)[0].1 < mean_conf);
    assert_eq!(c.mem_bytes(), 4 * (16 + 16 + 16 * 5 + 5 + 5 + 5 + 5 * 16 + 5));
    // A row far from every class it was trained on is never a sure answer,
    // however confident the softmax is.
    let mut far = vec![0.0f32; 16];
    far[0] = 40.0;
    assert!(c.probabilities(&far).iter().any(|&p| p > 0.9), "the softmax alone is sure");
    assert_eq!(c.predict(&far, 16)[0].1, 0.0, "the novelty guard makes it a miss");
}

#[test]
fn hidden_layer_learns_what_a_linear_predictor_cannot() {
    // Class = whether the two coordinates share a sign (XOR of signs).
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut s = 5u64;
    for _ in 0..2000 {
        let a = uniform(&mut s) * 2.0 - 1.0;
        let b = uniform(&mut s) * 2.0 - 1.0;
        x.extend([a, b]);
        y.push(u32::from(a * b > 0.0));
    }
    let samples = Samples { features: &x, dim: 2, labels: &y, classes: 2, prior: false };
    let accuracy = |c: &LearnedCache| {
        let p = c.predict(&x, 2);
        p.iter().zip(&y).filter(|(p, y)| p.0 == **y).count() as f32 / y.len() as f32
    };
    let linear = LearnedCache::fit(&samples, &LearnedParams::default());
    let mlp = LearnedCache::fit(&samples, &LearnedParams { hidden: 16, ..LearnedParams::default() });
    assert!(accuracy(&linear) < 0.7, "linear {}", accuracy(&linear));
    assert!(accuracy(&mlp) > 0.9, "mlp {}", accuracy(&mlp));
    assert_eq!(mlp.mem_bytes(), 4 * (2 + 2 + 2 * 16 + 16 + 16 * 2 + 2 + 2 + 2 + 2 * 2 + 2));
    // It survives a serialisation round trip unchanged.
    let back: LearnedCache = serde_json::from_str(&serde_json::to_string(&mlp).unwrap()).unwrap();
    assert_eq!(back.predict(&x[..20], 2), mlp.predict(&x[..20], 2));
}

#[test]
fn answers_among_the_classes_it_saw_in_the_models_ids() {
    // Three of a 1000-class model's classes: three outputs, answered as model ids.
    let (x, y) = blobs(300, 8, 3, 3);
    let ids = [7u32, 421, 999];
    let y: Vec<u32> = y.iter().map(|&k| ids[k as usize]).collect();
    let c = LearnedCache::fit(
        &Samples { features: &x, dim: 8, labels: &y, classes: 1000, prior: false },
        &LearnedParams::default(),
    );
    assert_eq!(c.ids(), &ids);
    assert_eq!(c.mem_bytes(), 4 * (8 + 8 + 3 * 8 + 3 + 3 + 3 + 3 * 8 + 3), "3 outputs, not 1000");
    let pred = c.predict(&x, 8);
    let right = pred.iter().zip(&y).filter(|(p, y)| p.0 == **y).count();
    assert!(right >= 295, "{right}/300");
}

#[test]
fn learns_to_follow_the_stream_prior_where_the_features_cannot_tell() {
    // Two classes with identical (noise) features; the label is the stream's
    // previous answer 95 % of the time: the prior weight must carry it.
    let mut s = 9u64;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut label = 3u32;
    for _ in 0..2000 {
        let prev = label;
        if uniform(&mut s) < 0.05 {
            label = if label == 3 { 5 } else { 3 };
        }
        x.extend((0..4).map(|_| uniform(&mut s)));
        x.push((prev + 1) as f32);
        y.push(label);
    }
    let fit = |prior: bool| {
        let dim = if prior { 5 } else { 4 };
        let xs: Vec<f32> = x.chunks_exact(5).flat_map(|r| &r[..dim]).copied().collect();
        let c = LearnedCache::fit(
            &Samples { features: &xs, dim, labels: &y, classes: 10, prior },
            &LearnedParams::default(),
        );
        let p = c.predict(&xs, dim);
        p.iter().zip(&y).filter(|(p, y)| p.0 == **y).count()
    };
    let (with, without) = (fit(true), fit(false));
    assert!(with >= 1850, "with the prior: {with}/2000 right");
    assert!(without <= 1300, "features alone: {without}/2000 right");
    // A row without a previous answer (0) and an out-of-range one are just features.
    let c = LearnedCache::fit(
        &Samples { features: &x, dim: 5, labels: &y, classes: 10, prior: true },
        &LearnedParams::default(),
    );
    assert_eq!(c.judge(&[0.5, 0.5, 0.5, 0.5, 0.0]).prior, None);
    assert_eq!(c.judge(&[0.5, 0.5, 0.5, 0.5, f32::NAN]).prior, None);
    assert_eq!(c.judge(&[0.5, 0.5, 0.5, 0.5, 6.0]).prior, Some(5));
    assert_eq!(c.predict(&[0.5; 4], 4), vec![(0, 0.0)], "a row without its prior column is refused");
}

#[test]
fn empty_and_mismatched_inputs_do_not_panic() {
    let c = LearnedCache::fit(
        &Samples { features: &[], dim: 4, labels: &[], classes: 3, prior: false },
        &LearnedParams::default(),
    );
    assert_eq!(c.predict(&[1.0; 8], 4).len(), 2);
    assert_eq!(c.predict(&[1.0; 9], 3), vec![(0, 0.0); 3]);
    assert!(c.predict(&[f32::NAN; 4], 4)[0].1.is_finite());
}
