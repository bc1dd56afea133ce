//! `gatid bench caches`: the same request streams through the daemon over the
//! Unix socket with no cache, learned caches and k-NN caches, in one run:
//! latency, exits, disagreement with the full model, cache memory; a table,
//! `bench/results/caches.json` and a PNG of latency and hit rate along each stream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::harness::{write_json, Daemon};
use gatid::api::wire::Dtype;

/// Options of `gatid bench caches`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shorter streams; finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Node config with the `cifar10` and `fmnist` models.
    #[arg(long, default_value = "configs/cpu.toml")]
    pub config: PathBuf,
    #[arg(long, default_value = "bench/results/caches.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench/results/caches.png")]
    pub plot: PathBuf,
    /// Run only this workload (video, fmnist_local, fmnist_shuffled).
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
}

/// One request stream.
pub(super) struct Workload {
    pub name: &'static str,
    pub model: &'static str,
    pub shape: [u32; 3],
    pub images: Vec<Vec<u8>>,
}

/// What one mode measured on one workload.
struct Trace {
    latency: Vec<Duration>,
    exit: Vec<u16>,
    class: Vec<usize>,
    mem_bytes: f64,
}

const MODES: [&str; 3] = ["none", "learned", "knn"];

/// The three workloads (or only the one called `only`).
pub(super) fn load_workloads(root: &Path, quick: bool, only: Option<&str>) -> anyhow::Result<Vec<Workload>> {
    let frames = std::fs::read(root.join("data/video/vtest_32x32_rgb.u8"))
        .context("data/video missing: run scripts/setup.sh")?;
    let frames: Vec<Vec<u8>> = frames.chunks_exact(32 * 32 * 3).map(<[u8]>::to_vec).collect();
    let video_n = if quick { frames.len() } else { 3 * frames.len() };
    let video = (0..video_n).map(|i| frames[i % frames.len()].clone()).collect();
    let idx =
        std::fs::read(root.join("data/fashion-mnist/t10k-images-idx3-ubyte")).context("data/fashion-mnist missing")?;
    let image = |k: usize| idx[16 + k * 784..16 + (k + 1) * 784].to_vec();
    let stream = |file: &str| -> anyhow::Result<Vec<Vec<u8>>> {
        let b = std::fs::read(root.join("data/workloads").join(file)).with_context(|| format!("{file} missing"))?;
        let n = if quick { 2000 } else { 10_000 };
        Ok(b.chunks_exact(4).take(n).map(|c| image(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)).collect())
    };
    let mut all = vec![
        Workload { name: "video", model: "cifar10", shape: [32, 32, 3], images: video },
        Workload {
            name: "fmnist_local",
            model: "fmnist",
            shape: [28, 28, 1],
            images: stream("fmnist_local_p0.9_seed1.idx")?,
        },
        Workload {
            name: "fmnist_shuffled",
            model: "fmnist",
            shape: [28, 28, 1],
            images: stream("fmnist_shuffled_seed1.idx")?,
        },
    ];
    if let Some(only) = only {
        all.retain(|w| w.name == only);
        if all.is_empty() {
            bail!("no workload called `{only}` (video, fmnist_local, fmnist_shuffled)");
        }
    }
    Ok(all)
}

