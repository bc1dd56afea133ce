//! `gatid bench dispatch`: deadline-aware DAG dispatch (least slack,
//! proactive warm pools, LB scaling) against an OpenWhisk-style baseline
//! (one FIFO queue that ignores deadlines, sandboxes started on demand and
//! reaped after a keep-alive, one SGS) — the same daemon, sandboxes and
//! functions, each mode in a fresh daemon, in one run.
//!
//! The mix: four DAGs with different deadlines and execution times — three
//! of `gati-fn-work` functions doing real hashing and the `classify` DAG of
//! `configs/dag.toml`. Capacity is measured first (closed loop); then an
//! open-loop trace (Poisson, with 3× bursts) is replayed at fractions of it.
//! Prints a table, writes `bench/results/dispatch.json` and a PNG.
//!
//! `--steer ebpf` adds a mode, `gati+ebpf`: gati with kernel steering of its
//! Unix clients (`[steer] mode = "ebpf"`, `unix = "kernel"`: whole `InvokeDag`
//! writes go from the client's connection straight to the SGS's socket), on
//! the same trace, so its deadline figures sit next to gati's (needs root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use toml::Value;

use super::harness::{write_json, Daemon};
use super::loadgen::{self, Arrival, Bursts, Invocation, Outcome};
use gatid::api::wire::Status;

/// Options of `gatid bench dispatch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One load level (0.8) and a short trace; finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Node config with the `classify` DAG and the cifar10 model.
    #[arg(long, default_value = "configs/dag.toml")]
    pub config: PathBuf,
    #[arg(long, default_value = "bench/results/dispatch.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench/results/dispatch.png")]
    pub plot: PathBuf,
    /// Also run gati with a core budget (`core_budget = true`), without and
    /// with shedding (`shed = true`), to see what each adds.
    #[arg(long)]
    pub ablation: bool,
    /// `ebpf`: also run gati with kernel steering (`gati+ebpf`), same trace.
    #[arg(long, default_value = "userspace", value_parser = ["userspace", "ebpf"])]
    pub steer: String,
}

/// A work DAG: (name, deadline ms, share of the mix, µs of work per function in chain order).
const WORK_DAGS: [(&str, u64, f64, &[u64]); 3] =
    [("thumb", 15, 0.40, &[1000]), ("etl", 40, 0.25, &[2000, 3000]), ("report", 100, 0.10, &[8000])];
const CLASSIFY: (&str, u64, f64) = ("classify", 100, 0.25);
/// gati (defaults), the baseline, and (with `--ablation`) gati with a core
/// budget, without and with shedding.
const MODES: [&str; 4] = ["gati", "baseline", BUDGET, BUDGET_SHED];
const BUDGET: &str = "gati+budget";
const BUDGET_SHED: &str = "gati+budget+shed";
/// gati with the kernel steering its Unix clients (`--steer ebpf`).
const EBPF: &str = "gati+ebpf";
/// gati's SGS count bound per DAG; the baseline's single SGS gets as many workers in total.
const MAX_SGS: i64 = 2;
const MAX_WARM: i64 = 4;
const CONNECTIONS: usize = 4;
const BURSTS: Bursts = Bursts { period: Duration::from_secs(5), length: Duration::from_millis(250), factor: 3.0 };

/// The sdk binaries sit next to this executable.
fn sdk_program(name: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join(name);
    anyhow::ensure!(p.exists(), "{} missing: cargo build --release --workspace", p.display());
    Ok(p.display().to_string())
}

fn table(pairs: &[(&str, Value)]) -> Value {
    Value::Table(pairs.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect())
}

