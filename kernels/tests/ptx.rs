//! Every `.cu` module compiles to PTX for Hopper (`sm_90`) with NVRTC, and the
//! PTX defines every kernel the module table names. Needs no GPU and no
//! driver: the NVRTC library comes from the `nvidia-cuda-nvrtc` wheel that
//! `scripts/setup.sh` installs into `.venv` (or from `GATI_CUDA_LIBRARY_PATH`).

use std::path::Path;

use gati_kernels::{libs, nvrtc, Kernel, Module};

/// The PTX parameter types of `.entry name(...)`.
fn entry_params(ptx: &str, name: &str) -> Vec<String> {
    let start = ptx.find(&format!(".entry {name}(")).unwrap_or_else(|| panic!("no .entry {name}"));
    let body = &ptx[start..];
    let body = &body[..body.find(')').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix(".param ."))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

fn nvrtc_ready() {
    libs::preload_env();
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv");
    if let Some(dir) = libs::wheel_lib_dir(&venv) {
        libs::preload_from(&[dir]);
    }
    assert!(
        nvrtc::available(),
        "NVRTC not found: run scripts/setup.sh (it installs the nvidia-cuda-nvrtc wheel into .venv) or set {}",
        libs::LIBRARY_PATH_VAR
    );
}

#[test]
fn every_module_compiles_for_sm_90() {
    nvrtc_ready();
    let (major, minor) = nvrtc::version().unwrap();
    println!("NVRTC {major}.{minor}");
    for m in Module::ALL {
        let ptx = nvrtc::compile(m, nvrtc::CI_ARCH).unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".target sm_90"), "{}: no sm_90 target in its PTX", m.file());
        for k in m.kernels() {
            assert!(ptx.contains(&format!(".entry {}(", k.name())), "{}: PTX lacks {}", m.file(), k.name());
            // The launch code's parameter table is the kernel's signature.
            let want: Vec<&str> = k.params().iter().map(|p| p.ptx()).collect();
            assert_eq!(entry_params(&ptx, k.name()), want, "{}: parameters of {}", m.file(), k.name());
        }
        println!("{}: {} bytes of PTX, kernels {:?}", m.file(), ptx.len(), m.kernels());
    }
}

#[test]
fn every_kernel_has_a_parameter_table() {
    for k in Kernel::ALL {
        assert!(!k.params().is_empty(), "{k:?}");
    }
}

#[test]
fn a_refused_compile_is_an_error_not_a_panic() {
    nvrtc_ready();
    // Module sources are fixed; the error path is reached through an unknown architecture.
    let err = nvrtc::compile(Module::Compact, "sm_1").unwrap_err();
    assert!(matches!(err, gati_kernels::KernelError::Compile { .. }), "{err}");
}