fn run_mode(config: &Path, w: &Workload, mode: &str, calibrate: bool, selector: Option<&str>) -> anyhow::Result<Trace> {
    let daemon = Daemon::start_with(config, |t| {
        if let Some(toml::Value::Array(models)) = t.get_mut("models") {
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
    let mut t = Trace { latency: Vec::new(), exit: Vec::new(), class: Vec::new(), mem_bytes: 0.0 };
    for img in &w.images {
        let start = Instant::now();
        let r = client.infer(w.model, Dtype::U8, &w.shape, img, 0)?.ok()?;
        t.latency.push(start.elapsed());
        t.exit.push(r.exit_stage);
        let v = r.floats();
        t.class.push(v.iter().enumerate().fold((0, f32::MIN), |b, (k, &x)| if x > b.1 { (k, x) } else { b }).0);
    }
    let stats = client.stats_text()?;
    t.mem_bytes = gatid::telemetry::summary::model_value(&stats, gatid::telemetry::names::CACHE_MEMORY_BYTES, w.model)
        .unwrap_or(0.0);
    drop(client);
    daemon.stop()?;
    Ok(t)
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

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let root = args.config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    if let Some(s) = args.selector.as_deref().filter(|s| !["softmax", "learned"].contains(s)) {
        bail!("--selector `{s}`: expected softmax or learned");
    }
    let selector = args.selector.as_deref();
    let workloads = load_workloads(&root, args.quick, args.only.as_deref())?;
    println!(
        "gatid bench caches{} (learned selector: {})",
        if args.quick { " (quick)" } else { "" },
        selector.unwrap_or("default")
    );
    let mut results = Vec::new();
    let mut traces = Vec::new();
    for w in &workloads {
        let mut per_mode = Vec::new();
        for mode in MODES {
            let t = run_mode(&args.config, w, mode, args.calibrate, selector)?;
            let mut per_cut = std::collections::BTreeMap::new();
            t.exit.iter().for_each(|&e| *per_cut.entry(e).or_insert(0u64) += 1);
            println!(
                "  {:<16} {:<8} {} requests, mean {:.3} ms, answered at stage {per_cut:?}",
                w.name,
                mode,
                t.latency.len(),
                ms(&t.latency, None)
            );
            per_mode.push(t);
        }
        let base = &per_mode[0];
        let disagree = |t: &Trace| {
            t.class.iter().zip(&base.class).filter(|(a, b)| a != b).count() as f64 / base.class.len() as f64
        };
        let exits = |t: &Trace| {
            let mut m = std::collections::BTreeMap::new();
            for e in &t.exit {
                *m.entry(e.to_string()).or_insert(0u64) += 1;
            }
            json!(m)
        };
        let (n, l, k) = (&per_mode[0], &per_mode[1], &per_mode[2]);
        results.push(json!({
            "workload": w.name, "model": w.model, "requests": n.latency.len(),
            "nocache_mean_ms": ms(&n.latency, None), "nocache_p50_ms": ms(&n.latency, Some(0.5)), "nocache_p99_ms": ms(&n.latency, Some(0.99)),
            "learned_mean_ms": ms(&l.latency, None), "learned_p50_ms": ms(&l.latency, Some(0.5)), "learned_p99_ms": ms(&l.latency, Some(0.99)),
            "knn_mean_ms": ms(&k.latency, None), "knn_p50_ms": ms(&k.latency, Some(0.5)), "knn_p99_ms": ms(&k.latency, Some(0.99)),
            "speedup_learned": ms(&n.latency, None) / ms(&l.latency, None),
            "speedup_knn": ms(&n.latency, None) / ms(&k.latency, None),
            "disagreement_learned": disagree(l), "disagreement_knn": disagree(k),
            "mem_bytes_learned": l.mem_bytes, "mem_bytes_knn": k.mem_bytes,
            "exits_learned": exits(l), "exits_knn": exits(k),
        }));
        traces.push(per_mode);
    }
    println!();
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "workload", "none ms", "learned", "knn", "x lrn", "x knn", "dis lrn", "dis knn", "mem lrn", "mem knn"
    );
    for r in &results {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>9.4} {:>9.4} {:>10.0} {:>10.0}",
            r["workload"].as_str().unwrap_or(""),
            f("nocache_mean_ms"),
            f("learned_mean_ms"),
            f("knn_mean_ms"),
            f("speedup_learned"),
            f("speedup_knn"),
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
        &json!({ "quick": args.quick, "selector": selector, "workloads": results, "trainer_p99": trainer }),
    )?;
    plot(&args.plot, &workloads, &traces)?;
    println!("wrote {} and {}", args.out.display(), args.plot.display());
    if results.is_empty() {
        bail!("no workload ran");
    }
    Ok(())
}

/// One panel per workload: moving-average latency (top half; grey none, blue
/// learned, orange knn) and hit rate (bottom half; blue learned, orange knn).
fn plot(path: &Path, workloads: &[Workload], traces: &[Vec<Trace>]) -> anyhow::Result<()> {
    const W: u32 = 900;
    const H: u32 = 260;
    let colours = [[150u8, 150, 150], [31, 119, 180], [255, 127, 14]];
    let mut img = image::RgbImage::from_pixel(W, H * workloads.len() as u32, image::Rgb([255, 255, 255]));
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
        let last = per_mode[0].exit.iter().copied().max().unwrap_or(1);
        for x in 0..W {
            img.put_pixel(x, y0 + H / 2, image::Rgb([200, 200, 200]));
            img.put_pixel(x, y0 + H - 1, image::Rgb([0, 0, 0]));
        }
        for (m, series) in lat.iter().enumerate() {
            for (i, v) in series.iter().enumerate() {
                let x = (i as f64 / (n - 1) as f64 * (W - 1) as f64) as u32;
                let y = y0 + (H / 2 - 2) - ((v / top) * f64::from(H / 2 - 4)) as u32;
                img.put_pixel(x, y, image::Rgb(colours[m]));
            }
        }
        for (m, t) in per_mode.iter().enumerate().skip(1) {
            let hits: Vec<f64> = t.exit.iter().map(|&e| f64::from(u8::from(e < last))).collect();
            for (i, v) in smooth(&hits).iter().enumerate() {
                let x = (i as f64 / (n - 1) as f64 * (W - 1) as f64) as u32;
                let y = y0 + H - 2 - (v * f64::from(H / 2 - 4)) as u32;
                img.put_pixel(x, y, image::Rgb(colours[m]));
            }
        }
        let _ = &workloads[p];
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path)?;
    Ok(())
}

/// Sends 4096 Fashion-MNIST training images as calibration rows and waits for the training.
fn warm_start(client: &mut gatid::client::Client, config: &Path, model: &str) -> anyhow::Result<()> {
    let root = config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let file = root.join("data/fashion-mnist/calib-images-idx3-ubyte");
    let mut set = gatid::client::calibrate::read(&file, [28, 28, 1]).map_err(anyhow::Error::msg)?;
    set.images.truncate(4096);
    gatid::client::calibrate::send(client, model, &set, 16, |_| {})?;
    let v = client.control_json(gatid::api::wire::Kind::CacheTrain, gatid::api::wire::model_id(model), &[])?;
    let generation = v["generation"].as_u64().unwrap_or(0);
    if !gatid::client::calibrate::wait_trained(client, model, generation, Duration::from_secs(120))? {
        bail!("calibration training of {model} did not finish within 120 s");
    }
    Ok(())
}