/// The bench deployment on top of the config's models and classify functions.
fn tweak(t: &mut toml::Table, mode: &str) -> anyhow::Result<()> {
    if let Some(Value::Table(s)) = t.get_mut("server") {
        s.insert("max_inflight_per_conn".into(), Value::Integer(1 << 20));
    }
    let gati = mode != "baseline";
    let max_warm = if gati { MAX_WARM } else { MAX_WARM * MAX_SGS };
    let mut functions = match t.remove("functions") {
        Some(Value::Array(f)) => f,
        _ => Vec::new(),
    };
    for f in functions.iter_mut().filter_map(Value::as_table_mut) {
        if let Some(Value::String(p)) = f.get("program").cloned() {
            let name = Path::new(&p).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            f.insert("program".into(), Value::String(sdk_program(&name)?));
        }
    }
    let work = sdk_program("gati-fn-work")?;
    let mut dags: Vec<Value> = Vec::new();
    for (dag, deadline, _, chain) in WORK_DAGS {
        let mut names = Vec::new();
        for (k, us) in chain.iter().enumerate() {
            let name = format!("{dag}-{k}");
            functions.push(table(&[
                ("name", Value::String(name.clone())),
                ("kind", Value::String("exec".into())),
                ("program", Value::String(work.clone())),
                ("args", Value::Array(vec![Value::String(us.to_string())])),
                ("memory_mb", Value::Integer(64)),
                ("expected_ms", Value::Float(*us as f64 / 1e3)),
            ]));
            names.push(Value::String(name));
        }
        dags.push(table(&[
            ("name", Value::String(dag.into())),
            ("deadline_ms", Value::Float(deadline as f64)),
            ("chain", Value::Array(names)),
            ("max_sgs", Value::Integer(MAX_SGS)),
        ]));
    }
    // Same pools for both modes: nothing pre-provisioned, the same worker bound per node.
    for f in functions.iter_mut().filter_map(Value::as_table_mut) {
        f.insert("min_warm".into(), Value::Integer(0));
        f.insert("max_warm".into(), Value::Integer(max_warm));
    }
    let mut kept: Vec<Value> = match t.remove("dags") {
        Some(Value::Array(d)) => d,
        _ => Vec::new(),
    };
    kept.retain(|d| d.get("name").and_then(Value::as_str) == Some(CLASSIFY.0));
    for d in kept.iter_mut().filter_map(Value::as_table_mut) {
        d.insert("deadline_ms".into(), Value::Float(CLASSIFY.1 as f64));
        d.insert("max_sgs".into(), Value::Integer(MAX_SGS));
    }
    kept.extend(dags);
    t.insert("functions".into(), Value::Array(functions));
    t.insert("dags".into(), Value::Array(kept));
    let (order, pool, scaling) = if gati { ("least_slack", "proactive", true) } else { ("fifo", "on_demand", false) };
    t.insert(
        "dispatch".into(),
        table(&[
            ("order", Value::String(order.into())),
            ("pool", Value::String(pool.into())),
            ("scaling", Value::Boolean(scaling)),
            ("core_budget", Value::Boolean(mode == BUDGET || mode == BUDGET_SHED)),
            ("shed", Value::Boolean(mode == BUDGET_SHED)),
        ]),
    );
    if mode == EBPF {
        t.insert(
            "steer".into(),
            table(&[("mode", Value::String("ebpf".into())), ("unix", Value::String("kernel".into()))]),
        );
    }
    Ok(())
}

fn start(config: &Path, mode: &str) -> anyhow::Result<Daemon> {
    let mut err = None;
    let d = Daemon::start_with(config, |t| err = tweak(t, mode).err())?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(d)
}

fn mix(root: &Path) -> anyhow::Result<Vec<Invocation>> {
    let dir = root.join("data/cifar10");
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: run scripts/setup.sh", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    pngs.sort();
    let images = pngs.iter().map(std::fs::read).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!images.is_empty(), "no PNGs in {}", dir.display());
    let mut m: Vec<Invocation> = WORK_DAGS
        .iter()
        .map(|(dag, ms, w, _)| Invocation {
            dag: (*dag).into(),
            deadline: Duration::from_millis(*ms),
            weight: *w,
            inputs: vec![vec![7u8; 256]],
        })
        .collect();
    m.push(Invocation {
        dag: CLASSIFY.0.into(),
        deadline: Duration::from_millis(CLASSIFY.1),
        weight: CLASSIFY.2,
        inputs: images,
    });
    Ok(m)
}

/// What one mode did at one load.
#[derive(Debug, Clone, serde::Serialize)]
struct Level {
    requests: usize,
    deadline_met: f64,
    /// Over arrivals outside bursts and the second after each.
    deadline_met_steady: f64,
    p50_ms: f64,
    p99_ms: f64,
    cold_starts: f64,
    per_dag_met: Vec<(String, f64)>,
    /// Requests the kernel steered to their SGS (`gati+ebpf` only).
    kernel_steered: Option<u64>,
}

/// Latency as counted: an answer other than the output counts as at least its deadline.
fn counted(o: &Outcome, deadline: Duration, grace_end: Duration) -> Duration {
    match (o.latency, o.status) {
        (Some(l), Some(Status::Ok)) => l,
        (Some(l), _) => l.max(deadline),
        _ => grace_end,
    }
}

