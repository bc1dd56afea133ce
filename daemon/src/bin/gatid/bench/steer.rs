//! `gatid bench steer`: DAG round trips over UDP with kernel (eBPF) steering vs
//! the userspace table vs one SGS on one socket, in the same run, at 1, 16 and
//! 64 concurrent closed-loop clients; Unix-socket clients with the kernel's
//! stream verdict (`[steer] unix = "kernel"`, on the kernel daemon) vs the I/O
//! thread's routing (on the userspace daemon); and each program's in-kernel
//! cost per request from `BPF_ENABLE_STATS` (run_time_ns / run_cnt). Writes
//! `bench/results/steer.json`.
//!
//! The DAG is one sandboxed echo function (`gati-fn-testkit echo`), so the
//! round trip is mostly the path steering changes. Modes:
//! - `kernel`: `[steer] mode = "ebpf"`, `unix = "kernel"`, the DAG on 2 SGSs;
//!   the kernel picks the SGS's socket, the SGS reads and answers it;
//! - `userspace`: `mode = "userspace"`, the DAG on 2 SGSs; the UDP I/O thread
//!   reads every datagram and routes it (`Lb::route`) to the SGS's inbox;
//! - `single`: `mode = "userspace"`, the DAG on 1 SGS (one socket, no choice).
//!
//! Needs root (BPF, sandboxes) and the sdk's binaries (`cargo build --release -p gati-sdk`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::harness::{write_json, Daemon};
use gatid::api::wire::{Kind, Status};
use gatid::client::udp::UdpClient;
use gatid::client::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer requests per client count (finishes in about a minute).
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value = "bench/results/steer.json")]
    pub out: PathBuf,
    /// Client counts to measure (default 1, 16 and 64).
    #[arg(long, value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// Requests per client count and path (default 100 000; 3 000 with --quick).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Only these paths (udp_kernel, udp_userspace, udp_single, unix_kernel,
    /// unix_userspace), e.g. to profile one; ratios need both of a pair.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The echo workers' `[[functions]] sched` ("batch", the default, or "normal").
    #[arg(long, default_value = "batch", value_parser = ["batch", "normal"])]
    pub worker_sched: String,
}

const CLIENTS: [usize; 3] = [1, 16, 64];
const MODES: [&str; 3] = ["kernel", "userspace", "single"];
const INPUT: &[u8] = b"steer-bench-input-0123456789abcdef";

/// Requests each client sends at `clients` concurrent clients.
fn per_client(clients: usize, args: &Args) -> usize {
    let total = args.requests.unwrap_or(if args.quick { 3000 } else { 100_000 });
    (total / clients).max(50)
}

