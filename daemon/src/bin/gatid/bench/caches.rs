//! `gatid bench caches`: the same request streams through the daemon over the
//! Unix socket with no cache, learned caches and k-NN caches, in one run:
//! latency, exits, disagreement with the full model, cache memory; a table,
//! `bench/results/caches.json` and a PNG of latency and hit rate along each stream.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use super::cache_streams::Workload;
use super::harness::{write_json, Daemon};
use gatid::api::wire::Dtype;

/// Options of `gatid bench caches`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shorter streams (of the ImageNet ones only 300 steady recurring-objects
    /// frames, after a warm start on 700 warm-up frames).
    #[arg(long)]
    pub quick: bool,
    /// Node config with the `cifar10`, `fmnist` and `imagenet` models.
    #[arg(long, default_value = "configs/cpu.toml")]
    pub config: PathBuf,
    #[arg(long, default_value = "bench/results/caches.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench/results/caches.png")]
    pub plot: PathBuf,
    /// Run only this workload (video, fmnist_local, fmnist_shuffled, recurring,
    /// recurring_shuffled, vtest, vtest_warm, megamind_bugy, megamind_bugy_warm).
    #[arg(long)]
    pub only: Option<String>,
    /// Warm-start the caches of the Fashion-MNIST streams first (`cache train`
    /// with 4096 *training* images, disjoint from the test images the streams
    /// replay); the video has no disjoint calibration data and starts cold.
    #[arg(long)]
    pub calibrate: bool,
    /// Confidence of the learned caches: `softmax` or `learned` (default: the
    /// config's default).
    #[arg(long)]
    pub selector: Option<String>,
    /// Measure the modes one after another (each charged only its own
    /// trainer) instead of interleaving their requests; for a quiet machine.
    #[arg(long)]
    pub sequential: bool,
}

/// What one mode measured on one workload.
struct Trace {
    latency: Vec<Duration>,
    exit: Vec<u16>,
    class: Vec<usize>,
    mem_bytes: f64,
    /// Cumulative oracle exits (stage -> rows) at each segment's end.
    oracle: Vec<BTreeMap<usize, f64>>,
    /// Per-stage cost measured at load, µs (batch 1).
    stage_us: Vec<f64>,
}

const MODES: [&str; 3] = ["none", "learned", "knn"];

/// One mode's daemon and client while a stream is measured.
struct Running {
    daemon: Daemon,
    client: gatid::client::Client,
    trace: Trace,
}

