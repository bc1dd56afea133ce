//! Where a model runs: ONNX Runtime on the CPU, or gati's GPU executor on a
//! CUDA device, and what a CUDA model does on a node that cannot run it.

use serde::Deserialize;

/// The executor of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime, one session per stage.
    #[default]
    Cpu,
    /// gati's GPU executor (cuDNN/cuBLAS + gati kernels) on `device`.
    Cuda,
}

/// What a `cuda` model does when its device cannot be used (no driver, no
/// such device, an unsupported graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// The model fails its load (the daemon exits 65 at start; a reload keeps the old set).
    #[default]
    None,
    /// The model is served by ONNX Runtime on the CPU instead, with a warning.
    Cpu,
}

/// Semantic checks of the backend keys of one model.
pub(super) fn check(backend: Backend, device: usize, fallback: Fallback, bad: &mut dyn FnMut(&'static str, String)) {
    if backend == Backend::Cpu {
        if device != 0 {
            bad("device", format!("device = {device} needs backend = \"cuda\""));
        }
        if fallback != Fallback::None {
            bad("fallback", "fallback applies to backend = \"cuda\" only".into());
        }
    }
    if device > 64 {
        bad("device", format!("must be a CUDA device ordinal 0..=64, got {device}"));
    }
}
