//! DAG invocations through the real socket: the `classify` DAG (sandboxed
//! preprocess → cifar10 model function → sandboxed top-k) agrees with the
//! model served directly; unknown DAGs, crashing functions and hopeless
//! deadlines get their statuses; SIGHUP swaps the DAG set; SIGTERM answers
//! DAG requests in flight.
//!
//! Exec functions run in sandboxes (namespaces, cgroups): these tests need
//! root and skip with a printed reason otherwise (CI runs as root). The sdk's
//! function binaries must be built (`cargo test --release --workspace`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::{Dtype, Status};
use gatid::client::Client;

/// An sdk binary next to this test's target dir (`<target>/<profile>/`).
fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target profile dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: build with cargo build --release --workspace", p.display());
    p
}

fn exec_fn(name: &str, prog: &str, args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[functions]]\nname = \"{name}\"\nkind = \"exec\"\nprogram = \"{}\"\nargs = [{}]\nmemory_mb = 128\n{extra}\n",
        program(prog).display(),
        args.join(", ")
    )
}

/// The classify DAG (as in configs/dag.toml) plus a DAG whose function crashes.
fn dag_config(dir: &Path, extra_dags: &str) -> String {
    let mut parts = vec![cifar_model("cifar10", "")];
    parts.push(exec_fn("preprocess", "gati-fn-preprocess", &["32x32", "f32"], "expected_ms = 1.0\nmin_warm = 1"));
    parts.push(
        "[[functions]]\nname = \"cifar10\"\nkind = \"model\"\nmodel = \"cifar10\"\nexpected_ms = 5.0\nmin_warm = 1\n"
            .into(),
    );
    parts.push(exec_fn("postprocess", "gati-fn-topk", &["3"], "expected_ms = 0.2\nmin_warm = 1"));
    parts.push(exec_fn("crasher", "gati-fn-testkit", &["crash"], "expected_ms = 1.0\ntime_limit_ms = 500"));
    parts.push(exec_fn("echo", "gati-fn-testkit", &["echo"], "expected_ms = 1.0"));
    parts.push(
        "[[dags]]\nname = \"classify\"\ndeadline_ms = 2000\nchain = [\"preprocess\", \"cifar10\", \"postprocess\"]\n\n\
         [[dags]]\nname = \"boom\"\ndeadline_ms = 3000\nchain = [\"crasher\"]\n"
            .into(),
    );
    parts.push(extra_dags.into());
    config(dir, "", &parts)
}

fn cifar_pngs() -> Vec<(PathBuf, usize)> {
    let dir = root().join("data/cifar10");
    let labels: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("labels.json")).expect("data/cifar10/labels.json")).unwrap();
    labels
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (dir.join(e["file"].as_str().unwrap()), e["label"].as_u64().unwrap() as usize))
        .collect()
}

