//! `gatictl`: the gati client — classify images, invoke DAGs, list models, show stats and health.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gatid::api::wire::{Dtype, Kind};
use gatid::client::Client;
use gatid::telemetry::names;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "gatictl", version, about = "client for the gati daemon")]
struct Cli {
    /// The daemon's socket.
    #[arg(long, short, env = "GATI_SOCKET", default_value = "/run/gati/gatid.sock")]
    socket: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify an image (PNG/JPEG) or a raw tensor (.npy, float32, model input layout).
    Infer {
        /// Model name.
        #[arg(long, short)]
        model: String,
        /// Image or tensor file.
        file: PathBuf,
        /// How many classes to show.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Deadline in milliseconds (0 = none).
        #[arg(long, default_value_t = 0.0)]
        deadline_ms: f64,
    },
    /// Run a DAG on a file's bytes; prints the output (the top-k as text for JSON top-k output).
    Invoke {
        /// DAG name.
        dag: String,
        /// Input file (sent as is, e.g. a PNG for `classify`).
        file: PathBuf,
        /// Deadline in milliseconds (0 = the DAG's own).
        #[arg(long, default_value_t = 0.0)]
        deadline_ms: f64,
        /// Name top-k classes with this model's labels (e.g. `cifar10` for `classify`).
        #[arg(long)]
        labels: Option<String>,
    },
    /// List served models.
    Models,
    /// Metadata of one model.
    Info { model: String },
    /// Request counts, latencies, batches, queues.
    Stats {
        /// Print the raw Prometheus text.
        #[arg(long)]
        raw: bool,
    },
    /// Liveness report.
    Health,
    /// Request steering: mode (ebpf/userspace, and why), routes, per-SGS load, counters.
    Steer,
    /// Exit 0 if the daemon is ready to serve, 1 if not.
    Ready,
    /// Cache management.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Cluster apps (`[cluster]` nodes): submit one.
    App {
        #[command(subcommand)]
        action: AppAction,
    },
    /// Cluster apps this node knows: their leases and ρ.
    Apps,
}