fn summarize(mix: &[Invocation], outcomes: &[Outcome], warmup: Duration, cold: f64) -> Level {
    let measured: Vec<&Outcome> = outcomes.iter().filter(|o| o.at >= warmup).collect();
    let met = |o: &Outcome| o.status == Some(Status::Ok) && o.latency.is_some_and(|l| l <= mix[o.kind].deadline);
    let mut lat: Vec<f64> = measured
        .iter()
        .map(|o| counted(o, mix[o.kind].deadline, Duration::from_secs(60)).as_secs_f64() * 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    let share = |v: &[&Outcome]| v.iter().filter(|o| met(o)).count() as f64 / v.len().max(1) as f64;
    let per_dag_met = mix
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let v: Vec<&Outcome> = measured.iter().copied().filter(|o| o.kind == k).collect();
            (m.dag.clone(), share(&v))
        })
        .collect();
    let steady: Vec<&Outcome> = measured
        .iter()
        .copied()
        .filter(|o| {
            let phase = o.at.as_secs_f64() % BURSTS.period.as_secs_f64();
            phase >= (BURSTS.length + Duration::from_secs(1)).as_secs_f64()
        })
        .collect();
    Level {
        requests: measured.len(),
        deadline_met: share(&measured),
        deadline_met_steady: share(&steady),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        cold_starts: cold,
        per_dag_met,
        kernel_steered: None,
    }
}

