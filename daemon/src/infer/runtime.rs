//! The process-wide ONNX Runtime environment, loaded once from the shared library.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

use super::InferError;

static ENV: OnceLock<Environment> = OnceLock::new();
static LIB: OnceLock<PathBuf> = OnceLock::new();

/// Where the ONNX Runtime library is: the config's path, else `ORT_DYLIB_PATH`.
pub fn library_path(configured: Option<&Path>) -> Result<PathBuf, InferError> {
    let path = configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .ok_or(InferError::RuntimeMissing(
            "no ONNX Runtime library: set runtime.ort_library in the config or ORT_DYLIB_PATH \
             (the onnxruntime wheel ships onnxruntime/capi/libonnxruntime.so.*)"
                .into(),
        ))?;
    if !path.is_file() {
        return Err(InferError::RuntimeMissing(format!("ONNX Runtime library {} does not exist", path.display())));
    }
    Ok(path)
}

/// The environment, loading the library on first use. Later calls with another path
/// keep the first library (a process can load ONNX Runtime once).
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, InferError> {
    if let Some(env) = ENV.get() {
        return Ok(env);
    }
    let path = library_path(configured)?;
    let env = ort::init_from(&path)
        .map_err(|e| InferError::RuntimeMissing(format!("cannot load ONNX Runtime from {}: {e}", path.display())))?
        .with_name("gatid")
        .with_telemetry(false)
        .build()
        .map_err(|e| InferError::Ort { what: "creating the ONNX Runtime environment".into(), source: e })?;
    let _ = LIB.set(path);
    Ok(ENV.get_or_init(|| env))
}

/// The library the environment was loaded from, once loaded.
pub fn loaded_library() -> Option<&'static Path> {
    LIB.get().map(PathBuf::as_path)
}
