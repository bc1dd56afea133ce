//! `gatid bench serving`: how much the daemon adds over the socket floor and
//! over ONNX Runtime called in-process, measured side by side in one run, plus
//! a many-client soak that checks no response is lost or mismatched.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::harness::{median_us, write_json, Daemon};
use gatid::api::wire::{Dtype, Status};
use gatid::client::Client;
use gatid::infer::model::{probe_input, row_shape};
use gatid::infer::pipeline::session_from_bytes;

/// Options of `gatid bench serving`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Fewer iterations; finishes in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Node config whose model is measured.
    #[arg(long, default_value = "configs/cpu.toml")]
    pub config: PathBuf,
    /// Model to measure (default: the config's first).
    #[arg(long)]
    pub model: Option<String>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results/serving.json")]
    pub out: PathBuf,
    /// Requests in the soak run (default 100000, 3000 with --quick).
    #[arg(long)]
    pub soak_requests: Option<u64>,
    /// Concurrent clients in the soak run.
    #[arg(long, default_value_t = 32)]
    pub soak_clients: usize,
}

/// Runs the benchmark and prints its table.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = gatid::config::load(&args.config)?;
    let model_cfg = match &args.model {
        Some(m) => config
            .models
            .iter()
            .find(|c| &c.name == m)
            .with_context(|| format!("no model `{m}` in {}", args.config.display()))?,
        None => config.models.first().context("config has no models")?,
    }
    .clone();
    gatid::infer::runtime::environment(config.runtime.ort_library.as_deref())?;
    let (floor_n, ping_n, model_n) = if args.quick { (3000, 3000, 200) } else { (20000, 20000, 1000) };

    println!("gatid bench serving — model `{}`{}", model_cfg.name, if args.quick { " (quick)" } else { "" });
    let daemon = Daemon::start(&args.config)?;
    let mut client = daemon.client()?;
    // Echo floor and gatid ping in alternating blocks, so CPU frequency and idle
    // states affect both alike.
    let mut echo = EchoServer::start()?;
    let (mut floor, mut ping) = (Vec::with_capacity(floor_n), Vec::with_capacity(ping_n));
    for _ in 0..200 {
        echo.round_trip()?;
        client.ping()?;
    }
    for _ in 0..10 {
        for _ in 0..floor_n / 10 {
            floor.push(echo.round_trip()?);
        }
        for _ in 0..ping_n / 10 {
            let t = Instant::now();
            client.ping()?;
            ping.push(t.elapsed());
        }
    }
    drop(echo);

    // The same batch-1 input both ways: a real image when the data set is there.
    let row = row_shape(&model_cfg.input);
    let input = probe_input(1, &row);
    let mut shape = vec![1usize];
    shape.extend(&row);
    let shape32: Vec<u32> = shape.iter().map(|&d| d as u32).collect();
    let payload: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = std::fs::read(&model_cfg.path)?;
    let mut session = session_from_bytes(&bytes, model_cfg.intra_threads, "benchmark session")?;
    let mut direct = Vec::with_capacity(model_n);
    let mut through = Vec::with_capacity(model_n);
    let mut run_direct = |n: usize, out: &mut Vec<Duration>| -> anyhow::Result<()> {
        for _ in 0..n {
            let t = Instant::now();
            let tensor = ort::value::TensorRef::from_array_view((shape.clone(), input.as_slice()))?;
            let outputs = session.run(ort::inputs![tensor])?;
            let _ = outputs[0].try_extract_tensor::<f32>()?;
            out.push(t.elapsed());
        }
        Ok(())
    };
    let mut staged_model = gatid::infer::LoadedModel::load(&model_cfg)?;
    let staged_model_stages = staged_model.meta.stages.len();
    let mut staged = Vec::with_capacity(model_n);
    let mut run_staged = |n: usize, out: &mut Vec<Duration>| -> anyhow::Result<()> {
        for _ in 0..n {
            let t = Instant::now();
            staged_model.pipeline.run(&shape, &input)?;
            out.push(t.elapsed());
        }
        Ok(())
    };
    let mut server_side = Vec::with_capacity(model_n);
    let mut run_gatid = |n: usize, out: &mut Vec<Duration>| -> anyhow::Result<()> {
        for _ in 0..n {
            let t = Instant::now();
            let r = client.infer(&model_cfg.name, Dtype::F32, &shape32, &payload, 0)?.ok()?;
            out.push(t.elapsed());
            server_side.push(Duration::from_micros(u64::from(r.server_us)));
        }
        Ok(())
    };
    // Warm both, then alternate blocks so drift hits both sides alike.
    run_direct(20, &mut Vec::new())?;
    run_staged(20, &mut Vec::new())?;
    run_gatid(20, &mut Vec::new())?;
    for _ in 0..5 {
        run_direct(model_n / 5, &mut direct)?;
        run_staged(model_n / 5, &mut staged)?;
        run_gatid(model_n / 5, &mut through)?;
    }

    let soak_n = args.soak_requests.unwrap_or(if args.quick { 3000 } else { 100_000 });
    let soak = soak(&daemon.socket, &model_cfg.name, &shape32, &row, soak_n, args.soak_clients)?;
    let stats = client.stats_text().unwrap_or_default();
    drop(client);
    daemon.stop()?;

    let uds = median_us(&floor);
    let ping_us = median_us(&ping);
    let ort_ms = median_us(&direct) / 1000.0;
    let gatid_ms = median_us(&through) / 1000.0;
    let staged_ms = median_us(&staged) / 1000.0;
    let server_ms = median_us(&server_side) / 1000.0;
    let result = json!({
        "model": model_cfg.name,
        "quick": args.quick,
        "uds_floor_us_p50": uds,
        "ping_us_p50": ping_us,
        "ping_ratio": ping_us / uds,
        "ort_direct_ms_p50": ort_ms,
        "gatid_model_ms_p50": gatid_ms,
        "model_ratio": gatid_ms / ort_ms,
        "ort_staged_ms_p50": staged_ms,
        "gatid_server_ms_p50": server_ms,
        "stages": staged_model_stages,
        "soak": soak,
        "batch_rows_histogram": stats.lines().filter(|l| l.starts_with("gati_batch_rows")).collect::<Vec<_>>(),
    });
    println!();
    println!("{:<34} {:>12} {:>12} {:>8}", "measure (median)", "baseline", "gatid", "ratio");
    println!("{:<34} {:>9.1} us {:>9.1} us {:>8.2}", "round trip: UDS echo vs gatid ping", uds, ping_us, ping_us / uds);
    println!(
        "{:<34} {:>9.3} ms {:>9.3} ms {:>8.3}",
        "batch-1 model: ORT direct vs gatid",
        ort_ms,
        gatid_ms,
        gatid_ms / ort_ms
    );
    println!(
        "{:<34} {:>9.3} ms {:>9.3} ms {:>8.3}",
        format!("  staged in-process ({staged_model_stages} stages)"),
        ort_ms,
        staged_ms,
        staged_ms / ort_ms
    );
    println!("{:<34} {:>9.3} ms {:>9.3} ms {:>8.3}", "  gatid server-side time", ort_ms, server_ms, server_ms / ort_ms);
    println!(
        "soak: {} requests, {} clients: {} ok, {} lost, {} mismatched, {} other status, {:.0} req/s",
        soak["requests"],
        soak["clients"],
        soak["ok"],
        soak["lost"],
        soak["mismatched"],
        soak["other_status"],
        soak["req_per_s"].as_f64().unwrap_or(0.0)
    );
    write_json(&args.out, &result)?;
    println!("wrote {}", args.out.display());
    if soak["lost"].as_u64() != Some(0) || soak["mismatched"].as_u64() != Some(0) {
        bail!("soak lost or mismatched responses");
    }
    Ok(())
}

