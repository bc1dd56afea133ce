//! Freeze Inference's approximate caches over pooled activations: `knn` and
//! `kmeans`, the non-learned baselines that learned caches must beat.
//!
//! Both first standardise every feature with the mean and standard deviation of
//! the rows they fit on (for `knn`, only the kept last `max_entries`), then apply a fixed random Gaussian projection (seeded, scaled by
//! `1/√out`) to `out = min(dim, reduce_to)` dimensions; when `dim <= reduce_to`
//! the projection is the identity and no matrix is stored.
//!
//! - [`KnnCache`] keeps the last `max_entries` reduced vectors with their labels
//!   and answers with an exact brute-force k-nearest-neighbour vote.
//! - [`KmeansCache`] keeps only centroids (k-means++ then Lloyd), each with the
//!   majority label of its members and that label's share.
//!
//! Promises: the same samples and seed give the same cache and the same answers;
//! nothing panics on malformed input (no rows at fit → `(0, 0.0)` for every row;
//! a query `dim` other than the fitted one → `(0, 0.0)` for every row; NaN
//! features read as 0 and values are clamped to ±1e15 so distances stay
//! finite); `predict` allocates its output plus a few scratch buffers per call,
//! never per row. Confidence is in `[0, 1]` for both kinds.

use super::{CutCache, Samples};

/// Added to neighbour distances before inverting them (Freeze Inference's 1/d).
const DIST_EPS: f32 = 1e-6;
/// Bound on any feature value after cleaning; keeps squared distances finite.
const CLAMP: f32 = 1e15;
/// Standard deviations at or below this count as constant features (scale 1).
const MIN_STD: f64 = 1e-6;

/// Parameters of a [`KnnCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnnParams {
    /// Neighbours consulted per lookup (0 is read as 1).
    pub k: usize,
    /// Dimensions kept by the random projection (0 is read as 1).
    pub reduce_to: usize,
    /// Most recent samples kept; older ones are dropped at fit.
    pub max_entries: usize,
    pub seed: u64,
}

impl Default for KnnParams {
    fn default() -> Self {
        Self { k: 5, reduce_to: 32, max_entries: 4096, seed: 1 }
    }
}

/// Parameters of a [`KmeansCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmeansParams {
    /// Centroids wanted; the fit uses at most `rows / 2` (and at least 1).
    pub clusters: usize,
    /// Dimensions kept by the random projection (0 is read as 1).
    pub reduce_to: usize,
    /// Most Lloyd updates; the fit stops earlier once no assignment changes.
    pub iterations: usize,
    pub seed: u64,
}

impl Default for KmeansParams {
    fn default() -> Self {
        Self { clusters: 64, reduce_to: 32, iterations: 25, seed: 1 }
    }
}

/// Exact k-NN over the stored, reduced vectors of recent samples.
///
/// Confidence (Freeze Inference): for each label `i` among the `k` nearest,
/// `C_i = S_i · Σ_{j: label i} 1/(d_j + 1e-6)` with `S_i = count_i / k`; the
/// answer is `argmax C_i` (ties go to the label of the nearer neighbour) and
/// its confidence is `C_max / Σ_i C_i · S_max`: 1 when all `k` agree. `k` is
/// the configured one even when fewer vectors are stored, so a cache holding
/// fewer than `k` vectors never reports 1. The score does not fall with
/// distance: a query far from everything whose neighbours agree scores 1.
#[derive(Debug, Clone)]
pub struct KnnCache {
    reducer: Reducer,
    k: usize,
    /// `labels.len() × reducer.out`, row-major.
    vectors: Vec<f32>,
    labels: Vec<u32>,
}

impl KnnCache {
    pub fn fit(s: &Samples<'_>, p: &KnnParams) -> Self {
        let (features, labels) = usable(s);
        let start = labels.len() - labels.len().min(p.max_entries);
        let (features, labels) = (&features[start * s.dim..], &labels[start..]);
        let reducer = Reducer::fit(features, s.dim, p.reduce_to, p.seed);
        let vectors = reducer.transform_all(features);
        Self { reducer, k: p.k.max(1), vectors, labels: labels.to_vec() }
    }

