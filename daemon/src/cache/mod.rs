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
}

impl Samples<'_> {
    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}