/// The top-1 class of a gati-fn-topk answer.
fn top1(payload: &[u8]) -> usize {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!("top-k output is not JSON ({e}): {}", String::from_utf8_lossy(payload));
    });
    v[0]["class"].as_u64().expect("class") as usize
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: DAG exec functions run in sandboxes (CI runs as root)")]
fn classify_dag_matches_the_model_and_statuses_hold() {
    require_root();
    let dir = tempdir("dispatch");
    let d = TestDaemon::start(&dir, &dag_config(&dir, ""));
    let mut c = d.client();

    // classify on the 20 CIFAR PNGs == the cifar10 model via Infer.
    let images = cifar_pngs();
    assert_eq!(images.len(), 20);
    let mut correct = 0;
    for (path, label) in &images {
        let png = std::fs::read(path).unwrap();
        let r = c.invoke_dag("classify", &png, 0).unwrap();
        assert_eq!(r.status, Status::Ok, "{}: {}", path.display(), String::from_utf8_lossy(&r.payload));
        assert_eq!(r.dtype, Dtype::U8 as u8);
        assert_eq!(r.shape, vec![r.payload.len()]);
        let via_dag = top1(&r.payload);
        let rgb = image::open(path).unwrap().to_rgb8().into_raw();
        let direct = c.infer("cifar10", Dtype::U8, &[32, 32, 3], &rgb, 0).unwrap().ok().unwrap();
        assert_eq!(via_dag, argmax(&direct.floats()), "{}", path.display());
        correct += usize::from(via_dag == *label);
    }
    eprintln!("classify: {correct}/20 match labels.json");

    // Pipelined on one connection: every answer comes back, matched by id.
    let png = std::fs::read(&images[0].0).unwrap();
    let ids: Vec<u64> = (0..16).map(|_| c.send(Client::dag_header("classify", png.len(), 0), &png).unwrap()).collect();
    let mut got: Vec<u64> = (0..16).map(|_| c.recv().unwrap().ok().unwrap().request_id).collect();
    got.sort_unstable();
    assert_eq!(got, ids);

    // Unknown DAG.
    let r = c.invoke_dag("no-such-dag", b"x", 0).unwrap();
    assert_eq!(r.status, Status::UnknownModel);

    // A per-request deadline nothing can meet: answered at once, nothing run.
    let t = Instant::now();
    let r = c.invoke_dag("classify", &png, 1).unwrap();
    assert_eq!(r.status, Status::DeadlineExpired);
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());

    // A crashing function: retried, then answered `Internal` before the deadline.
    let t = Instant::now();
    let r = c.invoke_dag("boom", b"hello", 0).unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, Status::Internal, "{}", String::from_utf8_lossy(&r.payload));
    let msg = String::from_utf8_lossy(&r.payload);
    assert!(msg.contains("crasher"), "{msg}");
    assert!(took < Duration::from_millis(3000), "answered after the deadline: {took:?}");

    // … and the daemon keeps serving, DAGs and models alike.
    let r = c.invoke_dag("classify", &png, 0).unwrap().ok().unwrap();
    assert_eq!(top1(&r.payload), top1(&c.invoke_dag("classify", &png, 0).unwrap().ok().unwrap().payload));
    c.ping().unwrap();

    // Metrics.
    let text = c.stats_text().unwrap();
    for name in
        ["gati_dag_requests_total", "gati_sched_function_workers", "gati_dag_sgs", "gati_sched_cold_starts_total"]
    {
        let until = Instant::now() + Duration::from_secs(3);
        let mut t = text.clone();
        while !t.contains(name) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            t = c.stats_text().unwrap();
        }
        assert!(t.contains(name), "{name} missing from metrics");
    }
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: DAG exec functions run in sandboxes (CI runs as root)")]
fn sighup_swaps_dags_and_sigterm_answers_dag_requests_in_flight() {
    require_root();
    let dir = tempdir("dispatch-reload");
    let mut d = TestDaemon::start(&dir, &dag_config(&dir, ""));
    let mut c = d.client();
    assert_eq!(c.invoke_dag("echoes", b"hi", 0).unwrap().status, Status::UnknownModel);

    let more = "[[dags]]\nname = \"echoes\"\ndeadline_ms = 1000\nchain = [\"echo\"]\n";
    std::fs::write(&d.config, dag_config(&dir, more)).unwrap();
    d.signal(libc::SIGHUP);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.invoke_dag("echoes", b"hi", 0).unwrap();
        if r.status == Status::Ok {
            assert_eq!(r.payload, b"hi");
            break;
        }
        assert!(Instant::now() < until, "new DAG not served after SIGHUP: {:?}", r.status);
        std::thread::sleep(Duration::from_millis(50));
    }
    let png = std::fs::read(&cifar_pngs()[1].0).unwrap();
    assert_eq!(c.invoke_dag("classify", &png, 0).unwrap().status, Status::Ok, "old DAGs still served");

    // SIGTERM with requests in flight: each gets an answer, the daemon exits 0.
    let ids: Vec<u64> = (0..8).map(|_| c.send(Client::dag_header("classify", png.len(), 0), &png).unwrap()).collect();
    d.signal(libc::SIGTERM);
    for _ in &ids {
        let r = c.recv().expect("an answer for every request in flight");
        assert!(matches!(r.status, Status::Ok | Status::ShuttingDown), "{:?}", r.status);
    }
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}