fn cold_starts(d: &Daemon) -> anyhow::Result<f64> {
    // The control loop publishes scheduler counters once a second.
    std::thread::sleep(Duration::from_millis(1200));
    let text = d.client()?.stats_text()?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("gati_sched_cold_starts_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let root = args.config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let mix = mix(&root)?;
    let (loads, length, warmup, probe): (&[f64], _, _, _) = if args.quick {
        (&[0.8], Duration::from_secs(8), Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (&[0.5, 0.8, 0.95], Duration::from_secs(22), Duration::from_secs(2), Duration::from_secs(4))
    };
    println!("gatid bench dispatch{}", if args.quick { " (quick)" } else { "" });
    let d = start(&args.config, "gati")?;
    let cap = loadgen::capacity(&d.socket, &mix, 8, probe)?;
    // Each kind alone, one at a time: its cost for the bound on deadlines met.
    let cost = mix
        .iter()
        .map(|m| Ok(1.0 / loadgen::capacity(&d.socket, std::slice::from_ref(m), 1, probe / 4)?))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    d.stop()?;
    println!("  capacity (closed loop, 8 outstanding, gati mode): {cap:.0} requests/s");
    let weights: f64 = mix.iter().map(|m| m.weight).sum();
    let mean_cost = mix.iter().zip(&cost).map(|(m, c)| m.weight * c).sum::<f64>() / weights;
    println!(
        "  solo latency per kind (ms): {}",
        mix.iter().zip(&cost).map(|(m, c)| format!("{} {:.2}", m.dag, c * 1e3)).collect::<Vec<_>>().join(", ")
    );
    let deadlines: Vec<Duration> = mix.iter().map(|m| m.deadline).collect();
    let mut modes: Vec<&str> = MODES.iter().take(if args.ablation { 4 } else { 2 }).copied().collect();
    if args.steer == "ebpf" {
        modes.push(EBPF);
    }
    let mut levels = Vec::new();
    for &load in loads {
        let rate = load * cap;
        let arrivals: Vec<Arrival> = loadgen::trace(&mix, rate, BURSTS, length, 42);
        let bound = super::bound::deadline_met_bound(
            &arrivals,
            warmup,
            &cost,
            &deadlines,
            cap * mean_cost,
            BURSTS.period,
            BURSTS.length,
        );
        println!(
            "  load {load:.2}: no scheduler can meet more than {:.2} % of this trace (fluid bound)",
            100.0 * bound
        );
        let mut per_mode = Vec::new();
        for mode in &modes {
            let d = start(&args.config, mode)?;
            let outcomes = loadgen::replay(&d.socket, &mix, &arrivals, CONNECTIONS, Duration::from_secs(20))?;
            let cold = cold_starts(&d)?;
            let steered = if *mode == EBPF {
                let h = d.client()?.control_json(gatid::api::wire::Kind::Health, 0, b"")?;
                h["steer"]["unix"]["kernel_counters"]["steered"].as_u64()
            } else {
                None
            };
            d.stop()?;
            let mut l = summarize(&mix, &outcomes, warmup, cold);
            l.kernel_steered = steered;
            println!(
                "  load {load:.2} ({rate:.0}/s) {mode:<8} {} requests, {:.2} % deadlines met ({:.2} % outside bursts), p50 {:.2} ms, p99 {:.2} ms, {} cold starts",
                l.requests,
                100.0 * l.deadline_met,
                100.0 * l.deadline_met_steady,
                l.p50_ms,
                l.p99_ms,
                l.cold_starts
            );
            if let Some(n) = l.kernel_steered {
                println!("  load {load:.2} {mode}: {n} requests steered by the kernel");
            }
            per_mode.push(l);
        }
        levels.push((load, rate, bound, per_mode));
    }
    report(&args, cap, &cost, &modes, &levels)
}

/// A load level: load, rate, the bound on deadlines met, and each mode's results.
type LevelRun = (f64, f64, f64, Vec<Level>);

fn report(args: &Args, cap: f64, solo_s: &[f64], modes: &[&str], levels: &[LevelRun]) -> anyhow::Result<()> {
    println!();
    println!(
        "{:>5} {:>7} {:>7} | {:>8} {:>8} {:>8} {:>6} | {:>8} {:>8} {:>8} {:>6} | {:>8} {:>9}",
        "load",
        "req/s",
        "bound",
        "gati met",
        "p50 ms",
        "p99 ms",
        "cold",
        "base met",
        "p50 ms",
        "p99 ms",
        "cold",
        "p99 x",
        "missed x"
    );
    let mut rows = Vec::new();
    for (load, rate, bound, m) in levels {
        let (g, b) = (&m[0], &m[1]);
        let ratio = b.p99_ms / g.p99_ms;
        let miss_ratio = (1.0 - b.deadline_met) / (1.0 - g.deadline_met).max(1e-9);
        println!(
            "{:>5.2} {:>7.0} {:>6.2}% | {:>7.2}% {:>8.2} {:>8.2} {:>6} | {:>7.2}% {:>8.2} {:>8.2} {:>6} | {:>8.2} {:>9.1}",
            load,
            rate,
            100.0 * bound,
            100.0 * g.deadline_met,
            g.p50_ms,
            g.p99_ms,
            g.cold_starts,
            100.0 * b.deadline_met,
            b.p50_ms,
            b.p99_ms,
            b.cold_starts,
            ratio,
            miss_ratio
        );
        let mut row = json!({
            "load": load, "rate_rps": rate, "deadline_met_bound": bound,
            "deadline_met": g.deadline_met, "deadline_met_baseline": b.deadline_met,
            "deadline_met_steady": g.deadline_met_steady, "deadline_met_steady_baseline": b.deadline_met_steady,
            "p50_ms": g.p50_ms, "p50_ms_baseline": b.p50_ms,
            "p99_ms": g.p99_ms, "p99_ms_baseline": b.p99_ms, "p99_ratio": ratio,
            "cold_starts": g.cold_starts, "cold_starts_baseline": b.cold_starts,
            "requests": g.requests,
            "per_dag_met": g.per_dag_met, "per_dag_met_baseline": b.per_dag_met,
        });
        for (mode, u) in modes.iter().zip(m).skip(2) {
            let key = match *mode {
                BUDGET => "budget",
                BUDGET_SHED => "budget_shed",
                _ => "ebpf",
            };
            println!(
                "{:>5} {:>7} {:>7} | {:>7.2}% {:>8.2} {:>8.2} {:>6} | {mode}",
                "",
                "",
                "",
                100.0 * u.deadline_met,
                u.p50_ms,
                u.p99_ms,
                u.cold_starts
            );
            row[format!("deadline_met_{key}")] = json!(u.deadline_met);
            row[format!("deadline_met_steady_{key}")] = json!(u.deadline_met_steady);
            row[format!("p99_ms_{key}")] = json!(u.p99_ms);
            row[format!("per_dag_met_{key}")] = json!(u.per_dag_met);
            row[format!("p50_ms_{key}")] = json!(u.p50_ms);
            if let Some(n) = u.kernel_steered {
                row[format!("kernel_steered_{key}")] = json!(n);
            }
        }
        rows.push(row);
    }
    let dags: Vec<_> = WORK_DAGS
        .iter()
        .map(|(n, ms, w, chain)| json!({"dag": n, "deadline_ms": ms, "share": w, "work_us": chain}))
        .chain(std::iter::once(json!({"dag": CLASSIFY.0, "deadline_ms": CLASSIFY.1, "share": CLASSIFY.2,
            "functions": ["preprocess", "cifar10", "postprocess"]})))
        .collect();
    write_json(
        &args.out,
        &json!({
            "quick": args.quick, "steer": args.steer, "modes": modes, "capacity_rps": cap, "solo_ms": solo_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
            "bound_note": "deadline_met_bound: no scheduler can meet more of the trace (fluid model of the measured capacity; docs in bench/bound.rs)", "connections": CONNECTIONS, "dags": dags,
            "bursts": {"period_s": BURSTS.period.as_secs_f64(), "length_s": BURSTS.length.as_secs_f64(), "factor": BURSTS.factor},
            "latency_note": "from the scheduled send time; an answer other than the output counts as at least its deadline",
            "levels": rows,
        }),
    )?;
    super::plot::dispatch(
        &args.plot,
        levels.iter().map(|(l, _, _, m)| (*l, [&m[0], &m[1]].map(|x| (x.deadline_met, x.p99_ms)))),
    )?;
    println!("wrote {} and {}", args.out.display(), args.plot.display());
    Ok(())
}