#[derive(Subcommand)]
enum AppAction {
    /// Submit a long-running GPU app to the cluster's auctions.
    Submit {
        #[arg(long)]
        name: String,
        /// Most GPUs it can use.
        #[arg(long)]
        gpus: u32,
        /// Total work, in GPU-seconds of its throughput model.
        #[arg(long)]
        work: f64,
        /// The command the nodes holding its GPUs run (after `--command`).
        #[arg(long, num_args = 1.., allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Warm-start a model's caches from a calibration set (IDX images or raw u8
    /// frames of the model's input size), then train them now.
    Train {
        #[arg(long, short)]
        model: String,
        /// Calibration images.
        #[arg(long)]
        data: PathBuf,
        /// Use at most this many images (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Give up waiting for the training after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatictl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(&cli.socket)?;
    match cli.command {
        Command::Infer { model, file, top, deadline_ms } => {
            infer(&mut client, &model, &file, top, deadline_ms, cli.json)?
        }
        Command::Invoke { dag, file, deadline_ms, labels } => {
            let labels: Vec<String> = match labels {
                Some(m) => client.model_info(&m)?["model"]["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(String::from))
                    .collect(),
                None => Vec::new(),
            };
            invoke(&mut client, &dag, &file, deadline_ms, &labels, cli.json)?
        }
        Command::Models => {
            let v = client.control_json(Kind::ListModels, 0, &[])?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<16} {:>10} {:<14} {:>7} {:>6}  cuts", "model", "id", "input", "classes", "stages");
                for m in v["models"].as_array().into_iter().flatten() {
                    let cuts: Vec<&str> =
                        m["stages"].as_array().into_iter().flatten().filter_map(|s| s["output"].as_str()).collect();
                    println!(
                        "{:<16} {:>10} {:<14} {:>7} {:>6}  {}",
                        m["name"].as_str().unwrap_or("?"),
                        m["id"],
                        format!(
                            "{}x{}x{} {}",
                            m["height"],
                            m["width"],
                            m["channels"],
                            m["layout"].as_str().unwrap_or("")
                        ),
                        m["classes"],
                        cuts.len(),
                        cuts[..cuts.len().saturating_sub(1)].join(", ")
                    );
                }
            }
        }
        Command::Cache { action: CacheAction::Train { model, data, limit, timeout_s } } => {
            cache_train(&mut client, &model, &data, limit, timeout_s)?
        }
        Command::App { action: AppAction::Submit { name, gpus, work, command } } => {
            let req = json!({ "name": name, "gpus": gpus, "work": work, "command": command });
            let v = client.control_json(Kind::AppSubmit, 0, &serde_json::to_vec(&req)?)?;
            if cli.json {
                println!("{v}");
            } else {
                println!("submitted app {} on node {}", v["app"], v["node"]);
            }
        }
        Command::Apps => {
            let v = client.control_json(Kind::Apps, 0, &[])?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_apps(&v);
            }
        }
        Command::Info { model } => println!("{}", serde_json::to_string_pretty(&client.model_info(&model)?)?),
        Command::Stats { raw } => {
            let text = client.stats_text()?;
            if raw {
                print!("{text}");
            } else {
                let summary = gatid::telemetry::summary::summarize(&text);
                if cli.json {
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    print!("{}", gatid::telemetry::summary::render(&summary));
                }
            }
        }
        Command::Health => {
            let v = client.control_json(Kind::Health, 0, &[])?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "status: {}  ready: {}  uptime: {:.0} s  models: {}  connections: {}  pid: {}",
                    v["status"].as_str().unwrap_or("?"),
                    v["ready"],
                    v["uptime_s"].as_f64().unwrap_or(0.0),
                    v["models"],
                    v["connections"],
                    v["pid"]
                );
                print_threads(&v["threads"]);
                if let Some(r) = v["last_reload"].as_object() {
                    let age = r.get("age_s").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
                    match r.get("error").and_then(serde_json::Value::as_str) {
                        None => println!("last reload: applied {age:.0} s ago"),
                        Some(e) => println!("last reload: REFUSED {age:.0} s ago (serving the previous config): {e}"),
                    }
                }
            }
        }
        Command::Steer => {
            let v = client.control_json(Kind::Health, 0, &[])?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v["steer"])?);
            } else {
                print!("{}", gatid::steer::report::render(&v["steer"]));
            }
        }
        Command::Ready => {
            let v = client.control_json(Kind::Ready, 0, &[])?;
            let ready = v["ready"].as_bool() == Some(true);
            if cli.json {
                println!("{v}");
            } else {
                println!("{}", if ready { "ready" } else { "not ready" });
            }
            return Ok(if ready { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One aligned line per data-plane thread of a `Health` answer.
fn print_apps(v: &Value) {
    let how = if v["elected"] == true { " (elected on etcd)" } else { "" };
    println!(
        "node {}  arbiter {}{how}  leases {}",
        v["node"],
        v["arbiter"],
        v["leases"].as_array().map_or(0, Vec::len)
    );
    if let Some(d) = v["gpu_devices"].as_object() {
        let why = d.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(": {r}"));
        println!(
            "gpu devices: {} (configured {}{why})",
            d["mode"].as_str().unwrap_or("?"),
            d["configured"].as_str().unwrap_or("?")
        );
    }
    println!("{:>14} {:<16} {:>8} {:>6}  leases (id: node:gpu..., expiry s)", "app", "name", "rho", "pid");
    for a in v["apps"].as_array().into_iter().flatten() {
        let leases: Vec<String> = a["leases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                let gpus: Vec<String> = l["gpus"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| format!("{}:{}", g["node"], g["index"]))
                    .collect();
                format!("{}: {} until {:.0}", l["id"], gpus.join(","), l["expiry"].as_f64().unwrap_or(0.0))
            })
            .collect();
        println!(
            "{:>14} {:<16} {:>8} {:>6}  {}",
            a["app"],
            a["name"].as_str().unwrap_or("-"),
            a["rho"].as_f64().map_or("-".into(), |r| format!("{r:.3}")),
            a["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
            leases.join("; ")
        );
    }
    // On the arbiter node: its last round (the offers and the agents' bids).
    if let Some(r) = v["rounds"].as_array().and_then(|r| r.last()) {
        let n = |k: &str| r[k].as_array().map_or(0, Vec::len);
        println!(
            "last round {}: offered {}, bids {}, missing {}, refused {}, auctioned {}, leftover {}",
            r["round"],
            n("offered"),
            n("bids"),
            n("missing"),
            r["refused"],
            n("auctioned"),
            n("leftover")
        );
    }
}

fn print_threads(threads: &serde_json::Value) {
    use gatid::telemetry::table::{Align, Table};
    let Some(threads) = threads.as_array() else { return };
    let mut table = Table::new(&[
        ("thread", Align::Left),
        ("state", Align::Left),
        ("last progress", Align::Right),
        ("restarts", Align::Right),
        ("last error", Align::Left),
    ]);
    for t in threads {
        let s = |k: &str| t[k].as_str().unwrap_or("").to_string();
        table.row(vec![
            s("name"),
            s("state"),
            format!("{} ms", t["last_progress_ms"]),
            t["restarts"].to_string(),
            s("last_error"),
        ]);
    }
    let mut out = String::new();
    table.render(&mut out);
    print!("{out}");
}

/// Reads the file as the wire expects it: images as u8 HWC, .npy as f32.
fn load_input(path: &Path) -> anyhow::Result<(Dtype, Vec<u32>, Vec<u8>)> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "npy" {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (shape, data) = gatid::client::npy::parse_f32(&bytes)
            .with_context(|| format!("{} is not a float32 .npy", path.display()))?;
        return Ok((Dtype::F32, shape, data.to_vec()));
    }
    let img = image::open(path).with_context(|| format!("decoding image {}", path.display()))?;
    if img.color().channel_count() == 1 {
        let g = img.to_luma8();
        Ok((Dtype::U8, vec![g.height(), g.width(), 1], g.into_raw()))
    } else {
        let rgb = img.to_rgb8();
        Ok((Dtype::U8, vec![rgb.height(), rgb.width(), 3], rgb.into_raw()))
    }
}

fn infer(
    client: &mut Client,
    model: &str,
    file: &Path,
    top: usize,
    deadline_ms: f64,
    as_json: bool,
) -> anyhow::Result<()> {
    let info = client.model_info(model)?;
    let meta = &info["model"];
    let (dtype, shape, payload) = load_input(file)?;
    let t = Instant::now();
    let r = client.infer(model, dtype, &shape, &payload, (deadline_ms * 1000.0) as u32)?.ok()?;
    let client_ms = t.elapsed().as_secs_f64() * 1e3;
    let logits = r.floats();
    let classes = r.shape.get(1).copied().unwrap_or(logits.len()).max(1);
    if logits.len() < classes {
        bail!("daemon answered {} values for {} classes", logits.len(), classes);
    }
    let labels: Vec<String> =
        meta["labels"].as_array().into_iter().flatten().filter_map(|l| l.as_str().map(String::from)).collect();
    let mut rows = Vec::new();
    for row in logits.chunks(classes) {
        let probs = if meta["output"] == "probabilities" { row.to_vec() } else { softmax(row) };
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let label = |i: usize| labels.get(i).cloned().unwrap_or_else(|| i.to_string());
        rows.push(json!({
            "class": order[0],
            "label": label(order[0]),
            "probability": probs[order[0]],
            "top": order.iter().take(top).map(|&i| json!({"class": i, "label": label(i), "probability": probs[i]})).collect::<Vec<Value>>(),
            "probabilities": probs,
        }));
    }
    let out = json!({
        "model": model, "file": file.display().to_string(), "results": rows,
        "exit_stage": r.exit_stage, "stages": meta["stages"].as_array().map_or(0, Vec::len),
        "server_us": r.server_us, "client_ms": client_ms,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for row in &rows {
        println!(
            "{}: {} (class {}, p = {:.3})",
            file.display(),
            row["label"].as_str().unwrap_or("?"),
            row["class"],
            row["probability"].as_f64().unwrap_or(0.0)
        );
        for t in row["top"].as_array().into_iter().flatten() {
            println!("  {:<14} {:.4}", t["label"].as_str().unwrap_or("?"), t["probability"].as_f64().unwrap_or(0.0));
        }
    }
    println!(
        "answered by stage {}/{} in {} us (server), {:.2} ms (client)",
        r.exit_stage, out["stages"], r.server_us, client_ms
    );
    Ok(())
}

fn invoke(
    client: &mut Client,
    dag: &str,
    file: &Path,
    deadline_ms: f64,
    labels: &[String],
    as_json: bool,
) -> anyhow::Result<()> {
    let input = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let t = Instant::now();
    let r = client.invoke_dag(dag, &input, (deadline_ms * 1000.0) as u32)?.ok()?;
    let client_ms = t.elapsed().as_secs_f64() * 1e3;
    let parsed: Option<Value> = serde_json::from_slice(&r.payload).ok();
    if as_json {
        let out = json!({
            "dag": dag, "file": file.display().to_string(), "server_us": r.server_us, "client_ms": client_ms,
            "output": parsed.clone().unwrap_or_else(|| json!(String::from_utf8_lossy(&r.payload))),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    // A top-k answer (`[{"class": 3, "p": 0.8}, …]`, e.g. from gati-fn-topk) is shown as a table.
    let top: Vec<(u64, f64)> = parsed
        .as_ref()
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|e| Some((e["class"].as_u64()?, e["p"].as_f64()?))).collect())
        .unwrap_or_default();
    if top.is_empty() {
        match std::str::from_utf8(&r.payload) {
            Ok(text) => println!("{text}"),
            Err(_) => println!("{} bytes of output", r.payload.len()),
        }
    } else {
        for (class, p) in &top {
            let label = labels.get(*class as usize).map_or("-", String::as_str);
            println!("  {label:<14} (class {class}) {p:.4}");
        }
    }
    println!("{dag}: answered in {} us (server), {client_ms:.2} ms (client)", r.server_us);
    Ok(())
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn model_gauge(client: &mut Client, name: &str, model: &str) -> anyhow::Result<f64> {
    Ok(gatid::telemetry::summary::model_value(&client.stats_text()?, name, model).unwrap_or(0.0))
}

fn cache_train(client: &mut Client, model: &str, data: &Path, limit: usize, timeout_s: u64) -> anyhow::Result<()> {
    let info = client.model_info(model)?;
    let dim = |k: &str| info["model"][k].as_u64().unwrap_or(0) as u32;
    let mut set = gatid::client::calibrate::read(data, [dim("height"), dim("width"), dim("channels")])
        .map_err(anyhow::Error::msg)?;
    if limit > 0 {
        set.images.truncate(limit);
    }
    let total = set.images.len();
    let t0 = Instant::now();
    let mut shown = 0;
    gatid::client::calibrate::send(client, model, &set, 16, |sent| {
        if sent * 20 / total.max(1) > shown * 20 / total.max(1) || sent == total {
            shown = sent;
            eprint!("\rcalibrating {model}: {sent}/{total} images ({}%)", sent * 100 / total.max(1));
        }
    })?;
    eprintln!(" in {:.1} s", t0.elapsed().as_secs_f64());
    let v = client.control_json(Kind::CacheTrain, gatid::api::wire::model_id(model), &[])?;
    let (generation, rows, needed) = (
        v["generation"].as_u64().unwrap_or(0),
        v["window_rows"].as_u64().unwrap_or(0),
        v["rows_needed"].as_u64().unwrap_or(0),
    );
    if rows < needed {
        bail!("the window holds {rows} rows; a training needs {needed} (send more calibration images)");
    }
    let until = Instant::now() + std::time::Duration::from_secs(timeout_s);
    let t1 = Instant::now();
    while model_gauge(client, names::CACHE_GENERATION, model)? <= generation as f64 {
        if Instant::now() > until {
            bail!("no new training within {timeout_s} s (the trainer runs at low priority; try again later)");
        }
        eprint!("\rtraining on {rows} rows... {:.0} s", t1.elapsed().as_secs_f64());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let expected = model_gauge(client, names::CACHE_EXPECTED_LATENCY_SECONDS, model)? * 1e6;
    let baseline = model_gauge(client, names::CACHE_BASELINE_LATENCY_SECONDS, model)? * 1e6;
    let mem = model_gauge(client, names::CACHE_MEMORY_BYTES, model)?;
    eprintln!();
    println!(
        "{model}: caches trained on {rows} rows; expected {expected:.0} us per request vs {baseline:.0} us without ({:.2}x), {mem:.0} bytes",
        if expected > 0.0 { baseline / expected } else { 1.0 }
    );
    Ok(())
}
