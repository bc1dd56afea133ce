//! Where a model runs on this node. A `backend = "cuda"` model is checked
//! before anything touches CUDA: the driver library must be present (cudarc
//! panics without it), the device must exist, and the graph must lower. When
//! any of that fails the model is either refused with the reason, or — with
//! `fallback = "cpu"` — served by ONNX Runtime with a warning that says why.

use crate::config::{Backend, Fallback, ModelConfig};

use super::GpuError;

/// The outcome for one model.
pub enum Placement {
    /// ONNX Runtime on the CPU; `fallback` holds why a CUDA model is here.
    Cpu { fallback: Option<String> },
    /// A CUDA device, opened.
    Cuda { device: usize, gpu: gati_kernels::device::Gpu },
}

impl Placement {
    /// What `gatictl models` shows for a model on device `device`, with no fallback reason.
    pub fn label_cuda(device: usize) -> (String, Option<String>) {
        (format!("cuda:{device}"), None)
    }
}

/// Decides where `cfg` runs.
pub fn place(cfg: &ModelConfig) -> Result<Placement, GpuError> {
    if cfg.backend == Backend::Cpu {
        return Ok(Placement::Cpu { fallback: None });
    }
    match gati_kernels::device::Gpu::open(cfg.device) {
        Ok(gpu) => Ok(Placement::Cuda { device: cfg.device, gpu }),
        Err(e) => refuse_or_fall_back(cfg, e.to_string()).map(|r| Placement::Cpu { fallback: Some(r) }),
    }
}

/// With `fallback = "cpu"`, `reason` back (logged: the model goes to the CPU); else the error.
pub fn refuse_or_fall_back(cfg: &ModelConfig, reason: String) -> Result<String, GpuError> {
    match cfg.fallback {
        Fallback::Cpu => {
            tracing::warn!(model = %cfg.name, device = cfg.device, %reason, "CUDA unavailable: serving the model on the CPU (fallback = \"cpu\")");
            Ok(reason)
        }
        Fallback::None => Err(GpuError::Unavailable { model: cfg.name.clone(), device: cfg.device, reason }),
    }
}
