//! The daemon's answers: equal to ONNX Runtime called directly, correct on real
//! images, batched correctly under concurrency, and deadlines enforced.

mod common;

use std::time::Duration;

use common::*;
use gatid::api::wire::FLAG_BEST_EFFORT;
use gatid::api::wire::{Dtype, Status};
use gatid::client::Client;
use gatid::config::{InputConfig, Layout, Resize};
use gatid::infer::preprocess::image_to_input;

fn cifar_input_cfg() -> InputConfig {
    InputConfig {
        layout: Layout::NHWC,
        height: 32,
        width: 32,
        channels: 3,
        scale: 1.0,
        mean: vec![],
        std: vec![],
        resize: Resize::Bilinear,
    }
}

#[test]
fn cifar_images_classified_correctly_and_equal_to_ort_direct() {
    let dir = tempdir("cifar");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let mut c = d.client();
    let images = cifar_images();
    assert_eq!(images.len(), 20, "foolbox ships 20 CIFAR-10 images");
    for (i, (pixels, label)) in images.iter().enumerate() {
        let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], pixels, 0).unwrap().ok().unwrap();
        let got = r.floats();
        assert_eq!(argmax(&got), *label, "image {i} misclassified");
        assert_eq!(r.shape, vec![1, 10]);
        assert_eq!(r.exit_stage as usize, 4, "auto cuts split the CNN after each of its 3 pools");
        // The same pixels through ORT in this process, whole model, no stages.
        let (_, input) = image_to_input(&cifar_input_cfg(), &[32, 32, 3], pixels).unwrap();
        let want = ort_direct(&model_path("cifar10_cnn.onnx"), &[1, 32, 32, 3], &input);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-4 * want.iter().fold(1.0f32, |m, v| m.max(v.abs())),
            "image {i}: daemon {got:?} vs ORT {want:?}"
        );
    }
    // A client-side batch of all 20 as one f32 request gives the same rows.
    let mut batch = Vec::new();
    for (pixels, _) in &images {
        batch.extend(pixels.iter().map(|&p| f32::from(p)));
    }
    let r = c.infer("cifar10", Dtype::F32, &[20, 32, 32, 3], &f32_bytes(&batch), 0).unwrap().ok().unwrap();
    assert_eq!(r.shape, vec![20, 10]);
    let want = ort_direct(&model_path("cifar10_cnn.onnx"), &[20, 32, 32, 3], &batch);
    let got = r.floats();
    for (row, (g, w)) in got.chunks(10).zip(want.chunks(10)).enumerate() {
        assert_eq!(argmax(g), images[row].1);
        assert!(g.iter().zip(w).all(|(a, b)| (a - b).abs() <= 1e-3), "row {row}");
    }
}

#[test]
fn image_of_another_size_is_resized() {
    let dir = tempdir("resize");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let mut c = d.client();
    // Nearest 2x upscale of a real image: the resized input comes back to the same class.
    let (pixels, label) = &cifar_images()[0];
    let mut big = vec![0u8; 64 * 64 * 3];
    for y in 0..64 {
        for x in 0..64 {
            for ch in 0..3 {
                big[(y * 64 + x) * 3 + ch] = pixels[((y / 2) * 32 + x / 2) * 3 + ch];
            }
        }
    }
    let r = c.infer("cifar10", Dtype::U8, &[64, 64, 3], &big, 0).unwrap().ok().unwrap();
    assert_eq!(argmax(&r.floats()), *label);
}

#[test]
fn fmnist_resnet_accuracy_through_daemon_and_concurrent_batching() {
    let dir = tempdir("fmnist");
    // Two I/O threads (two rings) share the listener.
    let d = TestDaemon::start(
        &dir,
        &config(&dir, "io_threads = 2", &[fmnist_model("fmnist", "max_batch = 16\nmax_queue_delay_us = 2000")]),
    );
    let meta = d.client().model_info("fmnist").unwrap();
    let stages: Vec<String> =
        meta["model"]["stages"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        &stages[..6],
        &["block1_out", "block2_out", "block3_out", "block4_out", "block5_out", "block6_out"],
        "auto cuts = residual block ends"
    );
    let test = fmnist_test(1000);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let socket = d.socket.clone();
            let part: Vec<_> = test.iter().skip(t).step_by(4).cloned().collect();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let mut correct = 0;
                // Pipelined: 8 in flight per client, so the batcher forms batches.
                for chunk in part.chunks(8) {
                    for (px, _) in chunk {
                        c.send(Client::infer_header("fmnist", Dtype::U8, &[28, 28, 1], 0), px).unwrap();
                    }
                    for (_, label) in chunk {
                        let r = c.recv().unwrap().ok().unwrap();
                        correct += usize::from(argmax(&r.floats()) == *label);
                    }
                }
                correct
            })
        })
        .collect();
    let correct: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let acc = correct as f64 / test.len() as f64;
    assert!(acc >= 0.88, "accuracy {acc} on the first 1000 test images");
    let stats = gatid::telemetry::summary::summarize(&d.client().stats_text().unwrap());
    let mean_rows = stats["batch_rows"][0]["mean"].as_f64().unwrap();
    assert!(mean_rows > 1.0, "concurrent pipelined requests were batched (mean rows {mean_rows})");
}

