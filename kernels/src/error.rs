//! The crate's one error type.

/// Errors of compiling, loading or launching a kernel, or of its arguments.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No CUDA driver / NVRTC library on this machine, or no such device.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC refused a module; the log says why.
    #[error("NVRTC cannot compile {module}: {log}")]
    Compile { module: &'static str, log: String },
    /// A driver call failed.
    #[error("CUDA driver call {what} failed: {source}")]
    Driver {
        what: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// Buffer lengths or sizes do not fit the kernel's shape.
    #[error("kernel arguments: {0}")]
    Shape(String),
}

impl KernelError {
    /// A driver error with the call it came from.
    pub fn driver(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| Self::Driver { what, source }
    }
}