/// Starts a daemon serving only the stream's model, with `mode`'s cache, and
/// warm-starts its caches when the stream says so.
fn start_mode(
    config: &Path,
    w: &Workload,
    mode: &str,
    calibrate: bool,
    selector: Option<&str>,
) -> anyhow::Result<Running> {
    let daemon = Daemon::start_with(config, |t| {
        if let Some(toml::Value::Array(models)) = t.get_mut("models") {
            // Only the stream's model: the others' load time is not this run's.
            models.retain(|m| m.get("name").and_then(toml::Value::as_str) == Some(w.model));
            for m in models.iter_mut().filter_map(toml::Value::as_table_mut) {
                m.remove("cache");
                if mode != "none" {
                    let mut c = toml::Table::new();
                    c.insert("kind".into(), toml::Value::String(mode.into()));
                    if let Some(s) = selector.filter(|_| mode == "learned") {
                        c.insert("selector".into(), toml::Value::String(s.into()));
                    }
                    m.insert("cache".into(), toml::Value::Table(c));
                }
            }
        }
    })?;
    let mut client = daemon.client()?;
    if calibrate && mode != "none" && w.model == "fmnist" {
        warm_start(&mut client, config, w.model)?;
    }
    if !w.warm.is_empty() && mode != "none" {
        let set = gatid::client::calibrate::CalibrationSet {
            shape: w.shape,
            images: w.warm.iter().map(|&f| w.frames.get(f as usize).to_vec()).collect(),
        };
        train_on(&mut client, w.model, &set)?;
    }
    let info = client.model_info(w.model)?;
    let stage_us = info["model"]["stages"]
        .as_array()
        .map(|v| v.iter().map(|s| s["cost_us_batch1"].as_f64().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    let trace = Trace {
        latency: Vec::new(),
        exit: Vec::new(),
        class: Vec::new(),
        mem_bytes: 0.0,
        oracle: Vec::new(),
        stage_us,
    };
    Ok(Running { daemon, client, trace })
}

/// Every mode on one stream. Interleaved (default): request i goes to each
/// mode's daemon in turn before request i + 1, so load that comes and goes on
/// the machine weighs on every mode alike (measured one after another on a
/// shared machine, the modes of one run differed by more than the caches did);
/// but the trainers then run during every mode's requests, so their CPU is
/// charged to all modes alike. `sequential`: one mode's daemon at a time,
/// each charged only its own trainer (for a quiet machine).
fn run_modes(config: &Path, w: &Workload, args: &Args) -> anyhow::Result<Vec<Trace>> {
    let selector = args.selector.as_deref();
    let start = |m: &str| start_mode(config, w, m, args.calibrate, selector);
    if args.sequential {
        let mut traces = Vec::with_capacity(MODES.len());
        for m in MODES {
            let mut r = start(m)?;
            for i in 0..w.requests() {
                request(&mut r, w, i)?;
            }
            traces.push(finish(r, w)?);
        }
        return Ok(traces);
    }
    let mut running: Vec<Running> = MODES.iter().map(|m| start(m)).collect::<anyhow::Result<_>>()?;
    for i in 0..w.requests() {
        for r in &mut running {
            request(r, w, i)?;
        }
    }
    running.into_iter().map(|r| finish(r, w)).collect()
}

/// Sends request `i` of the stream to `r` and records what came back.
fn request(r: &mut Running, w: &Workload, i: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    let a = r.client.infer(w.model, Dtype::U8, &w.shape, w.image(i), 0)?.ok()?;
    r.trace.latency.push(start.elapsed());
    r.trace.exit.push(a.exit_stage);
    let v = a.floats();
    r.trace.class.push(v.iter().enumerate().fold((0, f32::MIN), |b, (k, &x)| if x > b.1 { (k, x) } else { b }).0);
    if w.segments.iter().any(|s| s.1.end == i + 1) {
        r.trace.oracle.push(oracle_counts(&r.client.stats_text()?, w.model));
    }
    Ok(())
}

/// Reads the cache memory and stops the daemon.
fn finish(mut r: Running, w: &Workload) -> anyhow::Result<Trace> {
    let stats = r.client.stats_text()?;
    r.trace.mem_bytes =
        gatid::telemetry::summary::model_value(&stats, gatid::telemetry::names::CACHE_MEMORY_BYTES, w.model)
            .unwrap_or(0.0);
    drop(r.client);
    r.daemon.stop()?;
    Ok(r.trace)
}

/// `gati_cache_oracle_exits_total` of `model` by stage, from Prometheus text.
fn oracle_counts(text: &str, model: &str) -> BTreeMap<usize, f64> {
    let name = gatid::telemetry::names::ORACLE_EXITS_TOTAL;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{')) {
        let Some((head, value)) = line.rsplit_once(' ') else { continue };
        if !head.contains(&format!("model=\"{model}\"")) {
            continue;
        }
        let stage = head.split("stage=\"").nth(1).and_then(|r| r.split('"').next()).and_then(|s| s.parse().ok());
        if let (Some(stage), Ok(v)) = (stage, value.parse::<f64>()) {
            out.insert(stage, v);
        }
    }
    out
}

/// Mean latency a perfect selector would reach on `counts` (stage -> rows):
/// each row pays the stages up to its oracle exit at the costs measured at
/// load, scaled so the full model costs the no-cache mean (the remainder, if
/// any, is the request path every row pays); lookups are not charged.
fn oracle_mean_ms(counts: &BTreeMap<usize, f64>, stage_us: &[f64], nocache_ms: f64) -> f64 {
    let total_ms: f64 = stage_us.iter().sum::<f64>() / 1e3;
    let (scale, overhead) =
        if total_ms > nocache_ms { (nocache_ms / total_ms, 0.0) } else { (1.0, nocache_ms - total_ms) };
    let cost = |c: usize| overhead + scale * stage_us.iter().take(c).sum::<f64>() / 1e3;
    let n: f64 = counts.values().sum();
    if n == 0.0 {
        return f64::NAN;
    }
    counts.iter().map(|(&c, &k)| k * cost(c)).sum::<f64>() / n
}

fn ms(d: &[Duration], q: Option<f64>) -> f64 {
    let mut v: Vec<f64> = d.iter().map(|x| x.as_secs_f64() * 1e3).collect();
    match q {
        None => v.iter().sum::<f64>() / v.len().max(1) as f64,
        Some(q) => {
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
        }
    }
}

/// Speedup, disagreement, exits and oracle of one segment of one stream.
fn segment_json(w: &Workload, k: usize, start: &str, range: &Range<usize>, per_mode: &[Trace]) -> serde_json::Value {
    let (n, l, kn) = (&per_mode[0], &per_mode[1], &per_mode[2]);
    let lat = |t: &Trace| t.latency[range.clone()].to_vec();
    let mean = |t: &Trace| ms(&lat(t), None);
    let disagree = |t: &Trace| {
        let pairs = t.class[range.clone()].iter().zip(&n.class[range.clone()]);
        pairs.filter(|(a, b)| a != b).count() as f64 / range.len().max(1) as f64
    };
    let exits = |t: &Trace| {
        let mut m = BTreeMap::new();
        for e in &t.exit[range.clone()] {
            *m.entry(e.to_string()).or_insert(0u64) += 1;
        }
        m
    };
    let hit_rate = |t: &Trace| {
        let last = n.exit.iter().copied().max().unwrap_or(0);
        let m: BTreeMap<String, f64> = exits(t)
            .into_iter()
            .filter(|(e, _)| e.parse::<u16>().is_ok_and(|e| e < last))
            .map(|(e, c)| (e, c as f64 / range.len().max(1) as f64))
            .collect();
        json!(m)
    };
    let oracle = |t: &Trace| {
        let end = &t.oracle[k];
        let counts: BTreeMap<usize, f64> = match k.checked_sub(1).map(|j| &t.oracle[j]) {
            Some(before) => end.iter().map(|(&c, &v)| (c, v - before.get(&c).copied().unwrap_or(0.0))).collect(),
            None => end.clone(),
        };
        mean(n) / oracle_mean_ms(&counts, &t.stage_us, mean(n))
    };
    json!({
        "workload": w.name, "stream": w.name, "model": w.model, "start": start, "requests": range.len(),
        "nocache_mean_ms": mean(n), "nocache_p50_ms": ms(&lat(n), Some(0.5)), "nocache_p99_ms": ms(&lat(n), Some(0.99)),
        "learned_mean_ms": mean(l), "learned_p50_ms": ms(&lat(l), Some(0.5)), "learned_p99_ms": ms(&lat(l), Some(0.99)),
        "knn_mean_ms": mean(kn), "knn_p50_ms": ms(&lat(kn), Some(0.5)), "knn_p99_ms": ms(&lat(kn), Some(0.99)),
        "speedup_learned": mean(n) / mean(l), "speedup_knn": mean(n) / mean(kn),
        "disagreement_learned": disagree(l), "disagreement_knn": disagree(kn),
        "mem_bytes_learned": l.mem_bytes, "mem_bytes_knn": kn.mem_bytes,
        "exits_learned": json!(exits(l)), "exits_knn": json!(exits(kn)),
        "hit_rate_learned": hit_rate(l), "hit_rate_knn": hit_rate(kn),
        "oracle_speedup": oracle(l), "oracle_speedup_knn": oracle(kn),
    })
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let root = args.config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    if let Some(s) = args.selector.as_deref().filter(|s| !["softmax", "learned"].contains(s)) {
        bail!("--selector `{s}`: expected softmax or learned");
    }
    let selector = args.selector.as_deref();
    let workloads = super::cache_streams::load(&root, args.quick, args.only.as_deref())?;
    println!(
        "gatid bench caches{}{} (learned selector: {})",
        if args.quick { " (quick)" } else { "" },
        if args.sequential { ", modes one after another" } else { ", modes interleaved request by request" },
        selector.unwrap_or("default")
    );
    let started = Instant::now();
    let mut results = Vec::new();
    let mut traces = Vec::new();
    for w in &workloads {
        let t0 = Instant::now();
        let per_mode = run_modes(&args.config, w, &args)?;
        println!("  {:<18} ({:.0} s, daemons' start-up and warm start included)", w.name, t0.elapsed().as_secs_f64());
        for (mode, t) in MODES.iter().zip(&per_mode) {
            let mut per_cut = BTreeMap::new();
            t.exit.iter().for_each(|&e| *per_cut.entry(e).or_insert(0u64) += 1);
            println!(
                "  {:<18} {:<8} {} requests, mean {:.3} ms, answered at stage {per_cut:?}",
                w.name,
                mode,
                t.latency.len(),
                ms(&t.latency, None)
            );
        }
        for (k, (start, range)) in w.segments.iter().enumerate() {
            let start = if args.calibrate && w.model == "fmnist" { "warm" } else { start };
            results.push(segment_json(w, k, start, range, &per_mode));
        }
        traces.push(per_mode);
    }
    println!();
    println!(
        "{:<18} {:<6} {:>6} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>10} {:>10}",
        "stream",
        "start",
        "n",
        "none ms",
        "learned",
        "knn",
        "x lrn",
        "x knn",
        "oracle",
        "dis lrn",
        "dis knn",
        "mem lrn",
        "mem knn"
    );
    for r in &results {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<18} {:<6} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>7.2} {:>7.2} {:>7.2} {:>8.4} {:>8.4} {:>10.0} {:>10.0}",
            r["stream"].as_str().unwrap_or(""),
            r["start"].as_str().unwrap_or(""),
            r["requests"].as_u64().unwrap_or(0),
            f("nocache_mean_ms"),
            f("learned_mean_ms"),
            f("knn_mean_ms"),
            f("speedup_learned"),
            f("speedup_knn"),
            f("oracle_speedup"),
            f("disagreement_learned"),
            f("disagreement_knn"),
            f("mem_bytes_learned"),
            f("mem_bytes_knn")
        );
    }
    // Serving p99 with the trainer idle vs flat out (whenever a Fashion-MNIST stream ran).
    let trainer = match workloads.iter().find(|w| w.model == "fmnist") {
        Some(w) => super::trainer_p99::run(&args.config, &root, w, args.quick)?,
        None => serde_json::Value::Null,
    };
    write_json(
        &args.out,
        &json!({
            "quick": args.quick, "sequential": args.sequential, "selector": selector,
            "workloads": results, "trainer_p99": trainer,
        }),
    )?;
    plot(&args.plot, &traces)?;
    println!("wrote {} and {} ({:.0} s)", args.out.display(), args.plot.display(), started.elapsed().as_secs_f64());
    if results.is_empty() {
        bail!("no workload ran");
    }
    Ok(())
}

