//! No GPU, no crash: a `backend = "cuda"` model on a node without a CUDA
//! driver fails its load with a message that says why (exit 65), or — with
//! `fallback = "cpu"` — is served by ONNX Runtime, and says so in its
//! metadata. Where a driver is present (the hardware-in-loop machine), the
//! same configs load the model onto the GPU instead, and these tests check that.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::{Dtype, Kind};

fn gpu_here() -> bool {
    gati_kernels::device::driver_present() && gati_kernels::device::device_count().is_ok_and(|n| n > 0)
}

#[test]
fn a_cuda_model_without_a_driver_fails_its_load_with_the_reason() {
    let dir = tempdir("gpu-refuse");
    let cfg = config(&dir, "", &[fmnist_model("fmnist", "backend = \"cuda\"\ndevice = 0")]);
    let path = dir.join("gatid.toml");
    std::fs::write(&path, &cfg).unwrap();
    // The config itself is valid.
    let check = Command::new(env!("CARGO_BIN_EXE_gatid")).arg("check-config").arg(&path).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let mut child = Command::new(env!("CARGO_BIN_EXE_gatid"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("GATI_LOG", "warn")
        .env_remove(gati_kernels::libs::LIBRARY_PATH_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if gpu_here() {
        // A GPU node: the model loads and the daemon serves (stopped here).
        let until = Instant::now() + Duration::from_secs(60);
        while gatid::client::Client::connect(&dir.join("gatid.sock")).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "gatid exited on a GPU node");
            assert!(Instant::now() < until, "gatid did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "gatid neither failed nor served within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(i32::from(gatid::EXIT_MODEL)), "{err}");
    for needle in ["model `fmnist` wants CUDA device 0", "no CUDA driver", "fallback = \"cpu\""] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.join("gatid.sock").exists(), "a failed load bound the socket");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cuda_model_with_cpu_fallback_is_served_by_onnx_runtime() {
    let dir = tempdir("gpu-fallback");
    let models =
        [fmnist_model("fmnist", "backend = \"cuda\"\ndevice = 3\nfallback = \"cpu\""), fmnist_model("fmnist_cpu", "")];
    let d = TestDaemon::start_with(&dir, &config(&dir, "", &models), |cmd| {
        cmd.env_remove(gati_kernels::libs::LIBRARY_PATH_VAR);
    });
    let mut c = d.client();
    let list = c.control_json(Kind::ListModels, 0, &[]).unwrap();
    let entry = |name: &str| list["models"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().unwrap();
    let (gpu_model, cpu_model) = (entry("fmnist"), entry("fmnist_cpu"));
    assert_eq!(cpu_model["backend"], "cpu");
    assert!(cpu_model.get("fallback_reason").is_none(), "{cpu_model}");
    if gpu_here() && gati_kernels::device::device_count().unwrap() > 3 {
        assert_eq!(gpu_model["backend"], "cuda:3");
    } else {
        assert_eq!(gpu_model["backend"], "cpu", "{gpu_model}");
        let reason = gpu_model["fallback_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("CUDA"), "{gpu_model}");
    }
    // Served, and the same answers as the plain CPU model.
    for (px, _) in fmnist_test(20) {
        let a = c.infer("fmnist", Dtype::U8, &[28, 28, 1], &px, 0).unwrap().ok().unwrap().floats();
        let b = c.infer("fmnist_cpu", Dtype::U8, &[28, 28, 1], &px, 0).unwrap().ok().unwrap().floats();
        assert_eq!(argmax(&a), argmax(&b));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4, "{diff}");
    }
}

#[test]
fn backend_keys_are_checked_with_the_config() {
    let dir = tempdir("gpu-keys");
    let cfg = config(
        &dir,
        "",
        &[fmnist_model("fmnist", "device = 1\nfallback = \"cpu\""), fmnist_model("other", "backend = \"tpu\"")],
    );
    let path = dir.join("gatid.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatid")).arg("check-config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["models[0].device", "models[0].fallback", "models[1].backend"] {
        assert!(err.contains(needle), "`{needle}` missing from:\n{err}");
    }
    // The shipped GPU node example is valid (given the set-up ran).
    let out = Command::new(env!("CARGO_BIN_EXE_gatid"))
        .arg("check-config")
        .arg(root().join("configs/gpu.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
