//! Learned caches over their life: warm start from a calibration set and
//! persistence across a restart, the accuracy budget on a stream whose class
//! mix drifts, and serving while the trainer runs flat out.

mod common;

use std::time::Duration;

use common::*;
use gatid::api::wire::{model_id, Dtype, Kind};
use gatid::client::calibrate;
use gatid::infer::preprocess::image_to_input;

const LAST: u16 = 7;

/// These tests measure latency and need the trainer (SCHED_IDLE: it runs only on
/// otherwise idle CPU) to make progress, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn warm_started_caches_survive_a_restart_unchanged() {
    let _serial = serial();
    let state = tempdir("cache-state");
    // No retraining, no shadow checks, no stream prior: answers depend on the caches alone.
    let cache = "cache = { kind = \"learned\", retrain_every = 1000000, shadow_fraction = 0.0, stream_prior = false, trainer_cpu_share = 1.0 }";
    let dir = tempdir("cache-persist");
    let text = with_state_dir(&config(&dir, "", &[fmnist_model("fmnist", cache)]), &state);
    let mut d = TestDaemon::start(&dir, &text);
    let mut c = d.client();
    warm_start_fmnist(&mut c, 4096);
    let generation = model_metric(&mut c, "gati_cache_generation", "fmnist");
    let test = fmnist_test(300);
    let before = fmnist_answers(&mut c, &test);
    let hits = before.iter().filter(|a| a.0 < LAST).count();
    assert!(hits >= 30, "warm-started caches answered only {hits} of 300 test images");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
    let file = state.join("caches/fmnist.bin");
    assert!(file.metadata().map(|m| m.len() > 1000).unwrap_or(false), "{} not written", file.display());
    drop(d);

    assert_restored_caches("cache-persist-2", &state, cache, generation, &test, &before);

    // State saved for other cache settings is not used: that daemon starts cold.
    let other = cache.replace("kind = \"learned\"", "kind = \"learned\", hidden = 8");
    let dir = tempdir("cache-persist-3");
    let d = TestDaemon::start(&dir, &with_state_dir(&config(&dir, "", &[fmnist_model("fmnist", &other)]), &state));
    let mut c = d.client();
    assert_eq!(model_metric(&mut c, "gati_cache_generation", "fmnist"), 0.0);
    assert!(fmnist_answers(&mut c, &test[..50]).iter().all(|a| a.0 == LAST), "cold caches answer nothing early");
    drop(d);
    let _ = std::fs::remove_dir_all(&state);
}

/// The full model's class for each image (one batched ORT run in this process).
fn full_model_classes(images: &[&Vec<u8>]) -> Vec<usize> {
    let mut x = Vec::with_capacity(images.len() * 784);
    for px in images {
        x.extend(image_to_input(&fmnist_input(), &[28, 28, 1], px).unwrap().1);
    }
    let out = ort_direct(&model_path("fmnist_resnet.onnx"), &[images.len(), 1, 28, 28], &x);
    out.chunks_exact(10).map(argmax).collect()
}

#[test]
fn live_disagreement_stays_within_budget_when_the_class_mix_drifts() {
    let _serial = serial();
    let dir = tempdir("cache-drift");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[fmnist_model("fmnist", "cache = { kind = \"learned\" }")]));
    let mut c = d.client();
    // Class runs (p_stay 0.9) of classes 0–4 only, then of 5–9 only, then of all ten.
    let test = fmnist_test(10_000);
    let order = std::fs::read(root().join("data/workloads/fmnist_local_p0.9_seed1.idx")).unwrap();
    let order: Vec<usize> =
        order.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let low: Vec<usize> = order.iter().copied().filter(|&k| test[k].1 < 5).take(1500).collect();
    let high: Vec<usize> = order.iter().copied().filter(|&k| test[k].1 >= 5).take(1500).collect();
    let stream: Vec<usize> = low.into_iter().chain(high).chain(order[5000..6500].iter().copied()).collect();
    let want = full_model_classes(&stream.iter().map(|&k| &test[k].0).collect::<Vec<_>>());
    let (mut hits, mut wrong) = (0usize, 0usize);
    let mut wrong_after_drift = 0usize;
    for (i, &k) in stream.iter().enumerate() {
        if i == 700 {
            // The first training needs ~600 rows and runs beside serving at low
            // priority: on a busy machine the stream (~0.2 ms a request) could
            // otherwise end before it does, and put nothing to the test.
            wait_cache_generation(&mut c, "fmnist", 1);
        }
        let r = c.infer("fmnist", Dtype::U8, &[28, 28, 1], &test[k].0, 0).unwrap().ok().unwrap();
        if r.exit_stage < LAST {
            hits += 1;
        }
        if argmax(&r.floats()) != want[i] {
            wrong += 1;
            wrong_after_drift += usize::from((1500..1800).contains(&i));
        }
    }
    let disagreement = wrong as f64 / stream.len() as f64;
    println!(
        "drift: {hits} of {} answered early, disagreement {disagreement:.4} ({wrong_after_drift} in the 300 after the drift)",
        stream.len()
    );
    assert!(hits >= stream.len() / 20, "caches answered only {hits} rows: the budget was not put to the test");
    assert!(disagreement <= 0.01 + 0.005, "disagreement {disagreement} over budget + 0.5 %");
}

/// p99 of `n` sequential requests, ms.
/// Functional half of the trainer-vs-serving check (the timing half, serving p99
/// with the trainer idle vs flat out, is a line of `gatid bench caches`): with
/// the trainer retraining back to back, every request is answered correctly and
/// on time, and the trainer does get to run (at SCHED_IDLE it may only run once
/// serving pauses, so this waits for it with serving quiet, not during).
#[test]
fn serving_never_stops_while_the_trainer_runs_flat_out() {
    let _serial = serial();
    let test = fmnist_test(2000);
    // Budget 0: caches never answer, so every request runs the whole model.
    let cache = "cache = { kind = \"learned\", budget = 0.0, window = 512, min_samples = 256, retrain_every = 16 }";
    let dir = tempdir("cache-trainer");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[fmnist_model("fmnist", cache)]));
    let mut c = d.client();
    let mut set = calibrate::read(&root().join("data/fashion-mnist/calib-images-idx3-ubyte"), [28, 28, 1]).unwrap();
    set.images.truncate(512);
    calibrate::send(&mut c, "fmnist", &set, 16, |_| {}).unwrap();
    c.control_json(Kind::CacheTrain, model_id("fmnist"), &[]).unwrap();
    wait_cache_generation(&mut c, "fmnist", 1);
    let g0 = model_metric(&mut c, "gati_cache_generation", "fmnist") as u64;
    let want = full_model_classes(&test.iter().take(200).map(|(p, _)| p).collect::<Vec<_>>());
    for i in 0..2000 {
        let (pixels, _) = &test[i % test.len()];
        let r = c.infer("fmnist", Dtype::U8, &[28, 28, 1], pixels, 0).unwrap();
        let r = r.ok().unwrap_or_else(|e| panic!("request {i} while the trainer runs: {e}"));
        let got = argmax(&r.floats());
        if i < 200 {
            assert_eq!(got, want[i], "request {i}: budget 0 means the full model's answer");
        }
    }
    // Each 16 full-model rows ask for a retrain: at least one more generation follows.
    wait_cache_generation(&mut c, "fmnist", g0 + 1);
    assert!(c.ping().is_ok());
}