    /// The vote over `near` (sorted nearest first: squared distance, label).
    fn vote(&self, near: &[(f32, u32)], votes: &mut Vec<(u32, usize, f32)>) -> (u32, f32) {
        votes.clear();
        for &(d2, label) in near {
            let w = 1.0 / (d2.sqrt() + DIST_EPS);
            let i = votes.iter().position(|v| v.0 == label).unwrap_or(votes.len());
            if i == votes.len() {
                votes.push((label, 0, 0.0));
            }
            (votes[i].1, votes[i].2) = (votes[i].1 + 1, votes[i].2 + w);
        }
        let k = self.k as f32;
        let c = |&(_, count, inv_sum): &(u32, usize, f32)| count as f32 / k * inv_sum;
        let total: f32 = votes.iter().map(c).sum();
        let Some(&first) = votes.first() else { return (0, 0.0) };
        let best = votes.iter().fold(first, |best, v| if c(v) > c(&best) { *v } else { best });
        let conf = c(&best) / total * (best.1 as f32 / k);
        (best.0, if conf.is_finite() { conf.clamp(0.0, 1.0) } else { 0.0 })
    }
}

impl CutCache for KnnCache {
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)> {
        let rows = rows_of(features.len(), dim);
        if dim == 0 || dim != self.reducer.dim || self.labels.is_empty() {
            return vec![(0, 0.0); rows];
        }
        let width = self.reducer.out;
        let k = self.k.min(self.labels.len());
        let (mut z, mut q) = (vec![0.0; dim], vec![0.0; width]);
        let mut near: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        let mut votes = Vec::with_capacity(k);
        let mut result = Vec::with_capacity(rows);
        for row in features.chunks_exact(dim) {
            super::pace();
            self.reducer.apply(row, &mut z, &mut q);
            near.clear();
            for (v, &label) in self.vectors.chunks_exact(width).zip(&self.labels) {
                let d = dist2(&q, v);
                if near.len() == k && d >= near[k - 1].0 {
                    continue;
                }
                near.truncate(k - 1);
                let at = near.partition_point(|&(e, _)| e <= d);
                near.insert(at, (d, label));
            }
            result.push(self.vote(&near, &mut votes));
        }
        result
    }

    fn mem_bytes(&self) -> usize {
        self.reducer.mem_bytes() + self.vectors.len() * size_of::<f32>() + self.labels.len() * size_of::<u32>()
    }

    fn kind(&self) -> &'static str {
        "knn"
    }
}

/// Nearest-centroid lookup over k-means clusters of the reduced vectors.
///
/// Confidence: the centroid's majority share divided by `1 + d`, `d` the
/// Euclidean distance to it in the reduced space; so a pure cluster scores 1
/// only at its centre, and queries far from every centroid score near 0.
/// Clusters left without members are dropped at fit.
#[derive(Debug, Clone)]
pub struct KmeansCache {
    reducer: Reducer,
    /// `labels.len() × reducer.out`, row-major.
    centroids: Vec<f32>,
    labels: Vec<u32>,
    /// Share of each cluster's members carrying its label.
    shares: Vec<f32>,
}

impl KmeansCache {
    pub fn fit(s: &Samples<'_>, p: &KmeansParams) -> Self {
        let (features, labels) = usable(s);
        let reducer = Reducer::fit(features, s.dim, p.reduce_to, p.seed);
        let n = labels.len();
        if n == 0 {
            return Self { reducer, centroids: Vec::new(), labels: Vec::new(), shares: Vec::new() };
        }
        let width = reducer.out;
        let points = reducer.transform_all(features);
        let c = p.clusters.min(n / 2).max(1);
        let mut rng = Rng::new(p.seed ^ 0x6b6d_6561_6e73);
        let mut centroids = init_plus_plus(&points, width, c, &mut rng);
        let mut assign = vec![usize::MAX; n];
        let mut updates = 0;
        while assign_points(&points, &centroids, width, &mut assign) && updates < p.iterations {
            update_centroids(&points, &assign, &mut centroids, width);
            updates += 1;
        }
        let mut pairs: Vec<(usize, u32)> = assign.iter().copied().zip(labels.iter().copied()).collect();
        pairs.sort_unstable();
        let (mut kept, mut out_labels, mut shares) = (Vec::new(), Vec::new(), Vec::new());
        for members in pairs.chunk_by(|a, b| a.0 == b.0) {
            let cluster = members[0].0;
            let runs = members.chunk_by(|a, b| a.1 == b.1);
            let best = runs.fold((0, 0), |b, run| if run.len() > b.1 { (run[0].1, run.len()) } else { b });
            kept.extend_from_slice(&centroids[cluster * width..(cluster + 1) * width]);
            out_labels.push(best.0);
            shares.push(best.1 as f32 / members.len() as f32);
        }
        Self { reducer, centroids: kept, labels: out_labels, shares }
    }
}

