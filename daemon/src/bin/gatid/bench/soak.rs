//! `gatid bench soak`: one daemon (both CPU models, caches on `fmnist`, the
//! `classify` DAG) under a long mixed load from 64 client connections — Infer
//! on both models with real images, DAG invocations — and hostile traffic on
//! connections of its own (invalid frames, expanding shapes, oversized
//! payloads, clients that hang up mid-request).
//!
//! Promises: every valid request carries a unique id and a known answer (the
//! full model's top-1, computed through the daemon before the load with
//! calibration requests); each is counted as answered right, lost,
//! duplicated or mismatched (a cache answer that disagrees is counted apart,
//! against the model's budget); every hostile frame must get an error status
//! or a closed connection, never `Ok`. The daemon's RSS, open fds and queued
//! bytes are sampled every second. Prints a table, writes
//! `bench/results/soak.json` and a PNG of RSS over time, and fails (non-zero
//! exit) on any lost, duplicated or mismatched answer, any hostile `Ok` or
//! unanswered hostile frame, any valid request answered with an error, or
//! open fds that do not return to their start count.

mod hostile;
mod inputs;
mod monitor;
mod report;
mod traffic;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use toml::Value;

use super::harness::Daemon;
use gatid::api::wire::Kind;

/// Options of `gatid bench soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ~50 000 requests instead of 1 000 000 (about a minute).
    #[arg(long)]
    pub quick: bool,
    /// Total requests, valid and hostile (overrides the default of the mode).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Concurrent connections sending valid requests.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Node config with the cifar10 model and the `classify` DAG.
    #[arg(long, default_value = "configs/dag.toml")]
    pub config: PathBuf,
    /// Config whose `fmnist` model is added (with a learned cache).
    #[arg(long, default_value = "configs/cpu.toml")]
    pub models_from: PathBuf,
    /// Leave out the expanding-shape frames (u8 `[N,1,1,1]` that a resize
    /// would blow up to GiBs of f32; before sizes were bounded before
    /// allocation, one such frame aborted the daemon).
    #[arg(long)]
    pub no_expanding: bool,
    /// Leave out the headers that declare a payload of nearly
    /// `max_frame_bytes` and stall after its first byte, each hostile thread
    /// holding its last few open (before payload bytes were charged as they
    /// arrive, 16 of them held the whole budget and every other client got `Busy`).
    #[arg(long)]
    pub no_stalled_headers: bool,
    #[arg(long, default_value = "bench/results/soak.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench/results/soak.png")]
    pub plot: PathBuf,
}

/// Requests each valid connection keeps in flight.
const WINDOW: usize = 4;
/// Share of all requests that are hostile (on their own connections).
const HOSTILE_SHARE: f64 = 0.02;
/// Threads sending hostile traffic.
const HOSTILE_THREADS: usize = 4;
/// Share of the run counted as warm-up (`rss_warm_mb` is taken after it).
const WARMUP_SHARE: f64 = 0.05;
/// The DAG's deadline for soak requests: long, so load never expires one.
const DAG_DEADLINE_US: u32 = 30_000_000;
/// Warm workers per function, fixed so the worker set (and its fds) does not
/// follow the load.
const WARM_WORKERS: i64 = 2;

/// Time limit of every function. The soak checks answers, not latency: its
/// closed-loop load keeps ~1000 rows queued at the cifar10 batcher, which the
/// DAG's model step waits behind, so dag.toml's 500 ms limit would time it out
/// (three times in a row now and then: `Internal`, "no attempts left").
const FUNCTION_TIME_LIMIT_MS: i64 = 10_000;

/// State shared by every load thread and the monitor.
pub(crate) struct Progress {
    /// Next valid ticket to hand out.
    pub next: AtomicU64,
    /// Valid requests finished (answered or given up as lost).
    pub valid_done: AtomicU64,
    /// Hostile acts finished.
    pub hostile_done: AtomicU64,
    /// The valid load is over (hostile threads stop).
    pub valid_over: AtomicBool,
    /// The daemon stopped accepting connections: everyone stops.
    pub abort: AtomicBool,
}

