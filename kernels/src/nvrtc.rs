//! Compiling gati's modules to PTX with NVRTC. Needs only the NVRTC library
//! (no driver, no GPU), so CI compiles every module for Hopper (`sm_90`).

use crate::{libs, KernelError, Module};

/// The architecture CI compiles for: Hopper (H100/H200).
pub const CI_ARCH: &str = "sm_90";

/// Whether the NVRTC library can be opened (after [`libs::preload_env`]).
pub fn available() -> bool {
    libs::preload_env();
    // SAFETY: opening the library runs its initialisers only; cudarc keeps no
    // state from this probe.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), KernelError> {
    if !available() {
        return Err(unavailable());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::CudaUnavailable(format!("nvrtcVersion returned {rc:?}")));
    }
    Ok((major, minor))
}

/// Compiles `module` for `arch` (e.g. `sm_90`) and returns its PTX text.
pub fn compile(module: Module, arch: &str) -> Result<String, KernelError> {
    if !available() {
        return Err(unavailable());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(module.file().into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(module.source(), opts).map_err(|e| KernelError::Compile {
        module: module.file(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => other.to_string(),
        },
    })?;
    Ok(ptx.to_src())
}

fn unavailable() -> KernelError {
    KernelError::CudaUnavailable(format!(
        "no NVRTC library (libnvrtc.so.13): install the nvidia-cuda-nvrtc wheel (scripts/setup.sh does) and name its \
         nvidia/cu13/lib folder in {}, or put it on the loader's path",
        libs::LIBRARY_PATH_VAR
    ))
}