fn config(dir: &Path, mode: &str, sched: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("gatid's directory")?;
    let testkit = bin.join("gati-fn-testkit");
    if !testkit.exists() {
        bail!("{} is missing: cargo build --release -p gati-sdk", testkit.display());
    }
    let (steer, sgs) = match mode {
        "kernel" => ("ebpf\"\nunix = \"kernel", 2),
        "userspace" => ("userspace", 2),
        _ => ("userspace", 1),
    };
    let text = format!(
        "[server]\nudp = \"127.0.0.1:0\"\n\n[steer]\nmode = \"{steer}\"\n\n\
         [[functions]]\nname = \"echo\"\nkind = \"exec\"\nprogram = \"{}\"\nargs = [\"echo\"]\nexpected_ms = 0.1\n\
         min_warm = 4\nmemory_mb = 64\nsched = \"{sched}\"\n\n[[dags]]\nname = \"echo\"\ndeadline_ms = 2000\nchain = [\"echo\"]\n\
         min_sgs = {sgs}\nmax_sgs = {sgs}\n",
        testkit.display()
    );
    let path = dir.join(format!("steer-{mode}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Round trips of `clients` closed-loop clients, each sending `n` requests.
/// Throughput counts only the window in which every client is sending: from
/// the common start (after all have connected) to the moment the first client
/// is done, so neither connecting nor the tail of the last stragglers (fewer
/// clients in flight) enters it.
struct Run {
    rtts: Vec<Duration>,
    /// Requests answered inside the all-clients window, and its length.
    window_done: usize,
    window: Duration,
    errors: usize,
}

impl Run {
    fn empty() -> Self {
        Run { rtts: Vec::new(), window_done: 0, window: Duration::ZERO, errors: 0 }
    }

    fn add(&mut self, r: Run) {
        self.rtts.extend(r.rtts);
        self.window_done += r.window_done;
        self.window += r.window;
        self.errors += r.errors;
    }

    fn summary(&self) -> Value {
        let mut v: Vec<f64> = self.rtts.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
        json!({
            "p50_us": q(0.5), "p99_us": q(0.99),
            "throughput_rps": self.window_done as f64 / self.window.as_secs_f64(),
            "requests": v.len(), "errors": self.errors,
        })
    }
}

/// One client's requests: round trips, answer times, errors.
type ClientRun = (Vec<Duration>, Vec<Instant>, usize);

fn run_clients(
    clients: usize,
    n: usize,
    one: impl Fn(usize) -> anyhow::Result<Box<dyn FnMut() -> bool>> + Sync,
) -> anyhow::Result<Run> {
    let ready = std::sync::Barrier::new(clients + 1);
    let (start, results): (Instant, Vec<anyhow::Result<ClientRun>>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|k| {
                let (one, ready) = (&one, &ready);
                s.spawn(move || {
                    let call = one(k);
                    ready.wait();
                    let mut call = call?;
                    let (mut rtts, mut done, mut errors) = (Vec::with_capacity(n), Vec::with_capacity(n), 0);
                    for _ in 0..n {
                        let t = Instant::now();
                        if call() {
                            let now = Instant::now();
                            rtts.push(now - t);
                            done.push(now);
                        } else {
                            errors += 1;
                        }
                    }
                    Ok((rtts, done, errors))
                })
            })
            .collect();
        ready.wait();
        let start = Instant::now();
        let results =
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))).collect();
        (start, results)
    });
    let results = results.into_iter().collect::<anyhow::Result<Vec<ClientRun>>>()?;
    // The window closes when the first client has sent its last request.
    let end = results.iter().filter_map(|(_, done, _)| done.last().copied()).min().unwrap_or(start);
    let mut run = Run::empty();
    run.window = end.saturating_duration_since(start);
    for (rtts, done, errors) in results {
        run.window_done += done.iter().filter(|&&t| t <= end).count();
        run.rtts.extend(rtts);
        run.errors += errors;
    }
    Ok(run)
}

fn udp_run(addr: SocketAddr, clients: usize, n: usize) -> anyhow::Result<Run> {
    run_clients(clients, n, |k| {
        let mut c = UdpClient::connect(addr, Duration::from_secs(2))?;
        // Spread request ids so the weighted choice is not in lock step between clients.
        c.set_next_id((k as u64) << 40 | 1);
        Ok(Box::new(move || c.invoke_dag("echo", INPUT, 0).is_ok_and(|r| r.status == Status::Ok)))
    })
}

fn unix_run(socket: &Path, clients: usize, n: usize) -> anyhow::Result<Run> {
    run_clients(clients, n, |_| {
        let mut c = Client::connect(socket)?;
        Ok(Box::new(move || c.invoke_dag("echo", INPUT, 0).is_ok_and(|r| r.status == Status::Ok)))
    })
}

/// `(run_time_ns, run_cnt)` summed over loaded programs named `name`.
/// CPU time (ns, from schedstat) of `pid`'s threads: `(per SGS thread
/// `sgs-N` by N, all threads of the process)`.
fn cpu_ns(pid: u32) -> (Vec<u64>, u64) {
    let (mut sgs, mut total) = (Vec::new(), 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (sgs, total) };
    for t in dir.flatten() {
        let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split(' ').next().and_then(|n| n.parse::<u64>().ok()))
        else {
            continue;
        };
        total += ns;
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(k) = comm.trim().strip_prefix("sgs-").and_then(|n| n.parse::<usize>().ok()) {
            if sgs.len() <= k {
                sgs.resize(k + 1, 0);
            }
            sgs[k] += ns;
        }
    }
    (sgs, total)
}

fn bpf_totals(name: &str) -> (u64, u64) {
    let mut t = (0, 0);
    for p in aya::programs::loaded_programs().flatten() {
        if p.name_as_str() == Some(name) {
            t.0 += p.run_time().as_nanos() as u64;
            t.1 += p.run_count();
        }
    }
    t
}

/// Rounds per client count: the modes take turns, so a machine whose load
/// drifts during the run (other builds on a shared node) weighs on each alike.
const ROUNDS: usize = 5;