impl Progress {
    pub fn done(&self) -> u64 {
        self.valid_done.load(Ordering::Relaxed) + self.hostile_done.load(Ordering::Relaxed)
    }
}

/// The soak deployment: dag.toml's cifar10 + classify, cpu.toml's fmnist with
/// a learned cache, one SGS, fixed warm pools, long function time limits.
fn tweak(t: &mut toml::Table, fmnist: Value) {
    if let Some(Value::Array(models)) = t.get_mut("models") {
        models.retain(|m| m.get("name").and_then(Value::as_str) != Some("fmnist"));
        models.push(fmnist);
    }
    if let Some(Value::Array(functions)) = t.get_mut("functions") {
        for f in functions.iter_mut().filter_map(Value::as_table_mut) {
            f.insert("min_warm".into(), Value::Integer(WARM_WORKERS));
            f.insert("max_warm".into(), Value::Integer(WARM_WORKERS));
            f.insert("time_limit_ms".into(), Value::Integer(FUNCTION_TIME_LIMIT_MS));
        }
    }
    if let Some(Value::Array(dags)) = t.get_mut("dags") {
        dags.retain(|d| d.get("name").and_then(Value::as_str) == Some(traffic::DAG));
        for d in dags.iter_mut().filter_map(Value::as_table_mut) {
            d.insert("min_sgs".into(), Value::Integer(1));
            d.insert("max_sgs".into(), Value::Integer(1));
        }
    }
    let dispatch = t.entry("dispatch").or_insert_with(|| Value::Table(Default::default()));
    if let Value::Table(d) = dispatch {
        d.insert("scaling".into(), Value::Boolean(false));
    }
}

/// cpu.toml's `fmnist` entry, its path made absolute, with a learned cache.
fn fmnist_entry(models_from: &Path) -> anyhow::Result<(Value, f64)> {
    let text = std::fs::read_to_string(models_from).with_context(|| format!("reading {}", models_from.display()))?;
    let table: toml::Table = toml::from_str(&text)?;
    let base = models_from.parent().map(Path::to_path_buf).unwrap_or_default().canonicalize()?;
    let mut m = table
        .get("models")
        .and_then(Value::as_array)
        .and_then(|ms| ms.iter().find(|m| m.get("name").and_then(Value::as_str) == Some("fmnist")))
        .and_then(Value::as_table)
        .cloned()
        .with_context(|| format!("no model `fmnist` in {}", models_from.display()))?;
    if let Some(Value::String(p)) = m.get_mut("path") {
        *p = base.join(&*p).display().to_string();
    }
    let mut cache = match m.remove("cache") {
        Some(Value::Table(c)) => c,
        _ => toml::Table::new(),
    };
    cache.insert("kind".into(), Value::String("learned".into()));
    let budget = cache.get("budget").and_then(Value::as_float).unwrap_or(0.01);
    m.insert("cache".into(), Value::Table(cache));
    Ok((Value::Table(m), budget))
}

