//! What an operator sees of a running daemon: the Prometheus endpoint
//! (`[metrics] listen`) passes `promtool check metrics` — a HELP text on every
//! family, no naming lints — after requests of every kind (ok, refused, bad,
//! through caches, DAG invocations, refused connections), and `gatictl stats`
//! prints the same counts as integers in aligned columns.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::{Dtype, Status};
use gatid::client::Client;

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET /metrics` over plain HTTP/1.0 (the exporter closes after the body).
fn scrape(port: u16) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < until, "metrics endpoint 127.0.0.1:{port} not reachable: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.") && head.lines().next().unwrap().contains(" 200"), "{head}");
    body.to_string()
}

/// `promtool check metrics` on `text`: (exit status, everything it printed).
fn promtool(tool: &Path, text: &str) -> (bool, String) {
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Polls the daemon's metrics (over the socket) until `needle` shows up.
fn wait_metric(c: &mut Client, needle: &str) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = c.stats_text().unwrap();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < until, "`{needle}` not in the metrics within 30 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one request of every kind an operator's dashboards count.
fn exercise(c: &mut Client) {
    let (px, _) = cifar_images().remove(0);
    for _ in 0..3 {
        c.infer("cifar10", Dtype::U8, &[32, 32, 3], &px, 0).unwrap().ok().unwrap();
    }
    assert_eq!(c.infer("nope", Dtype::U8, &[32, 32, 3], &px, 0).unwrap().status, Status::UnknownModel);
    assert_eq!(c.infer("cifar10", Dtype::U8, &[32, 32, 2], &px[..2048], 0).unwrap().status, Status::BadShape);
    assert_eq!(c.infer("cifar10", Dtype::U8, &[32, 32, 3], &px[..100], 0).unwrap().status, Status::PayloadMismatch);
    // A model with a cache, trained once (its gauges appear with the first training).
    for chunk in fmnist_test(320).chunks(16) {
        let rows: Vec<u8> = chunk.iter().flat_map(|(p, _)| p.iter().copied()).collect();
        c.infer("fmnist", Dtype::U8, &[16, 28, 28, 1], &rows, 0).unwrap().ok().unwrap();
    }
    wait_cache_generation(c, "fmnist", 1);
    // DAG invocations: ok (one f32 row of the model input), bad input, unknown DAG.
    let row: Vec<f32> = px.iter().map(|&p| f32::from(p)).collect();
    for _ in 0..2 {
        c.invoke_dag("direct", &f32_bytes(&row), 0).unwrap().ok().unwrap();
    }
    assert_ne!(c.invoke_dag("direct", &[1, 2, 3], 0).unwrap().status, Status::Ok);
    assert_ne!(c.invoke_dag("nope", &[1, 2, 3], 0).unwrap().status, Status::Ok);
    c.control_json(gatid::api::wire::Kind::Health, 0, &[]).unwrap();
    // The scheduler's counters are published once a second.
    wait_metric(c, "gati_dag_deadline_met_total{dag=\"direct\"} 2\n");
}

#[test]
fn metrics_endpoint_passes_promtool_and_stats_print_integers() {
    let tool = which("promtool").expect("promtool not installed (scripts/setup.sh installs Debian's prometheus)");
    let dir = tempdir("operator");
    let port = free_port();
    let cache = "max_batch = 16\ncache = { kind = \"learned\", budget = 0.1, min_samples = 256, retrain_every = 256, \
                 shadow_fraction = 0.1, trainer_cpu_share = 0.5 }";
    let parts = [
        cifar_model("cifar10", ""),
        fmnist_model("fmnist", cache),
        "[[functions]]\nname = \"classifier\"\nkind = \"model\"\nmodel = \"cifar10\"\nexpected_ms = 5.0\n".into(),
        "[[dags]]\nname = \"direct\"\ndeadline_ms = 5000\nchain = [\"classifier\"]\n".into(),
        format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    ];
    let d = TestDaemon::start(&dir, &config(&dir, "max_connections = 8", &parts));
    let mut c = d.client();
    exercise(&mut c);

    // gatictl stats: the same counts, as integers, in aligned columns.
    let out = Command::new(env!("CARGO_BIN_EXE_gatictl")).arg("--socket").arg(&d.socket).arg("stats").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats = String::from_utf8(out.stdout).unwrap();
    println!("{stats}");
    let table: Vec<&str> =
        stats.lines().skip_while(|l| !l.starts_with("model ")).take_while(|l| !l.is_empty()).collect();
    assert!(table.len() >= 5, "requests table:\n{stats}");
    let width = table[0].len();
    for line in &table {
        assert_eq!(line.len(), width, "requests column not aligned:\n{stats}");
        let count = line.rsplit(' ').next().unwrap();
        assert!(count == "requests" || count.parse::<u64>().is_ok(), "count `{count}` is not an integer:\n{stats}");
    }
    assert!(table.iter().any(|l| l.starts_with("cifar10 ") && l.contains(" ok ") && l.ends_with(" 3")), "{stats}");
    assert!(table.iter().any(|l| l.contains("bad_shape") && l.ends_with(" 1")), "{stats}");
    assert!(stats.contains("\ndag ") && stats.contains("\ndirect "), "{stats}");
    let json = Command::new(env!("CARGO_BIN_EXE_gatictl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "stats"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("gatictl --json stats prints JSON");
    assert!(v["requests"].as_array().unwrap().iter().all(|r| r["count"].is_u64()), "{v}");

    // gatictl health: the node's line, then one aligned line per data-plane thread.
    let out =
        Command::new(env!("CARGO_BIN_EXE_gatictl")).arg("--socket").arg(&d.socket).arg("health").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let health = String::from_utf8(out.stdout).unwrap();
    println!("{health}");
    assert!(health.starts_with("status: ok "), "{health}");
    let threads: Vec<&str> = health.lines().skip(1).collect();
    assert!(threads[0].starts_with("thread ") && threads[0].contains("last progress"), "{health}");
    for role in ["io-", "batch-", "sgs-"] {
        let line = threads.iter().find(|l| l.contains(role)).unwrap_or_else(|| panic!("no {role} thread:\n{health}"));
        assert!(line.contains(" running "), "{line}");
    }
    let at = threads[0].find("restarts").unwrap() + "restarts".len();
    assert!(threads.iter().all(|l| l.len() >= at), "columns aligned:\n{health}");
    assert!(!health.contains("last reload"), "no reload yet:\n{health}");

    // Connections over the limit are refused (and counted): once the gatictl
    // connections are gone only `c` is open; 7 more fill the limit of 8.
    wait_metric(&mut c, "\ngati_connections 1\n");
    let held: Vec<Client> = (0..7).map(|_| d.client()).collect();
    let mut extra = d.client();
    if let Ok(r) = extra.ping() {
        assert_eq!(r.status, Status::TooManyConnections);
    }
    drop((held, extra));
    wait_metric(&mut c, "gati_connections_refused_total{reason=\"too_many_connections\"} 1");

    let text = scrape(port);
    for family in [
        "gati_requests_total",
        "gati_request_duration_seconds_bucket",
        "gati_stage_duration_seconds_bucket",
        "gati_batch_rows_bucket",
        "gati_exits_total",
        "gati_cache_generation",
        "gati_cache_expected_latency_seconds",
        "gati_dag_requests_total",
        "gati_dag_deadline_met_total",
        "gati_sched_function_workers",
        "gati_control_requests_total",
        "gati_connections_refused_total",
    ] {
        assert!(text.contains(&format!("\n{family}")), "`{family}` missing from /metrics:\n{text}");
    }
    let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
    assert_eq!(types, helps, "every family has a HELP line:\n{text}");
    let (ok, lint) = promtool(&tool, &text);
    assert!(ok && lint.trim().is_empty(), "promtool check metrics:\n{lint}\non:\n{text}");
    // The check can fail: the same text with one HELP line taken out does.
    let stripped: String =
        text.lines().filter(|l| !l.starts_with("# HELP gati_requests_total ")).map(|l| format!("{l}\n")).collect();
    let (ok, lint) = promtool(&tool, &stripped);
    assert!(!ok && lint.contains("gati_requests_total no help text"), "{lint}");
}