impl CutCache for KmeansCache {
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)> {
        let rows = rows_of(features.len(), dim);
        if dim == 0 || dim != self.reducer.dim || self.labels.is_empty() {
            return vec![(0, 0.0); rows];
        }
        let (mut z, mut q) = (vec![0.0; dim], vec![0.0; self.reducer.out]);
        let mut result = Vec::with_capacity(rows);
        for row in features.chunks_exact(dim) {
            super::pace();
            self.reducer.apply(row, &mut z, &mut q);
            let (c, d2) = nearest(&q, &self.centroids, self.reducer.out);
            result.push((self.labels[c], (self.shares[c] / (1.0 + d2.sqrt())).clamp(0.0, 1.0)));
        }
        result
    }

    fn mem_bytes(&self) -> usize {
        let floats = self.centroids.len() + self.shares.len();
        self.reducer.mem_bytes() + floats * size_of::<f32>() + self.labels.len() * size_of::<u32>()
    }

    fn kind(&self) -> &'static str {
        "kmeans"
    }
}

/// Standardisation plus random projection, fitted on the training rows.
#[derive(Debug, Clone)]
struct Reducer {
    dim: usize,
    out: usize,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// `out × dim`, row-major; empty for the identity.
    proj: Vec<f32>,
}

impl Reducer {
    /// Fits on `features` (`rows × dim`); holds nothing when there are no rows.
    fn fit(features: &[f32], dim: usize, reduce_to: usize, seed: u64) -> Self {
        let out = dim.min(reduce_to.max(1));
        let n = rows_of(features.len(), dim);
        if n == 0 {
            return Self { dim, out, mean: Vec::new(), inv_std: Vec::new(), proj: Vec::new() };
        }
        let column = |i: usize| features[i..].iter().step_by(dim).map(|&x| f64::from(clean(x)));
        let mean: Vec<f64> = (0..dim).map(|i| column(i).sum::<f64>() / n as f64).collect();
        let std = |i: usize| (column(i).map(|x| (x - mean[i]).powi(2)).sum::<f64>() / n as f64).sqrt();
        let inv_std = (0..dim).map(std).map(|sd| if sd > MIN_STD { (1.0 / sd) as f32 } else { 1.0 }).collect();
        let (mut rng, scale) = (Rng::new(seed), 1.0 / (out as f64).sqrt());
        let proj = if out == dim { Vec::new() } else { (0..out * dim).map(|_| (rng.gauss() * scale) as f32).collect() };
        Self { dim, out, mean: mean.iter().map(|&m| m as f32).collect(), inv_std, proj }
    }

    /// Reduces `row` (`dim` long) into `out`, using `z` (`dim` long) as scratch.
    fn apply(&self, row: &[f32], z: &mut [f32], out: &mut [f32]) {
        for (((zi, &x), &m), &s) in z.iter_mut().zip(row).zip(&self.mean).zip(&self.inv_std) {
            *zi = clean((clean(x) - m) * s);
        }
        if self.proj.is_empty() {
            out.copy_from_slice(z);
            return;
        }
        for (o, p) in out.iter_mut().zip(self.proj.chunks_exact(self.dim)) {
            *o = clean(lanes(p, z, |a, b| a * b));
        }
    }

    fn transform_all(&self, features: &[f32]) -> Vec<f32> {
        let (mut all, mut z) = (vec![0.0; rows_of(features.len(), self.dim) * self.out], vec![0.0; self.dim]);
        for (row, out) in features.chunks_exact(self.dim.max(1)).zip(all.chunks_exact_mut(self.out.max(1))) {
            self.apply(row, &mut z, out);
        }
        all
    }

    fn mem_bytes(&self) -> usize {
        (self.mean.len() + self.inv_std.len() + self.proj.len()) * size_of::<f32>()
    }
}

