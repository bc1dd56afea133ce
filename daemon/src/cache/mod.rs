//! Caches after hidden layers: given the pooled activation of a row at a cut,
//! guess the model's final answer and say how sure the guess is.
//!
//! Owns the cache kinds (`learned`: a small trained predictor; `knn` and
//! `kmeans`: Freeze Inference's approximate caches, the baselines), the window
//! of recent traffic they are trained on, and threshold tuning under the
//! operator's accuracy budget. The batcher consults a [`CutCache`] after each
//! stage; rows whose confidence reaches the cut's threshold exit there.

pub mod knn;
pub mod learned;
pub mod model_caches;
pub mod placement;
pub mod policy;
pub mod selector;
pub mod store;
pub mod train;

/// A cache at one cut.
pub trait CutCache: Send + Sync {
    /// For each row of `features` (`rows × dim`, row-major): the guessed class
    /// and a confidence score. Larger means surer; scores are only compared with
    /// thresholds tuned on the same cache, so their scale is the cache's own.
    fn predict(&self, features: &[f32], dim: usize) -> Vec<(u32, f32)>;

    /// Bytes of state the cache holds (weights, stored vectors, centroids).
    fn mem_bytes(&self) -> usize;

    /// Short name of the kind, for metrics and reports.
    fn kind(&self) -> &'static str;

    /// The cache's state to save across restarts; `None` when it is rebuilt
    /// from the saved window instead.
    fn persist(&self) -> Option<Persisted> {
        None
    }
}

/// A cache's saved state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Persisted {
    Learned(learned::LearnedCache),
}

impl Persisted {
    /// The cache again, ready to serve.
    pub fn into_cache(self) -> std::sync::Arc<dyn CutCache> {
        match self {
            Self::Learned(c) => std::sync::Arc::new(c),
        }
    }
}

/// Training data for one cut: pooled features and the full model's answers.
#[derive(Debug, Clone, Copy)]
pub struct Samples<'a> {
    /// `rows × dim`, row-major.
    pub features: &'a [f32],
    pub dim: usize,
    /// The full model's class for each row.
    pub labels: &'a [u32],
    pub classes: usize,
    /// Each row's last column is the stream prior (the stream's previous
    /// answer: model class + 1, 0 for none), not a feature.
    pub prior: bool,
}

impl Samples<'_> {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}

thread_local! {
    /// This thread's CPU share while training and when it last rested.
    static PACE: std::cell::Cell<Option<(f32, std::time::Instant)>> = const { std::cell::Cell::new(None) };
}

/// Bounds the calling thread's CPU share from now on (the trainer calls this
/// once): [`pace`] then rests in proportion to the work since the last rest.
pub fn set_pace(share: f32) {
    PACE.with(|p| p.set(Some((share.clamp(0.01, 1.0), std::time::Instant::now()))));
}

/// Called often from training loops: after each ~100 µs of work, sleeps long
/// enough to hold the thread's share. Fine-grained on purpose: a trainer that
/// holds a core for hundreds of milliseconds (even at SCHED_IDLE) leaves a
/// request woken behind a kernel thread on the other core nowhere to go
/// (measured on 2 vCPUs: serving p99 0.6 → 2.8 ms unpaced, ×1.05–1.42 with a
/// 250 µs quantum, ×0.9–1.16 with 100 µs). No-op on other threads.
pub fn pace() {
    PACE.with(|p| {
        let Some((share, since)) = p.get() else { return };
        let worked = since.elapsed();
        if worked < std::time::Duration::from_micros(100) {
            return;
        }
        if share < 1.0 {
            std::thread::sleep(worked.mul_f32(1.0 / share - 1.0));
        }
        p.set(Some((share, std::time::Instant::now())));
    });
}