/// One panel per stream: moving-average latency (top half; grey none, blue
/// learned, orange knn) and exit stage as a share of the model's stages
/// (bottom half; blue learned, orange knn; 1 = the full model).
fn plot(path: &Path, traces: &[Vec<Trace>]) -> anyhow::Result<()> {
    const W: u32 = 900;
    const H: u32 = 260;
    let colours = [[150u8, 150, 150], [31, 119, 180], [255, 127, 14]];
    let mut img = image::RgbImage::from_pixel(W, H * traces.len().max(1) as u32, image::Rgb([255, 255, 255]));
    for (p, per_mode) in traces.iter().enumerate() {
        let y0 = p as u32 * H;
        let n = per_mode[0].latency.len().max(2);
        let smooth = |v: &[f64]| -> Vec<f64> {
            let k = (v.len() / 60).max(5);
            (0..v.len())
                .map(|i| {
                    let a = i.saturating_sub(k);
                    v[a..=i].iter().sum::<f64>() / (i - a + 1) as f64
                })
                .collect()
        };
        let lat: Vec<Vec<f64>> = per_mode
            .iter()
            .map(|t| smooth(&t.latency.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>()))
            .collect();
        let top = lat.iter().flatten().copied().fold(0.0f64, f64::max).max(1e-6) * 1.1;
        let last = f64::from(per_mode[0].exit.iter().copied().max().unwrap_or(1).max(1));
        for x in 0..W {
            img.put_pixel(x, y0 + H / 2, image::Rgb([200, 200, 200]));
            img.put_pixel(x, y0 + H - 1, image::Rgb([0, 0, 0]));
        }
        for (m, series) in lat.iter().enumerate() {
            for (i, v) in series.iter().enumerate() {
                let x = (i as f64 / (n - 1) as f64 * f64::from(W - 1)) as u32;
                let y = y0 + (H / 2 - 2) - ((v / top) * f64::from(H / 2 - 4)) as u32;
                img.put_pixel(x, y, image::Rgb(colours[m]));
            }
        }
        for (m, t) in per_mode.iter().enumerate().skip(1) {
            let stage: Vec<f64> = t.exit.iter().map(|&e| f64::from(e) / last).collect();
            for (i, v) in smooth(&stage).iter().enumerate() {
                let x = (i as f64 / (n - 1) as f64 * f64::from(W - 1)) as u32;
                let y = y0 + H - 2 - (v.min(1.0) * f64::from(H / 2 - 4)) as u32;
                img.put_pixel(x, y, image::Rgb(colours[m]));
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path)?;
    Ok(())
}

/// Sends `set` as calibration rows and waits for the training they start.
fn train_on(
    client: &mut gatid::client::Client,
    model: &str,
    set: &gatid::client::calibrate::CalibrationSet,
) -> anyhow::Result<()> {
    gatid::client::calibrate::send(client, model, set, 16, |_| {})?;
    let v = client.control_json(gatid::api::wire::Kind::CacheTrain, gatid::api::wire::model_id(model), &[])?;
    let generation = v["generation"].as_u64().unwrap_or(0);
    let (rows, needed) = (v["window_rows"].as_u64().unwrap_or(0), v["rows_needed"].as_u64().unwrap_or(0));
    if rows < needed {
        // Too few rows for any training: measured as it is (cold), and said so.
        println!(
            "  ({model}: warm start of {} images left {rows} window rows, a training needs {needed})",
            set.images.len()
        );
        return Ok(());
    }
    if !gatid::client::calibrate::wait_trained(client, model, generation, Duration::from_secs(300))? {
        bail!("calibration training of {model} did not finish within 300 s");
    }
    Ok(())
}

/// Sends 4096 Fashion-MNIST training images as calibration rows and waits for the training.
fn warm_start(client: &mut gatid::client::Client, config: &Path, model: &str) -> anyhow::Result<()> {
    let root = config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let file = root.join("data/fashion-mnist/calib-images-idx3-ubyte");
    let mut set = gatid::client::calibrate::read(&file, [28, 28, 1]).map_err(anyhow::Error::msg)?;
    set.images.truncate(4096);
    train_on(client, model, &set)
}