/// k-means++ seeding: `c` centroids drawn with probability ∝ squared distance.
fn init_plus_plus(points: &[f32], width: usize, c: usize, rng: &mut Rng) -> Vec<f32> {
    let n = points.len() / width;
    let first = rng.below(n);
    let mut centroids = Vec::with_capacity(c * width);
    centroids.extend_from_slice(&points[first * width..(first + 1) * width]);
    let mut d2: Vec<f32> = points.chunks_exact(width).map(|p| dist2(p, &centroids[..width])).collect();
    while centroids.len() < c * width {
        let total: f64 = d2.iter().map(|&d| f64::from(d)).sum();
        let pick = if total > 0.0 && total.is_finite() {
            let (r, mut acc) = (rng.unit() * total, 0.0);
            let last = d2.iter().rposition(|&d| d > 0.0).unwrap_or(0);
            let above = |&d: &f32| {
                acc += f64::from(d);
                acc > r
            };
            d2.iter().position(above).unwrap_or(last)
        } else {
            rng.below(n)
        };
        let start = centroids.len();
        centroids.extend_from_slice(&points[pick * width..(pick + 1) * width]);
        let newest = &centroids[start..];
        for (d, p) in d2.iter_mut().zip(points.chunks_exact(width)) {
            *d = d.min(dist2(p, newest));
        }
    }
    centroids
}

/// Assigns every point to its nearest centroid; true if any assignment changed.
fn assign_points(points: &[f32], centroids: &[f32], width: usize, assign: &mut [usize]) -> bool {
    let mut changed = false;
    for (a, p) in assign.iter_mut().zip(points.chunks_exact(width)) {
        let best = nearest(p, centroids, width).0;
        changed |= *a != best;
        *a = best;
    }
    changed
}

/// Moves each centroid to its members' mean; a centroid without members stays.
fn update_centroids(points: &[f32], assign: &[usize], centroids: &mut [f32], width: usize) {
    let c = centroids.len() / width;
    let (mut sums, mut counts) = (vec![0f64; c * width], vec![0usize; c]);
    for (&a, p) in assign.iter().zip(points.chunks_exact(width)) {
        counts[a] += 1;
        sums[a * width..(a + 1) * width].iter_mut().zip(p).for_each(|(s, &x)| *s += f64::from(x));
    }
    for ((cent, sum), &count) in centroids.chunks_exact_mut(width).zip(sums.chunks_exact(width)).zip(&counts) {
        if count > 0 {
            cent.iter_mut().zip(sum).for_each(|(c, &s)| *c = (s / count as f64) as f32);
        }
    }
}

/// Index of and squared distance to the nearest of `centroids` (non-empty).
fn nearest(q: &[f32], centroids: &[f32], width: usize) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (i, c) in centroids.chunks_exact(width).enumerate() {
        let d = dist2(q, c);
        if d < best.1 {
            best = (i, d);
        }
    }
    best
}

fn dist2(a: &[f32], b: &[f32]) -> f32 {
    lanes(a, b, |x, y| (x - y) * (x - y))
}

/// `Σ f(a_i, b_i)` over 8 independent accumulators, so the loop vectorises.
fn lanes(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(x, y)).sum();
    let mut acc = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        acc.iter_mut().zip(x.iter().zip(y)).for_each(|(s, (&x, &y))| *s += f(x, y));
    }
    acc.iter().sum::<f32>() + tail
}

/// NaN reads as 0; everything else is clamped to ±[`CLAMP`].
fn clean(x: f32) -> f32 {
    (if x.is_nan() { 0.0 } else { x }).clamp(-CLAMP, CLAMP)
}

/// Whole rows of width `dim` in a buffer of `len` values (0 for `dim == 0`).
fn rows_of(len: usize, dim: usize) -> usize {
    len.checked_div(dim).unwrap_or(0)
}

/// The complete rows that have both features and a label.
fn usable<'a>(s: &Samples<'a>) -> (&'a [f32], &'a [u32]) {
    let n = s.labels.len().min(rows_of(s.features.len(), s.dim));
    (&s.features[..n * s.dim], &s.labels[..n])
}

