//! GPU device rules for real, on a CPU machine: three fake GPUs are
//! character devices `mknod`ed in a temp dir (major 195, minors 0–2, no
//! driver), declared in `[cluster]` with `gpu_device_dir`. An app's script
//! opens each one: an allowed node gives ENXIO (no driver behind it), a node
//! its cgroup denies gives EPERM — that difference is what is checked.
//!
//! - a one-node cluster grants an app 1 of the 3 GPUs: it opens only its own,
//!   and `gatictl apps`, Health and the metrics say which rules (cgroup-v1 here);
//! - the enforcer on the same config, with the cgroup-v1 devices controller
//!   and with the cgroup-v2 BPF device program: after a lease change the
//!   running process can no longer open the GPU it lost (rules narrowed
//!   before its checkpoint signal), and the restarted one opens exactly its
//!   new set; the app's cgroup is gone when it ends;
//! - `gpu_devices = "env"`: the app runs with `CUDA_VISIBLE_DEVICES` only,
//!   and every node says so;
//! - gang launch: two nodes of 2 GPUs, an app of 4 spans both; each node runs
//!   one process, told its rank, the world size and the nodes in order.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::TestDaemon;
use gatid::api::wire::Kind;
use gatid::auction::devices::{v1, v2, DeviceSpec, Devices, Hierarchy};
use gatid::auction::gang::{Gang, Want};
use gatid::auction::node_enforce::{Desired, Enforcer};
use serde_json::{json, Value};

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `dir/dev` with nvidia0..2 as character devices 195:0..2 (root only).
fn fake_gpus(dir: &Path) -> PathBuf {
    let dev = dir.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    for i in 0..3 {
        let st = std::process::Command::new("mknod")
            .arg(dev.join(format!("nvidia{i}")))
            .args(["c", "195", &i.to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "mknod");
    }
    dev
}

fn key_file(dir: &Path) -> PathBuf {
    let key = dir.join("cluster.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

fn cluster_config(dir: &Path, mode: &str, dev: &Path) -> String {
    let me = free_port();
    format!(
        "{}\n[cluster]\nnode_id = 1\nlisten = \"{me}\"\nkey_file = \"{}\"\narbiter = \"{me}\"\ngpus = 3\nlease_s = 2.0\nround_s = 0.5\ngrace_s = 0.5\ngpu_devices = \"{mode}\"\ngpu_device_dir = \"{}\"\n",
        common::config(dir, "", &[]),
        key_file(dir).display(),
        dev.display()
    )
}

/// A shell script that appends `<tag> <CUDA_VISIBLE_DEVICES> <rules> <i:open|denied|missing ...>`
/// to `report` at start and at SIGTERM (then exits), and sleeps in between.
fn probe_script(dev: &Path, report: &Path) -> String {
    format!(
        r#"exec 2>/dev/null
probe() {{ r=""; for i in 0 1 2; do e=$( {{ head -c0 < {dev}/nvidia$i; }} 2>&1 ); case "$e" in *"not permitted"*) r="$r $i:denied";; *"No such file"*) r="$r $i:missing";; *) r="$r $i:open";; esac; done; echo "$r"; }}
line() {{ echo "$1 $CUDA_VISIBLE_DEVICES $GATI_GPU_DEVICE_RULES $GATI_RANK/$GATI_WORLD_SIZE$(probe)" >> {report}; }}
trap 'line term; exit 0' TERM
line start
while :; do sleep 0.05; done"#,
        dev = dev.display(),
        report = report.display()
    )
}

