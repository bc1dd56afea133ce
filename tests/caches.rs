//! Learned caches through the real daemon: a hit answers with the cache's
//! guess at an earlier stage, a miss answers exactly what the full model says,
//! and compaction keeps every row paired with its own answer.

mod common;

use common::*;
use gatid::api::wire::{Dtype, Status};
use gatid::infer::preprocess::image_to_input;

/// The class-run Fashion-MNIST stream (temporal locality), as test-set indices.
fn local_stream(n: usize) -> Vec<usize> {
    let bytes = std::fs::read(root().join("data/workloads/fmnist_local_p0.9_seed1.idx")).expect("run scripts/setup.sh");
    bytes.chunks_exact(4).take(n).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize).collect()
}

/// Is `row` what a cache hit answers (log of one class at p, the rest even)?
fn is_hit_row(row: &[f32]) -> bool {
    let max = row.iter().copied().fold(f32::MIN, f32::max);
    let others: Vec<f32> = row.iter().copied().filter(|&v| v != max).collect();
    others.len() == row.len() - 1 && others.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-6)
}

#[test]
fn hits_answer_early_misses_equal_the_full_model_and_rows_stay_paired() {
    let dir = tempdir("caches");
    let cache = "cache = { kind = \"learned\", budget = 0.1, min_samples = 256, retrain_every = 256, shadow_fraction = 0.1, trainer_cpu_share = 0.5 }";
    let d = TestDaemon::start(&dir, &config(&dir, "", &[fmnist_model("fmnist", &format!("max_batch = 16\n{cache}"))]));
    let test = fmnist_test(10_000);
    let stream = local_stream(1500);
    let model = model_path("fmnist_resnet.onnx");
    let last = 7u16;
    let mut c = d.client();
    let (mut hits, mut full) = (0, 0);
    let mut agree = 0;
    for (i, &k) in stream.iter().enumerate() {
        if i == 300 {
            // Training runs beside serving at low priority: on a busy CI machine
            // the stream could otherwise end before the first training does.
            wait_cache_generation(&mut c, "fmnist", 1);
        }
        let (px, _) = &test[k];
        let r = c.infer("fmnist", Dtype::U8, &[28, 28, 1], px, 0).unwrap().ok().unwrap();
        let got = r.floats();
        let (_, x) = image_to_input(&fmnist_input(), &[28, 28, 1], px).unwrap();
        let want = ort_direct_cached(&model, &x);
        if r.exit_stage == last {
            full += 1;
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-3, "request {i}: a miss must be the full model's answer (diff {diff})");
        } else {
            hits += 1;
            assert!(r.exit_stage < last, "exit at the input (0) or after a stage");
            assert!(is_hit_row(&got), "request {i}: hit row {got:?}");
            let p: f32 = got.iter().map(|v| v.exp()).sum();
            assert!((p - 1.0).abs() < 1e-3, "hit answers a distribution (sum {p})");
        }
        agree += usize::from(argmax(&got) == argmax(&want));
    }
    assert!(hits > 100, "caches answered only {hits} of 1500 (full {full})");
    let disagreement = 1.0 - agree as f64 / stream.len() as f64;
    println!("caches: {hits} hits, {full} full runs of 1500; disagreement with the full model {disagreement:.4}");
    assert!(disagreement < 0.1, "disagreement {disagreement} over the test's 10 % budget");

    // Compaction: 8-row jobs mixing images; every row that ran the whole model
    // must carry the full model's answer for that very row.
    let mut mixed_jobs = 0;
    for j in 0..40 {
        let ks: Vec<usize> = (0..8).map(|r| stream[(j * 8 + r * 37) % stream.len()]).collect();
        let mut px = Vec::new();
        for &k in &ks {
            px.extend_from_slice(&test[k].0);
        }
        let r = c.infer("fmnist", Dtype::U8, &[8, 28, 28, 1], &px, 0).unwrap();
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.shape, vec![8, 10]);
        let got = r.floats();
        let mut kinds = (0, 0);
        for (row, &k) in ks.iter().enumerate() {
            let g = &got[row * 10..(row + 1) * 10];
            let (_, x) = image_to_input(&fmnist_input(), &[28, 28, 1], &test[k].0).unwrap();
            let want = ort_direct_cached(&model, &x);
            if is_hit_row(g) {
                kinds.0 += 1;
            } else {
                kinds.1 += 1;
                let diff = g.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff < 1e-3, "job {j} row {row}: answer belongs to another row (diff {diff})");
            }
        }
        mixed_jobs += usize::from(kinds.0 > 0 && kinds.1 > 0);
    }
    assert!(mixed_jobs > 0, "no job mixed hits and misses; compaction was not exercised");
    // gatictl stats shows where rows exited.
    let stats = gatid::telemetry::summary::summarize(&d.client().stats_text().unwrap());
    let exits: f64 = stats["exits"].as_array().unwrap().iter().map(|e| e["count"].as_f64().unwrap()).sum();
    assert!(exits >= 1500.0 + 320.0, "every row's exit is counted ({exits})");
    let early: f64 = stats["exits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["stage"] != "7")
        .map(|e| e["count"].as_f64().unwrap())
        .sum();
    assert!(early >= hits as f64, "early exits counted ({early} < {hits})");
    assert!(gatid::telemetry::summary::render(&stats).contains("live disagreement"));
    // And why each cut answers or not: one state per cut (the input and the 6
    // stage ends before the last), at least one of them active.
    let cuts = stats["cache_cuts"].as_array().unwrap();
    let ids: Vec<&str> = cuts.iter().map(|c| c["cut"].as_str().unwrap_or("?")).collect();
    assert_eq!(ids, ["0", "1", "2", "3", "4", "5", "6"], "{cuts:?}");
    let known =
        ["active", "no_features", "uncertifiable", "does_not_pay", "not_chosen", "over_memory", "live_disagreement"];
    assert!(cuts.iter().all(|c| known.contains(&c["state"].as_str().unwrap_or("?"))), "{cuts:?}");
    assert!(cuts.iter().any(|c| c["state"] == "active"), "{cuts:?}");
    assert!(gatid::telemetry::summary::render(&stats).contains("expected exits"));
}