/// xorshift64* seeded through SplitMix64, with Box-Muller normals.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box-Muller; the second value is discarded).
    fn gauss(&mut self) -> f64 {
        let (u1, u2) = (1.0 - self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 64;
    const CLASSES: usize = 10;

    /// Ten class centres ~ N(0, 3²) per dimension, 2000 training rows (centre
    /// + N(0, 1) noise) and the generator, ready to draw more.
    struct World {
        centres: Vec<f32>,
        x: Vec<f32>,
        y: Vec<u32>,
        rng: Rng,
    }

    fn world() -> World {
        let mut rng = Rng::new(7);
        let centres = (0..CLASSES * DIM).map(|_| (rng.gauss() * 3.0) as f32).collect();
        let mut w = World { centres, x: Vec::new(), y: Vec::new(), rng };
        (w.x, w.y) = w.draw(2000);
        w
    }

    impl World {
        fn around(&mut self, centre: &[f32], out: &mut Vec<f32>) {
            out.extend(centre.iter().map(|&c| c + self.rng.gauss() as f32));
        }

        fn centre(&self, c: usize) -> Vec<f32> {
            self.centres[c * DIM..(c + 1) * DIM].to_vec()
        }

        fn draw(&mut self, rows: usize) -> (Vec<f32>, Vec<u32>) {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            for _ in 0..rows {
                let c = self.rng.below(CLASSES);
                self.around(&self.centre(c), &mut x);
                y.push(c as u32);
            }
            (x, y)
        }

        fn samples(&self, rows: usize) -> Samples<'_> {
            Samples {
                features: &self.x[..rows * DIM],
                dim: DIM,
                labels: &self.y[..rows],
                classes: CLASSES,
                prior: false,
            }
        }

        /// Accuracy on 500 fresh rows, mean confidence on the correct ones, on
        /// rows midway between two classes and on rows of a far, unseen class.
        fn evaluate(&mut self, cache: &dyn CutCache) -> (f32, f32, f32, f32) {
            let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
            let (x, y) = self.draw(500);
            let got = cache.predict(&x, DIM);
            let right: Vec<f32> = got.iter().zip(&y).filter(|(g, y)| g.0 == **y).map(|(g, _)| g.1).collect();
            let far: Vec<f32> = (0..DIM).map(|_| (self.rng.gauss() * 12.0) as f32).collect();
            let (mut between, mut unseen) = (Vec::new(), Vec::new());
            for i in 0..200 {
                let (a, b) = (self.centre(i % CLASSES), self.centre((i + 1 + i / 40) % CLASSES));
                self.around(&a.iter().zip(&b).map(|(p, q)| (p + q) / 2.0).collect::<Vec<_>>(), &mut between);
                self.around(&far, &mut unseen);
            }
            let conf = |x: &[f32]| mean(&cache.predict(x, DIM).iter().map(|g| g.1).collect::<Vec<_>>());
            (right.len() as f32 / 500.0, mean(&right), conf(&between), conf(&unseen))
        }
    }

    #[test]
    fn knn_separates_clusters_and_is_less_sure_between_them() {
        let mut w = world();
        let cache = KnnCache::fit(&w.samples(2000), &KnnParams::default());
        let (acc, right, between, unseen) = w.evaluate(&cache);
        assert!(acc > 0.95, "accuracy {acc}");
        // No claim about `unseen`: agreeing neighbours score 1 at any distance.
        assert!(right > between, "correct {right} vs between {between}, unseen {unseen}");
    }

    #[test]
    fn kmeans_separates_clusters_and_is_less_sure_off_them() {
        let mut w = world();
        let cache = KmeansCache::fit(&w.samples(2000), &KmeansParams::default());
        assert_eq!(cache.labels.len(), 64);
        let (acc, right, between, unseen) = w.evaluate(&cache);
        assert!(acc > 0.95, "accuracy {acc}");
        assert!(right > between && right > unseen, "correct {right} vs between {between}, unseen {unseen}");
    }

    #[test]
    fn knn_stored_vector_gets_its_label_with_full_confidence() {
        let w = world();
        let cache = KnnCache::fit(&w.samples(2000), &KnnParams::default());
        for i in [0, 17, 1999] {
            assert_eq!(cache.predict(&w.x[i * DIM..(i + 1) * DIM], DIM), vec![(w.y[i], 1.0)]);
        }
        // Two labels on nearly the same point: the neighbours disagree, so below 1.
        let x: Vec<f32> = (0..6).flat_map(|i| [i as f32 * 0.01; 4]).collect();
        let s = Samples { features: &x, dim: 4, labels: &[1, 1, 1, 2, 2, 2], classes: 3, prior: false };
        let got = KnnCache::fit(&s, &KnnParams::default()).predict(&x[..4], 4);
        assert!(got[0].0 == 1 && got[0].1 > 0.0 && got[0].1 < 1.0, "{got:?}");
    }

    #[test]
    fn knn_keeps_the_most_recent_entries() {
        let x = vec![1.0f32; 10 * DIM];
        let y = [7, 7, 7, 7, 7, 3, 3, 3, 3, 3];
        let s = Samples { features: &x, dim: DIM, labels: &y, classes: CLASSES, prior: false };
        let cache = KnnCache::fit(&s, &KnnParams { max_entries: 5, ..KnnParams::default() });
        assert_eq!(cache.labels, vec![3; 5]);
        assert_eq!(cache.predict(&x[..DIM], DIM), vec![(3, 1.0)]);
    }

    #[test]
    fn empty_fit_mismatched_dim_and_nan_are_handled() {
        let empty = Samples { features: &[], dim: DIM, labels: &[], classes: CLASSES, prior: false };
        let both = |s: &Samples<'_>| -> [Box<dyn CutCache>; 2] {
            [Box::new(KnnCache::fit(s, &KnnParams::default())), Box::new(KmeansCache::fit(s, &KmeansParams::default()))]
        };
        assert_eq!(both(&empty).map(|c| c.kind()), ["knn", "kmeans"]);
        for cache in both(&empty) {
            assert_eq!(cache.predict(&[0.5; 3 * DIM], DIM), vec![(0, 0.0); 3]);
            assert_eq!(cache.mem_bytes(), 0);
        }
        let w = world();
        let mut bad = w.x[..200 * DIM].to_vec();
        (bad[5], bad[DIM + 1], bad[2 * DIM + 2]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        let s = Samples { features: &bad, dim: DIM, labels: &w.y[..200], classes: CLASSES, prior: false };
        for cache in both(&s) {
            assert_eq!(cache.predict(&w.x[..2 * DIM], DIM - 1), vec![(0, 0.0); 2]);
            assert_eq!(cache.predict(&w.x[..DIM], 0), vec![]);
            let got = cache.predict(&bad[..3 * DIM], DIM);
            assert!(got.len() == 3 && got.iter().all(|g| (0.0..=1.0).contains(&g.1)), "{} {got:?}", cache.kind());
            assert_eq!(cache.predict(&w.x[DIM..2 * DIM], DIM)[0].0, w.y[1], "{}", cache.kind());
        }
        // Fewer labels than feature rows, and a ragged tail: only whole labelled rows count.
        let s = Samples { features: &w.x[..10 * DIM + 3], dim: DIM, labels: &w.y[..4], classes: CLASSES, prior: false };
        assert_eq!(KnnCache::fit(&s, &KnnParams::default()).labels.len(), 4);
        assert_eq!(KmeansCache::fit(&s, &KmeansParams::default()).labels.len(), 2);
        let one = KmeansCache::fit(&w.samples(1), &KmeansParams::default());
        assert_eq!(one.predict(&w.x[..DIM], DIM), vec![(w.y[0], 1.0)]);
    }

    #[test]
    fn mem_bytes_follow_what_is_stored() {
        let w = world();
        let knn = |n: usize| KnnCache::fit(&w.samples(n), &KnnParams::default()).mem_bytes();
        let kmeans = |n: usize| KmeansCache::fit(&w.samples(n), &KmeansParams::default()).mem_bytes();
        assert!(knn(100) < knn(1000) && knn(1000) < knn(2000));
        assert!(kmeans(20) < kmeans(100) && kmeans(100) < kmeans(1000));
        // Stored vectors alone are n × 32 × 4 bytes; k-means keeps 64 centroids
        // (50 at n = 100, where the projection matrix makes it larger than that).
        for n in [100, 1000, 2000] {
            assert!(knn(n) >= n * 32 * 4 && kmeans(n) < knn(n), "{n}");
        }
        assert!(kmeans(1000) < 1000 * 32 * 4 && kmeans(2000) < 2000 * 32 * 4);
        let capped = KnnCache::fit(&w.samples(2000), &KnnParams { max_entries: 100, ..KnnParams::default() });
        assert_eq!(capped.mem_bytes(), knn(100));
    }

    #[test]
    fn same_seed_same_answers() {
        let w = world();
        let q = &w.x[..300 * DIM];
        let knn = |seed| KnnCache::fit(&w.samples(2000), &KnnParams { seed, ..KnnParams::default() }).predict(q, DIM);
        let kmeans = |seed| {
            KmeansCache::fit(&w.samples(2000), &KmeansParams { seed, ..KmeansParams::default() }).predict(q, DIM)
        };
        let bits = |v: Vec<(u32, f32)>| v.into_iter().map(|(c, f)| (c, f.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(knn(3)), bits(knn(3)));
        assert_eq!(bits(kmeans(3)), bits(kmeans(3)));
        assert_ne!(bits(kmeans(3)), bits(kmeans(4)));
    }
}
