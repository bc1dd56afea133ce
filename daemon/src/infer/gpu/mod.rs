//! The GPU executor: ONNX graphs lowered to cuDNN / cuBLAS calls and gati's
//! kernels (`kernels/`), run on one CUDA device per model.
//!
//! - [`graph`]: the typed ONNX view (attributes, initializers).
//! - [`lower`]: graph → [`plan::Plan`] (BN folding, fused epilogues, aliases).
//! - [`cpu_exec`]: the plan run on the CPU (the reference).
//! - [`exec`]: the plan run on a device (needs a GPU; compiled everywhere).
//! - [`stages`]: the device plan cut into stages behind the pipeline's interface.
//! - [`placement`]: where a `backend = "cuda"` model goes on this node — its
//!   device, or the CPU when `fallback = "cpu"`, or a clear load error.

pub mod cpu_exec;
pub mod exec;
pub mod graph;
pub mod lower;
pub mod placement;
pub mod plan;
pub mod stages;

#[cfg(test)]
mod tests;

pub use placement::{place, Placement};

/// Errors of the GPU path.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The model's device cannot be used here.
    #[error(
        "model `{model}` wants CUDA device {device}: {reason}; set fallback = \"cpu\" in its [[models]] entry to serve it on the CPU instead"
    )]
    Unavailable { model: String, device: usize, reason: String },
    /// A node the lowering does not handle.
    #[error("the GPU executor cannot lower node `{node}`: {what}")]
    Unsupported { node: String, what: String },
    /// The graph is malformed for the lowering.
    #[error("{0}")]
    Graph(String),
    /// A kernel, driver or argument error.
    #[error(transparent)]
    Kernel(#[from] gati_kernels::KernelError),
    /// A cuBLAS or cuDNN call failed.
    #[error("{library} call {what} failed: {detail}")]
    Library { library: &'static str, what: &'static str, detail: String },
}