fn lines(report: &Path) -> Vec<String> {
    std::fs::read_to_string(report).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// The probe part expected when exactly `open` of 0..3 can be opened.
fn only(open: &[u32]) -> String {
    (0..3).map(|i| format!("{i}:{}", if open.contains(&i) { "open" } else { "denied" })).collect::<Vec<_>>().join(" ")
}

fn metric(d: &TestDaemon, needle: &str) -> Option<f64> {
    let text = d.client().stats_text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(needle)).map(|v| v.trim().parse().unwrap())
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: mknod and the cgroup-v1 devices controller")]
fn a_granted_app_opens_only_its_own_gpu_and_every_view_says_cgroup() {
    common::require_root();
    let dir = common::tempdir("gpu-devices");
    let dev = fake_gpus(&dir);
    let report = dir.join("report");
    let d = TestDaemon::start(&dir, &cluster_config(&dir, "cgroup", &dev));
    let req = json!({ "name": "one", "gpus": 1, "work": 1e6, "command": ["sh", "-c", probe_script(&dev, &report)] });
    let v = d.client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    let app = v["app"].as_u64().unwrap();
    poll_until("the app reported", Duration::from_secs(20), || !lines(&report).is_empty());
    let first = lines(&report).remove(0);
    let gpu: u32 = first.split(' ').nth(1).unwrap().parse().expect("one GPU in CUDA_VISIBLE_DEVICES");
    // cgroup-v1 where the devices controller is mounted (this machine), cgroup-v2 on a pure v2 host.
    let mode = first.split(' ').nth(2).unwrap().to_string();
    assert!(["cgroup-v1", "cgroup-v2"].contains(&mode.as_str()), "{first}");
    assert_eq!(first, format!("start {gpu} {mode} 0/1 {}", only(&[gpu])), "it opens only its own GPU");

    let apps: Value = d.client().control_json(Kind::Apps, 0, &[]).expect("apps");
    assert_eq!(apps["gpu_devices"]["mode"], mode, "{apps}");
    assert_eq!(apps["gpu_devices"]["configured"], "cgroup");
    let entry = apps["apps"].as_array().unwrap().iter().find(|a| a["app"] == app).expect("the app listed").clone();
    assert_eq!(entry["devices"]["rules"], mode, "{entry}");
    assert_eq!(entry["devices"]["allowed"], json!([gpu]));
    let cgroup = PathBuf::from(entry["devices"]["cgroup"].as_str().unwrap());
    let pid = entry["pid"].as_u64().unwrap().to_string();
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid), "the app's process is in {}: {procs}", cgroup.display());
    let health: Value = d.client().control_json(Kind::Health, 0, &[]).expect("health");
    assert_eq!(health["gpu_devices"]["mode"], mode, "{health}");
    assert_eq!(metric(&d, &format!("gati_cluster_gpu_device_rules{{mode=\"{mode}\"}} ")), Some(1.0));

    // The daemon stops: the app gets its checkpoint signal and its cgroup is removed.
    let mut d = d;
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(20));
    assert!(lines(&report).iter().any(|l| l.starts_with("term ")), "{:?}", lines(&report));
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lease-change scenario on the enforcer, with the rules in `hierarchy`.
fn lease_change(hierarchy: Hierarchy, node: u32) {
    let dir = common::tempdir("gpu-devices-change");
    let dev = fake_gpus(&dir);
    let report = dir.join("report");
    let cfg = gatid::config::parse(&cluster_config(&dir, "cgroup", &dev), &dir).unwrap().cluster.unwrap();
    let devices = Devices::detect_at(&[hierarchy], node, DeviceSpec::of(&cfg));
    let mode = devices.mode();
    assert!(mode.starts_with("cgroup-"), "{:?}", devices.status());
    let mut e = Enforcer::with_devices(node, Duration::from_millis(500), devices);
    let command = vec!["sh".to_string(), "-c".into(), probe_script(&dev, &report)];
    let want = |gpus: &[u32]| {
        let gang = Gang { nodes: vec![node], node_gpus: vec![gpus.len() as u32], rank: 0, expiry: 60.0 };
        let mut d = Desired::new();
        d.insert(5, Want { gpus: gpus.to_vec(), command: command.clone(), gang });
        d
    };
    let tick_until = |e: &mut Enforcer, d: &Desired, what: &str, n: usize| {
        poll_until(what, Duration::from_secs(20), || {
            e.reconcile(d);
            lines(&report).len() >= n
        });
    };

    // 1 of 3.
    tick_until(&mut e, &want(&[1]), "first start", 1);
    assert_eq!(lines(&report)[0], format!("start 1 {mode} 0/1 {}", only(&[1])));
    let cgroup = PathBuf::from(e.app_devices()[&5].cgroup.clone().unwrap());
    // The lease changes to GPUs 0 and 2: at its checkpoint signal the old
    // process can open none of its GPUs any more; the new one opens 0 and 2.
    tick_until(&mut e, &want(&[0, 2]), "the restart after the change", 3);
    let l = lines(&report);
    assert_eq!(l[1], format!("term 1 {mode} 0/1 {}", only(&[])), "{l:?}");
    assert_eq!(l[2], format!("start 0,2 {mode} 0/1 {}", only(&[0, 2])), "{l:?}");
    assert_eq!(e.app_devices()[&5].allowed, vec![0, 2]);
    // The lease ends: the process stops and its cgroup is removed.
    poll_until("the app ended", Duration::from_secs(20), || {
        e.reconcile(&Desired::new());
        e.pids().is_empty() && !cgroup.exists()
    });
    assert_eq!(lines(&report)[3], format!("term 0,2 {mode} 0/1 {}", only(&[])));
    drop(e);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: mknod and the cgroup-v1 devices controller")]
fn after_a_lease_change_the_app_opens_only_its_new_gpus_v1() {
    common::require_root();
    assert!(Path::new(v1::MOUNT).join("devices.allow").exists(), "no cgroup-v1 devices controller at {}", v1::MOUNT);
    lease_change(Hierarchy::V1(v1::MOUNT), 9101);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: mknod, cgroup v2 and BPF")]
#[cfg_attr(gati_no_bpf, ignore = "built without clang: no cgroup-v2 device program")]
fn after_a_lease_change_the_app_opens_only_its_new_gpus_v2_bpf() {
    common::require_root();
    let mount = if Path::new(v2::MOUNT).join("cgroup.controllers").exists() { v2::MOUNT } else { v2::HYBRID_MOUNT };
    lease_change(Hierarchy::V2(mount), 9102);
}

#[test]
fn with_gpu_devices_env_the_app_runs_on_cuda_visible_devices_only() {
    let dir = common::tempdir("gpu-devices-env");
    let dev = if common::is_root() { fake_gpus(&dir) } else { dir.join("dev") };
    let report = dir.join("report");
    let d = TestDaemon::start(&dir, &cluster_config(&dir, "env", &dev));
    let req = json!({ "name": "env", "gpus": 1, "work": 1e6, "command": ["sh", "-c", probe_script(&dev, &report)] });
    d.client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    poll_until("the app reported", Duration::from_secs(20), || !lines(&report).is_empty());
    let first = lines(&report).remove(0);
    let every = if common::is_root() { "0:open 1:open 2:open" } else { "0:missing 1:missing 2:missing" };
    assert!(first.starts_with("start ") && first.ends_with(&format!(" env 0/1 {every}")), "{first}");
    let apps: Value = d.client().control_json(Kind::Apps, 0, &[]).expect("apps");
    assert_eq!(apps["gpu_devices"]["mode"], "env", "{apps}");
    assert_eq!(apps["gpu_devices"]["reason"], "gpu_devices = \"env\"");
    assert_eq!(apps["apps"][0]["devices"]["rules"], "env", "{apps}");
    let health: Value = d.client().control_json(Kind::Health, 0, &[]).expect("health");
    assert_eq!(health["gpu_devices"]["mode"], "env");
    assert_eq!(metric(&d, "gati_cluster_gpu_device_rules{mode=\"env\"} "), Some(1.0));
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_app_spanning_two_nodes_runs_one_rank_on_each() {
    let root = common::tempdir("gang");
    let key = key_file(&root);
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let addrs = [free_port(), free_port()];
    let nodes: Vec<TestDaemon> = (1..=2u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            let me = addrs[id as usize - 1];
            let peer = addrs[2 - id as usize];
            let text = format!(
                "{}\n[cluster]\nnode_id = {id}\nlisten = \"{me}\"\nkey_file = \"{}\"\npeers = [\"{peer}\"]\narbiter = \"{}\"\ngpus = 2\nlease_s = 2.0\nround_s = 0.5\ngrace_s = 0.5\ngpu_devices = \"env\"\n",
                common::config(&dir, "", &[]),
                key.display(),
                addrs[0]
            );
            TestDaemon::start(&dir, &text)
        })
        .collect();
    let arbiter = |d: &TestDaemon| d.client().control_json(Kind::Apps, 0, &[]).expect("apps")["arbiter"].clone();
    poll_until("both nodes welcomed", Duration::from_secs(20), || nodes.iter().all(|d| arbiter(d) == 1));
    let script = format!(
        "echo \"$GATI_RANK $GATI_WORLD_SIZE $GATI_NODES $GATI_NODE_GPUS $CUDA_VISIBLE_DEVICES $GATI_LEASE_CLOCK\" > {}/rank-$GATI_NODE_ID; exec sleep 60",
        out.display()
    );
    let req = json!({ "name": "gang", "gpus": 4, "work": 1e6, "command": ["sh", "-c", script] });
    nodes[1].client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    let seen = |n: u32| std::fs::read_to_string(out.join(format!("rank-{n}"))).unwrap_or_default().trim().to_string();
    // (Polled to the expected values: a smaller first grant would start a rank that is restarted.)
    let want = ["0 2 1,2 2,2 0,1 arbiter", "1 2 1,2 2,2 0,1 arbiter"];
    let until = Instant::now() + Duration::from_secs(30);
    while [seen(1), seen(2)] != want {
        assert!(Instant::now() < until, "ranks saw {:?}, not {want:?}", [seen(1), seen(2)]);
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&root);
}