/// ORT direct with one session reused across calls (in this test process).
fn ort_direct_cached(model: &std::path::Path, x: &[f32]) -> Vec<f32> {
    use std::sync::Mutex;
    static SESSION: Mutex<Option<ort::session::Session>> = Mutex::new(None);
    ort_env();
    let mut guard = SESSION.lock().unwrap();
    let s = guard.get_or_insert_with(|| {
        gatid::infer::pipeline::session_from_bytes(&std::fs::read(model).unwrap(), 1, "reference").unwrap()
    });
    let t = ort::value::TensorRef::from_array_view((vec![1usize, 1, 28, 28], x)).unwrap();
    let out = s.run(ort::inputs![t]).unwrap();
    out[0].try_extract_tensor::<f32>().unwrap().1.to_vec()
}

/// A calibration set reaches a model whose `max_batch` is below the client's
/// 16 rows per request (the client sends at most `max_batch` rows at a time).
#[test]
fn calibration_fits_requests_to_the_models_max_batch() {
    use gatid::client::calibrate;
    let dir = tempdir("caches-calibrate-batch");
    let d = TestDaemon::start(
        &dir,
        &config(&dir, "", &[fmnist_model("fmnist", "max_batch = 4\ncache = { kind = \"learned\" }")]),
    );
    let mut c = d.client();
    let mut set = calibrate::read(&root().join("data/fashion-mnist/calib-images-idx3-ubyte"), [28, 28, 1])
        .expect("run scripts/setup.sh");
    set.images.truncate(37);
    let mut requests = 0;
    assert_eq!(calibrate::send(&mut c, "fmnist", &set, 16, |_| requests += 1).unwrap(), 37);
    assert_eq!(requests, 10, "37 rows in requests of at most 4");
    let err = calibrate::send(&mut c, "nosuch", &set, 16, |_| {}).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("model"), "{err}");
}

/// Caches trained on rows that were not live traffic (here: a calibration
/// set) answer nothing until live traffic has judged them: their first
/// would-be hits are answered by the full model, which checks what the cache
/// would have said; only then do they answer early.
#[test]
fn caches_trained_off_live_traffic_answer_only_after_live_probes() {
    use gatid::client::calibrate;
    let dir = tempdir("caches-probation");
    let cache = "cache = { kind = \"learned\", budget = 0.1, min_samples = 256, shadow_fraction = 0.05 }";
    let d = TestDaemon::start(&dir, &config(&dir, "", &[fmnist_model("fmnist", &format!("max_batch = 16\n{cache}"))]));
    let mut c = d.client();
    let mut set = calibrate::read(&root().join("data/fashion-mnist/calib-images-idx3-ubyte"), [28, 28, 1])
        .expect("run scripts/setup.sh");
    set.images.truncate(800);
    assert_eq!(calibrate::send(&mut c, "fmnist", &set, 16, |_| {}).unwrap(), 800);
    let id = gatid::id::model_id("fmnist");
    c.control_json(gatid::api::wire::Kind::CacheTrain, id, &[]).unwrap();
    wait_cache_generation(&mut c, "fmnist", 1);
    let test = fmnist_test(10_000);
    let stages: Vec<u16> = local_stream(400)
        .iter()
        .map(|&k| c.infer("fmnist", Dtype::U8, &[28, 28, 1], &test[k].0, 0).unwrap().ok().unwrap().exit_stage)
        .collect();
    let last = 7u16;
    // At most PROBATION_HITS (32) would-be hits are withheld: the first 32
    // requests are all answered by the full model, whichever of them the
    // caches were sure of.
    assert!(stages[..32].iter().all(|&s| s == last), "answered early while on probation: {:?}", &stages[..32]);
    let early = stages.iter().filter(|&&s| s < last).count();
    assert!(early > 50, "caches never answered after their probation: {early} of 400");
}
