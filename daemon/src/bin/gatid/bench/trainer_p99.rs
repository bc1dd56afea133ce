//! The trainer-vs-serving line of `gatid bench caches`: serving p99 on the
//! Fashion-MNIST model with its cache trainer idle vs retraining back to back,
//! same requests, same run. A wall-clock comparison, so it lives here and not
//! in `cargo test` (the test keeps the functional half: serving never stops).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use super::cache_streams::Workload;
use super::harness::Daemon;
use gatid::api::wire::{model_id, Dtype, Kind};
use gatid::telemetry::{names, summary};

/// One side of the comparison: p99 (ms) of `n` requests, and the trainings
/// that happened while they were served.
fn measure(
    config: &Path,
    root: &Path,
    stream: &Workload,
    retrain_every: usize,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let daemon = Daemon::start_with(config, |t| {
        if let Some(toml::Value::Array(models)) = t.get_mut("models") {
            models.retain(|m| m.get("name").and_then(toml::Value::as_str) == Some("fmnist"));
            for m in models.iter_mut().filter_map(toml::Value::as_table_mut) {
                // Budget 0: caches never answer, so both sides serve alike.
                let cache: toml::Table = toml::from_str(&format!(
                    "kind = \"learned\"\nbudget = 0.0\nwindow = 512\nmin_samples = 256\nretrain_every = {retrain_every}"
                ))
                .expect("static cache table");
                m.insert("cache".into(), toml::Value::Table(cache));
            }
        }
    })?;
    let mut c = daemon.client()?;
    let mut set = gatid::client::calibrate::read(&root.join("data/fashion-mnist/calib-images-idx3-ubyte"), [28, 28, 1])
        .map_err(anyhow::Error::msg)?;
    set.images.truncate(512);
    gatid::client::calibrate::send(&mut c, "fmnist", &set, 16, |_| {})?;
    let v = c.control_json(Kind::CacheTrain, model_id("fmnist"), &[])?;
    let g = v["generation"].as_u64().unwrap_or(0);
    if !gatid::client::calibrate::wait_trained(&mut c, "fmnist", g, Duration::from_secs(120))? {
        bail!("the first training did not finish within 120 s");
    }
    let serve = |c: &mut gatid::client::Client, count: usize| -> anyhow::Result<Vec<f64>> {
        (0..count)
            .map(|i| {
                let t = Instant::now();
                c.infer("fmnist", Dtype::U8, &[28, 28, 1], stream.image((i * 7919) % stream.requests()), 0)?.ok()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect()
    };
    serve(&mut c, 300)?; // warm-up
    let generation = |c: &mut gatid::client::Client| -> anyhow::Result<f64> {
        Ok(summary::model_value(&c.stats_text()?, names::CACHE_GENERATION, "fmnist").unwrap_or(0.0))
    };
    let g0 = generation(&mut c)?;
    let mut lat = serve(&mut c, n)?;
    let trainings = generation(&mut c)? - g0;
    lat.sort_by(f64::total_cmp);
    drop(c);
    daemon.stop()?;
    Ok((lat[(lat.len() * 99) / 100], trainings))
}

/// Measures, prints the line and returns its JSON.
pub(super) fn run(config: &Path, root: &Path, fmnist: &Workload, quick: bool) -> anyhow::Result<Value> {
    // Long enough for the flat-out side to finish several trainings (one takes ~0.5-1 s here).
    let n = if quick { 6000 } else { 20_000 };
    let (idle, idle_trainings) = measure(config, root, fmnist, 1_000_000, n)?;
    let (busy, busy_trainings) = measure(config, root, fmnist, 16, n)?;
    println!(
        "trainer p99 (fmnist, {n} requests): idle {idle:.3} ms ({idle_trainings} trainings), flat out {busy:.3} ms \
         ({busy_trainings} trainings): {:.2}x",
        busy / idle
    );
    if busy_trainings < 1.0 {
        println!("  (no training finished while serving: the trainer is paced to its share)");
    }
    Ok(json!({
        "requests": n, "idle_p99_ms": idle, "busy_p99_ms": busy, "ratio": busy / idle,
        "idle_trainings": idle_trainings, "busy_trainings": busy_trainings,
    }))
}
