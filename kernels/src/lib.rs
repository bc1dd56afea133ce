//! gati's CUDA kernels: the `.cu` sources (in `cu/`), a typed table of their
//! modules and functions, launch code over `cudarc` (driver API, loaded at run
//! time), and a CPU reference of every kernel with the same semantics.
//!
//! - [`reference`]: the CPU versions; the hardware-in-loop check compares each
//!   kernel against them on random inputs, and the CPU executor uses them.
//! - [`source`]: which module holds which kernel; the sources are embedded.
//! - [`nvrtc`]: compiles a module to PTX (no driver needed: CI compiles every
//!   module for `sm_90` this way).
//! - [`device`]: a CUDA device with its modules loaded lazily and the launch
//!   code of each kernel. Without a CUDA driver every entry point returns
//!   [`KernelError::CudaUnavailable`]; nothing here panics for a missing library.

pub mod device;
mod error;
pub mod libs;
pub mod nvrtc;
pub mod reference;
pub mod source;

pub use cudarc;
pub use error::KernelError;
pub use reference::Activation;
pub use source::{Kernel, Module, Param};
