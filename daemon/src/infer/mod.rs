//! Inference: ONNX models cut into stages, their cost model, and the batcher
//! thread that runs them.
//!
//! Owns the ONNX Runtime sessions. The API layer hands it preprocessed
//! [`Job`]s through a [`ModelHandle`]; answers go back through each job's
//! [`batcher::Reply`].

pub mod batcher;
pub mod cost;
pub mod cuts;
mod exits;
pub mod gpu;
pub mod model;
pub mod onnx_graph;
pub mod pipeline;
pub mod preprocess;
pub mod registry;
pub mod runtime;

pub use batcher::{Job, JobResult, ModelHandle, Reply};
pub use model::{LoadedModel, ModelMeta};
pub use registry::Registry;

/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{0}")]
    RuntimeMissing(String),
    #[error("cannot read model {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Decode(#[from] onnx_graph::DecodeError),
    #[error(transparent)]
    Cut(#[from] cuts::CutError),
    #[error("ONNX Runtime failed {what}: {source}")]
    Ort {
        what: String,
        #[source]
        source: ort::Error,
    },
    #[error("{0}")]
    Shape(String),
    #[error("staged result differs from the whole model by {0:e} (cuts are wrong)")]
    StagedMismatch(f32),
    #[error("cannot start the batcher thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
}