/// The socket floor: a separate process (like gatid) echoing 64-byte frames
/// over a plain Unix socket with blocking reads and writes.
struct EchoServer {
    conn: UnixStream,
    dir: PathBuf,
    child: std::process::Child,
}

impl EchoServer {
    fn start() -> anyhow::Result<Self> {
        let dir = tempdir()?;
        let path = dir.join("echo.sock");
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "echo-server", "--socket"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let until = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match UnixStream::connect(&path) {
                Ok(c) => break c,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e).context("echo server did not start"),
            }
        };
        Ok(Self { conn, dir, child })
    }

    fn round_trip(&mut self) -> anyhow::Result<Duration> {
        let mut buf = [7u8; 64];
        let t = Instant::now();
        self.conn.write_all(&buf)?;
        self.conn.read_exact(&mut buf)?;
        Ok(t.elapsed())
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `gatid bench echo-server`: echoes 64-byte frames on one connection, then exits.
pub fn echo_server(socket: &Path) -> anyhow::Result<()> {
    let listener = UnixListener::bind(socket)?;
    let (mut s, _) = listener.accept()?;
    let mut buf = [0u8; 64];
    while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    Ok(())
}

/// `clients` threads pipelining distinct inputs; every answer is checked
/// against the answer for that input computed alone first.
fn soak(
    socket: &Path,
    model: &str,
    shape: &[u32],
    row: &[usize],
    total: u64,
    clients: usize,
) -> anyhow::Result<serde_json::Value> {
    const DISTINCT: usize = 16;
    const WINDOW: usize = 4;
    let inputs: Vec<Vec<u8>> = {
        let all = probe_input(DISTINCT, row);
        let n = row.iter().product::<usize>();
        (0..DISTINCT).map(|i| all[i * n..(i + 1) * n].iter().flat_map(|v| v.to_le_bytes()).collect()).collect()
    };
    let mut reference = Vec::new();
    let mut c = Client::connect(socket)?;
    for inp in &inputs {
        reference.push(c.infer(model, Dtype::F32, shape, inp, 0)?.ok()?.floats());
    }
    let inputs = Arc::new(inputs);
    let reference = Arc::new(reference);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (inputs, reference, next) = (Arc::clone(&inputs), Arc::clone(&reference), Arc::clone(&next));
        let socket = socket.to_owned();
        let model = model.to_string();
        let shape = shape.to_vec();
        threads.push(std::thread::spawn(move || -> anyhow::Result<(u64, u64, u64, u64)> {
            let mut c = Client::connect(&socket)?;
            let (mut sent, mut ok, mut mismatched, mut other) = (0u64, 0u64, 0u64, 0u64);
            let mut outstanding = std::collections::VecDeque::new();
            loop {
                while outstanding.len() < WINDOW {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        break;
                    }
                    let which = (k as usize * 7 + 3) % DISTINCT;
                    let id = c.send(Client::infer_header(&model, Dtype::F32, &shape, 0), &inputs[which])?;
                    outstanding.push_back((id, which));
                    sent += 1;
                }
                let Some((id, which)) = outstanding.pop_front() else {
                    break;
                };
                let r = c.recv()?;
                if r.request_id != id {
                    mismatched += 1;
                } else if r.status != Status::Ok {
                    other += 1;
                } else if r.floats() != reference[which] {
                    mismatched += 1;
                } else {
                    ok += 1;
                }
            }
            Ok((sent, ok, mismatched, other))
        }));
    }
    let (mut sent, mut ok, mut mismatched, mut other) = (0, 0, 0, 0);
    for t in threads {
        let (s, o, m, x) = t.join().map_err(|_| anyhow::anyhow!("soak client panicked"))??;
        sent += s;
        ok += o;
        mismatched += m;
        other += x;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({
        "requests": sent, "clients": clients, "ok": ok, "mismatched": mismatched, "other_status": other,
        "lost": sent - ok - mismatched - other, "seconds": secs, "req_per_s": sent as f64 / secs,
    }))
}

/// A fresh private directory under the system temp dir.
pub fn tempdir() -> std::io::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("gati-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