#[test]
fn deadlines_rejected_at_admission_or_expired_in_queue() {
    let dir = tempdir("deadline");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "max_batch = 8")]));
    let mut c = d.client();
    let (pixels, _) = &cifar_images()[0];
    // 1 us cannot be met by any model run: refused at once, nothing runs.
    let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], pixels, 1).unwrap();
    assert_eq!(r.status, Status::DeadlineUnmeetable);
    // A generous deadline is met.
    let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], pixels, 10_000_000).unwrap();
    assert_eq!(r.status, Status::Ok);

    // Build a backlog (several big batches), then a best-effort request with a short
    // deadline: admitted without the check, it expires in the queue and is not run.
    let mut backlog = d.client();
    let big: Vec<f32> = (0..8 * 3072).map(|i| (i % 255) as f32).collect();
    for _ in 0..48 {
        backlog.send(Client::infer_header("cifar10", Dtype::F32, &[8, 32, 32, 3], 0), &f32_bytes(&big)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(30));
    let mut h = Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 2_000);
    h.flags.set(FLAG_BEST_EFFORT);
    c.send(h, pixels).unwrap();
    // The same request with admission control, while the backlog is still queued
    // (the best-effort one is answered only when the batcher reaches it), is
    // refused up front instead.
    let r = d.client().infer("cifar10", Dtype::U8, &[32, 32, 3], pixels, 2_000).unwrap();
    assert_eq!(r.status, Status::DeadlineUnmeetable);
    let r = c.recv().unwrap();
    assert_eq!(r.status, Status::DeadlineExpired, "best effort request behind a backlog");
    for _ in 0..48 {
        assert_eq!(backlog.recv().unwrap().status, Status::Ok);
    }
    // More rows than max_batch in one request are refused before any decoding.
    let r = c.infer("cifar10", Dtype::F32, &[9, 32, 32, 3], &f32_bytes(&vec![0.0; 9 * 3072]), 0).unwrap();
    assert_eq!(r.status, Status::TooManyRows);
}

#[test]
fn gatictl_classifies_png_and_npy_and_reports_stats() {
    let dir = tempdir("gatictl");
    // Metrics over HTTP on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = config(&dir, "", &[cifar_model("cifar10", "output = \"logits\"")])
        + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    // [metrics] must precede [[models]] in TOML; rebuild in the right order.
    let cfg = {
        let (head, models) = cfg.split_once("[[models]]").unwrap();
        let (models, metrics) = models.split_once("\n[metrics]").unwrap();
        format!("{head}[metrics]{metrics}\n[[models]]{models}")
    };
    let d = TestDaemon::start(&dir, &cfg);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatictl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "gatictl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let png = root().join("data/cifar10/cifar10_00_3.png");
    let text = ctl(&["infer", "--model", "cifar10", png.to_str().unwrap()]);
    assert!(text.contains(": cat (class 3"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&ctl(&["--json", "infer", "--model", "cifar10", png.to_str().unwrap()])).unwrap();
    assert_eq!(v["results"][0]["class"], 3);
    let p: f64 = v["results"][0]["probabilities"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
    assert!((p - 1.0).abs() < 1e-4, "softmax of logits sums to 1");
    // A float32 .npy in the model's layout.
    let (pixels, label) = &cifar_images()[5];
    let floats: Vec<f32> = pixels.iter().map(|&b| f32::from(b)).collect();
    let npy = dir.join("x.npy");
    std::fs::write(&npy, gatid::client::npy::write_f32(&[1, 32, 32, 3], &floats)).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&ctl(&["--json", "infer", "--model", "cifar10", npy.to_str().unwrap()])).unwrap();
    assert_eq!(v["results"][0]["class"].as_u64().unwrap() as usize, *label);
    assert!(ctl(&["models"]).contains("cifar10"));
    assert!(ctl(&["health"]).contains("status: ok"));
    assert!(ctl(&["ready"]).contains("ready"));
    let stats: serde_json::Value = serde_json::from_str(&ctl(&["--json", "stats"])).unwrap();
    let ok: f64 = stats["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["count"].as_f64().unwrap())
        .sum();
    assert!(ok >= 3.0, "{stats}");
    assert!(stats["stage_ms"].as_array().unwrap().len() == 4, "per-stage latency histograms");
    // The same numbers over Prometheus HTTP.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    for metric in [
        "gati_requests_total",
        "gati_request_duration_seconds_bucket",
        "gati_stage_duration_seconds_bucket",
        "gati_batch_rows_bucket",
        "gati_queue_rows",
        "gati_inflight_requests",
        "gati_connections",
    ] {
        assert!(body.contains(metric), "{metric} missing from /metrics");
    }
    // An unknown model is a clear client error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatictl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["infer", "--model", "nope", png.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no model named `nope`"));
}
