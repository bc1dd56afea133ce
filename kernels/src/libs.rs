//! Finding CUDA's shared libraries at run time. `cudarc` opens each library by
//! its bare name, so only the loader's search path counts; a library opened
//! here first by its full path (from `GATI_CUDA_LIBRARY_PATH`, a `:`-separated
//! list of folders) is then found by its soname. This is how the PyPI wheels'
//! NVRTC (`nvidia/cu13/lib`) is used without touching `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// The variable naming extra library folders.
pub const LIBRARY_PATH_VAR: &str = "GATI_CUDA_LIBRARY_PATH";

/// The sonames gati's CUDA code opens (CUDA 13).
pub const SONAMES: &[&str] = &[
    "libcuda.so.1",
    "libnvrtc-builtins.so.13.0",
    "libnvrtc.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcudnn.so.9",
];

/// Libraries opened here stay loaded for the life of the process.
static KEPT: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
static FROM_ENV: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Opens every [`SONAMES`] library found in `dirs` (first folder first) and
/// returns the paths opened. Libraries already opened stay as they are.
pub fn preload_from(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut opened = Vec::new();
    for name in SONAMES {
        let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) else { continue };
        // SAFETY: opening a CUDA library runs its initialisers, which have no
        // preconditions on this process; the handle is kept for the process's
        // life, so no symbol resolved from it later can dangle.
        if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
            KEPT.lock().unwrap_or_else(|e| e.into_inner()).push(lib);
            opened.push(path);
        }
    }
    opened
}

/// Preloads from `GATI_CUDA_LIBRARY_PATH` once per process; the paths opened.
pub fn preload_env() -> &'static [PathBuf] {
    FROM_ENV.get_or_init(|| {
        let dirs: Vec<PathBuf> = std::env::var_os(LIBRARY_PATH_VAR)
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        preload_from(&dirs)
    })
}

/// The folder of NVRTC in a Python virtual environment with the
/// `nvidia-cuda-nvrtc` wheel (`<venv>/lib/python3*/site-packages/nvidia/cu13/lib`).
pub fn wheel_lib_dir(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/nvidia/cu13/lib"))
        .find(|d| d.join("libnvrtc.so.13").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wheel_folder_is_found_in_a_venv() {
        let venv = std::env::temp_dir().join(format!("gati-venv-{}", std::process::id()));
        let lib = venv.join("lib/python3.11/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&lib).unwrap();
        assert_eq!(wheel_lib_dir(&venv), None, "no library yet");
        std::fs::write(lib.join("libnvrtc.so.13"), b"").unwrap();
        assert_eq!(wheel_lib_dir(&venv), Some(lib));
        assert_eq!(wheel_lib_dir(&venv.join("missing")), None);
        std::fs::remove_dir_all(&venv).unwrap();
    }
}