/// Which path one measurement takes.
#[derive(Clone, Copy, PartialEq)]
enum Leg {
    Udp(usize),
    Unix(usize),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = super::serving::tempdir()?;
    let stats = gatid::steer::program::enable_stats().context("BPF_ENABLE_STATS (needs root)")?;
    // Every mode's daemon runs for the whole benchmark (idle ones sleep).
    let mut daemons = Vec::new();
    for mode in MODES {
        let d = Daemon::start(&config(&dir, mode, &args.worker_sched)?)?;
        let health = d.client()?.control_json(Kind::Health, 0, b"")?;
        let steer = &health["steer"];
        let want = if mode == "kernel" { "ebpf" } else { "userspace" };
        if steer["mode"] != want {
            bail!("{mode}: the daemon steers with {} ({})", steer["mode"], steer["why"]);
        }
        let unix_want = if mode == "kernel" { "kernel" } else { "userspace" };
        if steer["unix"]["mode"] != unix_want {
            bail!("{mode}: Unix clients are steered by {} ({})", steer["unix"]["mode"], steer["unix"]["why"]);
        }
        let addr: SocketAddr = steer["udp"].as_str().context("udp address")?.parse()?;
        // Warm up: pools started, first datagrams through.
        udp_run(addr, 4, 100)?;
        daemons.push((mode, d, addr));
    }
    let userspace = 1;
    let paths: Vec<(String, Leg)> = (0..MODES.len())
        .map(|k| (format!("udp_{}", MODES[k]), Leg::Udp(k)))
        .chain([("unix_kernel".to_string(), Leg::Unix(0)), ("unix_userspace".to_string(), Leg::Unix(userspace))])
        .filter(|(name, _)| args.only.is_empty() || args.only.contains(name))
        .collect();
    if paths.is_empty() {
        bail!("--only names no path (udp_kernel, udp_userspace, udp_single, unix_kernel, unix_userspace)");
    }
    let counts = if args.clients.is_empty() { CLIENTS.to_vec() } else { args.clients.clone() };
    if counts.iter().any(|&c| c == 0 || c > 1024) {
        bail!("--clients: each count must be 1 to 1024");
    }
    let mut rows = Vec::new();
    let mut bpf = (0u64, 0u64);
    let mut bpf_unix = (0u64, 0u64);
    for &clients in &counts {
        let n = (per_client(clients, &args) / ROUNDS).max(10);
        let mut runs: Vec<Run> = paths.iter().map(|_| Run::empty()).collect();
        let mut row_bpf = (0u64, 0u64);
        let mut row_unix = (0u64, 0u64);
        // CPU of each SGS thread (balance) and of the whole daemon per path.
        let mut split: Vec<Vec<u64>> = paths.iter().map(|_| Vec::new()).collect();
        let mut daemon_ns: Vec<u64> = vec![0; paths.len()];
        for _ in 0..ROUNDS {
            for (k, (_, path)) in paths.iter().enumerate() {
                let before = bpf_totals("steer_udp");
                let before_unix = bpf_totals("steer_unix");
                let pid = match *path {
                    Leg::Udp(m) | Leg::Unix(m) => daemons[m].1.pid(),
                };
                let (ticks, total) = cpu_ns(pid);
                let r = match *path {
                    Leg::Udp(m) => udp_run(daemons[m].2, clients, n)?,
                    Leg::Unix(m) => unix_run(&daemons[m].1.socket, clients, n)?,
                };
                let (after, after_total) = cpu_ns(pid);
                daemon_ns[k] += after_total.saturating_sub(total);
                for (i, t) in after.into_iter().enumerate() {
                    if split[k].len() <= i {
                        split[k].resize(i + 1, 0);
                    }
                    split[k][i] += t.saturating_sub(ticks.get(i).copied().unwrap_or(0));
                }
                if *path == Leg::Udp(0) {
                    let after = bpf_totals("steer_udp");
                    row_bpf.0 += after.0 - before.0;
                    row_bpf.1 += after.1 - before.1;
                }
                if *path == Leg::Unix(0) {
                    let after = bpf_totals("steer_unix");
                    row_unix.0 += after.0 - before_unix.0;
                    row_unix.1 += after.1 - before_unix.1;
                }
                runs[k].add(r);
            }
        }
        bpf.0 += row_bpf.0;
        bpf.1 += row_bpf.1;
        bpf_unix.0 += row_unix.0;
        bpf_unix.1 += row_unix.1;
        let mut row = serde_json::Map::new();
        row.insert("clients".into(), json!(clients));
        for ((((name, _), r), ticks), &ns) in paths.iter().zip(&runs).zip(&split).zip(&daemon_ns) {
            let s = r.summary();
            // The daemon's CPU (all its threads, not the sandboxed workers) per answer.
            let cpu_us = ns as f64 / 1e3 / r.rtts.len().max(1) as f64;
            // The busiest SGS's share of the SGS threads' CPU (1/2 = balanced on 2).
            let total: u64 = ticks.iter().sum();
            let busiest = if total == 0 { f64::NAN } else { *ticks.iter().max().unwrap_or(&0) as f64 / total as f64 };
            println!(
                "{name:<15} {clients:>2} clients: p50 {:>7.1} µs  p99 {:>7.1} µs  {:>7.0} req/s  errors {}  daemon CPU {:>5.1} µs/req  busiest SGS {:.2}",
                s["p50_us"].as_f64().unwrap_or(f64::NAN),
                s["p99_us"].as_f64().unwrap_or(f64::NAN),
                s["throughput_rps"].as_f64().unwrap_or(f64::NAN),
                r.errors,
                cpu_us,
                busiest
            );
            let (kind, mode) = name.split_once('_').unwrap_or((name, ""));
            row.insert(format!("{kind}_rtt_us_{mode}"), s["p50_us"].clone());
            row.insert(format!("{kind}_p99_us_{mode}"), s["p99_us"].clone());
            row.insert(format!("{kind}_rps_{mode}"), s["throughput_rps"].clone());
            row.insert(format!("{kind}_errors_{mode}"), json!(r.errors));
            row.insert(format!("{kind}_busiest_sgs_cpu_share_{mode}"), json!(busiest));
            row.insert(format!("{kind}_daemon_cpu_us_per_request_{mode}"), json!(cpu_us));
        }
        let per = if row_bpf.1 == 0 { f64::NAN } else { row_bpf.0 as f64 / row_bpf.1 as f64 };
        row.insert("bpf_ns_per_request".into(), json!(per));
        let per_unix = if row_unix.1 == 0 { f64::NAN } else { row_unix.0 as f64 / row_unix.1 as f64 };
        row.insert("bpf_unix_ns_per_request".into(), json!(per_unix));
        let ratio = |a: &str, b: &str| match (row.get(a).and_then(Value::as_f64), row.get(b).and_then(Value::as_f64)) {
            (Some(a), Some(b)) => json!(a / b),
            _ => Value::Null,
        };
        let ratios = [
            ("udp_p50_ratio_kernel_over_userspace", ratio("udp_rtt_us_kernel", "udp_rtt_us_userspace")),
            ("udp_rps_ratio_kernel_over_userspace", ratio("udp_rps_kernel", "udp_rps_userspace")),
            ("unix_p50_ratio_kernel_over_userspace", ratio("unix_rtt_us_kernel", "unix_rtt_us_userspace")),
            ("unix_p99_ratio_kernel_over_userspace", ratio("unix_p99_us_kernel", "unix_p99_us_userspace")),
            ("unix_rps_ratio_kernel_over_userspace", ratio("unix_rps_kernel", "unix_rps_userspace")),
        ];
        for (k, v) in ratios {
            row.insert(k.into(), v);
        }
        rows.push(Value::Object(row));
    }
    drop(stats);
    for (_, d, _) in daemons {
        d.stop()?;
    }
    let per_req = if bpf.1 == 0 { f64::NAN } else { bpf.0 as f64 / bpf.1 as f64 };
    if bpf.1 > 0 {
        println!("in-kernel cost: {per_req:.0} ns per datagram ({} runs)", bpf.1);
    }
    let per_unix = if bpf_unix.1 == 0 { f64::NAN } else { bpf_unix.0 as f64 / bpf_unix.1 as f64 };
    if bpf_unix.1 > 0 {
        println!("in-kernel cost: {per_unix:.0} ns per Unix write ({} runs)", bpf_unix.1);
    }
    let out = json!({
        "bench": "steer",
        "quick": args.quick,
        "rounds": ROUNDS,
        "dag": "echo (one sandboxed gati-fn-testkit echo function)",
        "worker_sched": args.worker_sched,
        "modes": {
            "kernel": "[steer] mode = ebpf, unix = kernel, 2 SGSs, each SGS reads its own sockets",
            "userspace": "[steer] mode = userspace, 2 SGSs, every datagram via the UDP I/O thread",
            "single": "[steer] mode = userspace, 1 SGS"
        },
        "bpf_ns_per_request": per_req,
        "bpf_runs": bpf.1,
        "bpf_unix_ns_per_request": per_unix,
        "bpf_unix_runs": bpf_unix.1,
        "rows": rows,
        "unix_modes": {
            "kernel": "the kernel daemon: steer_unix redirects each whole InvokeDag write to its SGS's socket",
            "userspace": "the userspace daemon: the I/O thread reads and routes every frame"
        },
    });
    write_json(&args.out, &out)?;
    println!("wrote {}", args.out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