/// `[server] max_frame_bytes` of `config` (the daemon's default when unset).
fn max_frame_bytes(config: &Path) -> anyhow::Result<u64> {
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(config)?)?;
    Ok(table
        .get("server")
        .and_then(|s| s.get("max_frame_bytes"))
        .and_then(Value::as_integer)
        .map_or(16 << 20, |v| v as u64))
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let total = args.requests.unwrap_or(if args.quick { 50_000 } else { 1_000_000 });
    let hostile_total = (total as f64 * HOSTILE_SHARE).round() as u64;
    let valid_total = total - hostile_total;
    let root = std::env::current_dir()?;
    let (fmnist, budget) = fmnist_entry(&args.models_from)?;
    let max_frame = max_frame_bytes(&args.config)?;
    for program in ["gati-fn-preprocess", "gati-fn-topk"] {
        let p = root.join("target/release").join(program);
        anyhow::ensure!(p.exists(), "{} missing: cargo build --release --workspace", p.display());
    }
    println!(
        "gatid bench soak{}: {total} requests ({valid_total} valid on {} connections, ~{hostile_total} hostile{}{})",
        if args.quick { " (quick)" } else { "" },
        args.clients,
        if args.no_expanding { ", no expanding shapes" } else { "" },
        if !args.no_stalled_headers { ", stalled big headers" } else { "" }
    );
    let daemon = Daemon::start_with(&args.config, |t| tweak(t, fmnist))?;
    let mut monitor_conn = daemon.client()?;
    let pid = monitor_conn.control_json(Kind::Health, 0, &[])?["pid"].as_u64().context("Health has no pid")? as u32;

    let started = Instant::now();
    let inputs = Arc::new(inputs::load(&root, &daemon, args.quick)?);
    println!(
        "references: {} CIFAR-10 images (DAG agrees on all), {} Fashion-MNIST images ({} stages; caches {}), in {:.1} s",
        inputs.cifar.len(),
        inputs.fmnist.len(),
        inputs.fmnist_stages,
        if inputs.trained_before_load { "trained" } else { "not trained yet" },
        started.elapsed().as_secs_f64()
    );

    inputs::every_batch_size(&daemon, &inputs)?;
    let start = monitor::steady(pid, &mut monitor_conn)?;
    let progress = Arc::new(Progress {
        next: AtomicU64::new(0),
        valid_done: AtomicU64::new(0),
        hostile_done: AtomicU64::new(0),
        valid_over: AtomicBool::new(false),
        abort: AtomicBool::new(false),
    });
    let load_started = Instant::now();
    let valid: Vec<_> = (0..args.clients)
        .map(|conn| {
            let (socket, inputs, progress) = (daemon.socket.clone(), Arc::clone(&inputs), Arc::clone(&progress));
            std::thread::spawn(move || traffic::client(conn, &socket, &inputs, &progress, valid_total))
        })
        .collect();
    let hostile_plan = Arc::new(hostile::Plan {
        share: HOSTILE_SHARE,
        quota: hostile_total,
        max_frame_bytes: max_frame,
        expanding: !args.no_expanding,
        stalled: !args.no_stalled_headers,
    });
    let bad: Vec<_> = (0..HOSTILE_THREADS)
        .map(|k| {
            let (socket, inputs, progress) = (daemon.socket.clone(), Arc::clone(&inputs), Arc::clone(&progress));
            let plan = Arc::clone(&hostile_plan);
            std::thread::spawn(move || hostile::client(k, &socket, &inputs, &progress, &plan))
        })
        .collect();

    let warm_at = (total as f64 * WARMUP_SHARE) as u64;
    let series = monitor::watch(pid, &mut monitor_conn, &progress, load_started, warm_at, || {
        valid.iter().all(std::thread::JoinHandle::is_finished)
    });
    progress.valid_over.store(true, Ordering::Relaxed);
    let mut tallies = traffic::Tallies::default();
    for t in valid {
        tallies.merge(t.join().map_err(|_| anyhow::anyhow!("a soak client panicked"))?);
    }
    let mut hostile_tallies = hostile::Tallies::default();
    for t in bad {
        hostile_tallies.merge(t.join().map_err(|_| anyhow::anyhow!("a hostile client panicked"))?);
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let (end, settle_s, gone) = match monitor::settle(pid, &mut monitor_conn, start.fds) {
        Ok((end, secs)) => (end, secs, None),
        Err(e) => (monitor::Snapshot::gone(), 0.0, Some(format!("{e:#}"))),
    };
    let cache_state = monitor::cache_state(&mut monitor_conn, "fmnist");
    let still_serving = inputs::still_serving(&daemon, &inputs);
    drop(monitor_conn);
    let stopped = daemon.stop().map_err(|e| format!("{e:#}"));

    let r = report::Report {
        args: &args,
        budget,
        load_secs,
        start,
        end,
        settle_s,
        gone,
        series: &series,
        valid: &tallies,
        hostile: &hostile_tallies,
        cache_state,
        trained_before_load: inputs.trained_before_load,
        still_serving,
        stopped,
    };
    r.finish()
}
