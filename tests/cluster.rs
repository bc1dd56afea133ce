//! Three gatid daemons on loopback form a cluster (node 1 the static
//! arbiter, 2 declared GPUs each): apps submitted to any node are granted
//! leases, no GPU is leased to two apps at once in any node's view, a granted
//! app runs with its GPUs in `CUDA_VISIBLE_DEVICES`, a killed node's leases
//! are reclaimed within a few lease periods, and frames with a bad key,
//! replayed frames and garbage are refused and counted while the daemon keeps
//! serving; a flood of silent connections from one IP is bounded at accept,
//! closed after the handshake timeout, and locks no peer out.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{leases_checked, TestDaemon};
use gatid::api::wire::Kind;
use gatid::auction::peer::frame::{ClusterKey, Sealer};
use gatid::auction::peer::message::Message;
use serde_json::{json, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const LEASE_S: f64 = 2.0;

fn node_config(dir: &Path, key: &Path, id: u32, addrs: &[SocketAddr], extra: &str) -> String {
    let cluster = format!("gpus = 2\nlease_s = {LEASE_S}\nround_s = 0.5\nf = 0.5\ngrace_s = 0.5\n{extra}");
    common::static_cluster_config(dir, key, id, addrs, &cluster)
}

fn apps(d: &TestDaemon) -> Value {
    d.client().control_json(Kind::Apps, 0, &[]).expect("apps")
}

/// A sample of the daemon's metrics, `family{label="value"}`; 0 when absent.
fn metric(d: &TestDaemon, series: &str) -> f64 {
    let text = d.client().stats_text().unwrap();
    let needle = format!("{series} ");
    text.lines().find_map(|l| l.strip_prefix(&needle)).map_or(0.0, |v| v.trim().parse().unwrap())
}

/// SIGTERM to every node, then each must exit cleanly.
fn drain(nodes: &mut [TestDaemon]) {
    for d in nodes.iter() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
}

fn rejected(d: &TestDaemon, reason: &str) -> f64 {
    metric(d, &format!("gati_peer_frames_rejected_total{{reason=\"{reason}\"}}"))
}

fn key_file(root: &Path) -> std::path::PathBuf {
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    // The daemon closes the connection on a refused frame; wait for it (bounded).
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = std::io::Read::read(&mut s, &mut [0u8; 16]);
}

fn framed(frame: &[u8]) -> Vec<u8> {
    let mut b = (frame.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(frame);
    b
}

fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_nodes_grant_disjoint_leases_reclaim_a_dead_node_and_refuse_bad_frames() {
    let root = common::tempdir("cluster");
    let key = key_file(&root);
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| common::free_port()).collect();
    let mut nodes: Vec<Option<TestDaemon>> = (1..=3u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            Some(TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, "")))
        })
        .collect();
    let node = |nodes: &[Option<TestDaemon>], i: usize| -> Value { apps(nodes[i].as_ref().unwrap()) };

    // Every node joins: the arbiter's welcome reaches it.
    poll_until("all nodes welcomed", Duration::from_secs(20), || (0..3).all(|i| node(&nodes, i)["arbiter"] == 1));

    // Four apps of 2 GPUs, submitted on different nodes; each writes the GPUs it sees.
    let script = format!(
        "echo \"$CUDA_VISIBLE_DEVICES\" > {}/app-$GATI_APP_ID-node-$GATI_NODE_ID; exec sleep 60",
        out.display()
    );
    let mut ids = BTreeSet::new();
    for k in 0..4 {
        let req = json!({ "name": format!("job{k}"), "gpus": 2, "work": 1e6, "command": ["sh", "-c", script] });
        let v = nodes[k % 3].as_ref().unwrap().client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes());
        ids.insert(v.expect("submit")["app"].as_u64().unwrap());
    }
    // A bad submit is refused with a reason.
    let bad = json!({ "name": "x", "gpus": 0, "work": 1.0, "command": ["true"] });
    let e = nodes[1].as_ref().unwrap().client().control_json(Kind::AppSubmit, 0, bad.to_string().as_bytes());
    assert!(format!("{:?}", e.unwrap_err()).contains("demand"));

    // Leases are granted; every node's view stays disjoint at every poll.
    let mut granted = BTreeSet::new();
    poll_until("apps granted", Duration::from_secs(30), || {
        for i in 0..3 {
            for (app, _) in leases_checked(&node(&nodes, i), &format!("node {}", i + 1)) {
                granted.insert(app);
            }
        }
        granted.len() >= 3
    });
    assert!(granted.is_subset(&ids), "{granted:?} vs {ids:?}");
    // ρ is reported for every app, on every node.
    poll_until("rho everywhere", Duration::from_secs(10), || {
        (0..3).all(|i| node(&nodes, i)["apps"].as_array().unwrap().iter().filter(|a| a["rho"].is_f64()).count() == 4)
    });
    // Enforcement: an app's process saw only its granted (declared) GPUs.
    poll_until("an app process ran", Duration::from_secs(10), || {
        std::fs::read_dir(&out).unwrap().flatten().any(|e| {
            let seen = std::fs::read_to_string(e.path()).unwrap_or_default();
            ["0,1", "0", "1"].contains(&seen.trim())
        })
    });

    // Node 3 dies: its leases are reclaimed (revoked in every live view) within a few lease periods.
    let mut dead = nodes[2].take().unwrap();
    dead.signal(libc::SIGKILL);
    dead.wait_exit(Duration::from_secs(10));
    poll_until("node 3's leases reclaimed", Duration::from_secs_f64(5.0 * LEASE_S), || {
        (0..2).all(|i| {
            let l = leases_checked(&node(&nodes, i), &format!("node {}", i + 1));
            l.iter().all(|(_, gpus)| gpus.iter().all(|g| g.0 != 3))
        })
    });
    // The cluster keeps granting on the live nodes, still disjoint.
    let mut held: HashMap<u64, usize> = HashMap::new();
    poll_until("leases on live nodes", Duration::from_secs(10), || {
        for (app, gpus) in leases_checked(&node(&nodes, 0), "node 1") {
            held.insert(app, gpus.len());
        }
        !held.is_empty()
    });

    // Hostile frames at the arbiter.
    let arb = nodes[0].as_ref().unwrap();
    let hb = Message::Heartbeat { node: 77 };
    let before = ["unauthenticated", "replayed", "malformed"].map(|r| rejected(arb, r));
    let wrong = ClusterKey::new(b"another key, not the cluster's").unwrap();
    send_raw(addrs[0], &framed(&Sealer::new(wrong, 77, 1).seal(&hb)));
    let good = Sealer::new(ClusterKey::new(KEY).unwrap(), 77, 1).seal(&hb);
    send_raw(addrs[0], &framed(&good)); // authentic (then refused: node 77 never joined)
    send_raw(addrs[0], &framed(&good)); // the same frame again
    send_raw(addrs[0], b"\x00\x00\x00\x10garbage garbage!");
    send_raw(addrs[0], &u32::MAX.to_be_bytes());
    poll_until("hostile frames counted", Duration::from_secs(10), || {
        let now = ["unauthenticated", "replayed", "malformed"].map(|r| rejected(arb, r));
        now[0] >= before[0] + 1.0 && now[1] >= before[1] + 1.0 && now[2] >= before[2] + 2.0
    });
    assert!(rejected(arb, "refused") >= 1.0, "an authentic frame from a non-member is refused");
    arb.client().ping().expect("the arbiter still serves");
    leases_checked(&apps(arb), "node 1 after hostile frames");

    // Drain: SIGTERM stops the peer service and the app processes with it.
    for d in nodes.iter_mut().flatten() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut().flatten() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// `n` TCP connections to `to` from source address `src` (any of 127.0.0.0/8
/// is this host), blocking.
fn connect_from(src: [u8; 4], to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from((src, 0))).unwrap();
            let s = s.connect(to).await.unwrap().into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            out.push(s);
        }
        out
    })
}

#[test]
fn a_silent_connection_flood_is_bounded_closed_after_the_handshake_and_locks_no_peer_out() {
    const FLOOD: usize = 70; // more than the old total cap of 64
    const PER_IP: usize = 4;
    let root = common::tempdir("cluster-flood");
    let key = key_file(&root);
    let addrs: Vec<SocketAddr> = (0..2).map(|_| common::free_port()).collect();
    let limits = format!("peer_max_connections = 16\npeer_max_per_ip = {PER_IP}\npeer_handshake_timeout_s = 3.0\n");
    let mut nodes: Vec<TestDaemon> = (1..=2u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, &limits))
        })
        .collect();
    poll_until("both nodes welcomed", Duration::from_secs(20), || nodes.iter().all(|d| apps(d)["arbiter"] == 1));
    let arb = &nodes[0];
    let refused =
        |reason: &str| metric(arb, &format!("gati_cluster_peer_connections_refused_total{{reason=\"{reason}\"}}"));
    let open = |state: &str| metric(arb, &format!("gati_cluster_peer_connections{{state=\"{state}\"}}"));

    // A flood of silent connections to the arbiter's peer port from 127.0.0.2:
    // PER_IP are held in handshake, the rest refused at accept.
    let mut flood = connect_from([127, 0, 0, 2], addrs[0], FLOOD);
    poll_until("the excess refused and counted", Duration::from_secs(10), || {
        refused("per_ip") >= (FLOOD - PER_IP) as f64
    });
    assert!(open("handshake") <= PER_IP as f64, "at most PER_IP of the flood are held");
    assert!(open("established") >= 1.0, "node 2's link to the arbiter stays");

    // A new connection from a known peer's IP (127.0.0.1) still gets in: its
    // authentic frame reaches the arbiter (and is refused there: node 77 never joined).
    let before = rejected(arb, "refused");
    let hb = Sealer::new(ClusterKey::new(KEY).unwrap(), 77, 1).seal(&Message::Heartbeat { node: 77 });
    send_raw(addrs[0], &framed(&hb));
    poll_until("a peer's new connection admitted", Duration::from_secs(10), || rejected(arb, "refused") > before);

    // The cluster keeps granting: an app submitted on node 2 after the flood gets its lease.
    let req = json!({ "name": "after-flood", "gpus": 2, "work": 1e6, "command": ["sleep", "60"] });
    let app = nodes[1].client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    let app = app["app"].as_u64().unwrap();
    poll_until("the app granted, in both views", Duration::from_secs(20), || {
        nodes.iter().all(|d| leases_checked(&apps(d), "after the flood").iter().any(|(a, _)| *a == app))
    });

    // The silent ones are closed once the handshake timeout passes (the refused ones at once).
    for (i, s) in flood.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        match s.read(&mut [0u8; 16]) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("flood connection {i} still open: {other:?}"),
        }
    }
    poll_until("handshake timeouts counted", Duration::from_secs(10), || {
        rejected(arb, "handshake_timeout") >= PER_IP as f64 && open("handshake") == 0.0
    });
    assert!(open("established") >= 1.0, "node 2's link to the arbiter stays");
    drop(flood);
    arb.client().ping().expect("the arbiter still serves");

    drain(&mut nodes);
    let _ = std::fs::remove_dir_all(&root);
}

/// A node whose arbiter is gone (a static arbiter killed: nothing renews or
/// revokes its leases) ends them itself once they are `2 × round_s + 1` s
/// past their expiry, and stops their processes; it keeps serving.
#[test]
fn leases_lapse_on_a_node_whose_arbiter_is_gone() {
    let root = common::tempdir("cluster-lapse");
    let key = key_file(&root);
    let addrs: Vec<SocketAddr> = (0..2).map(|_| common::free_port()).collect();
    let mut nodes: Vec<TestDaemon> = (1..=2u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, ""))
        })
        .collect();
    poll_until("both nodes welcomed", Duration::from_secs(20), || nodes.iter().all(|d| apps(d)["arbiter"] == 1));
    // Two apps of 2 GPUs on a cluster of 4: one of them runs on node 2.
    for k in 0..2 {
        let req = json!({ "name": format!("lapse{k}"), "gpus": 2, "work": 1e6, "command": ["sleep", "120"] });
        nodes[1].client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    }
    let mut pid = 0;
    poll_until("an app process on node 2", Duration::from_secs(30), || {
        let v = apps(&nodes[1]);
        leases_checked(&v, "node 2");
        pid = v["apps"].as_array().unwrap().iter().find_map(|a| a["pid"].as_u64()).unwrap_or(0);
        pid != 0
    });
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // The arbiter dies; node 2 hears nothing more about its leases.
    let mut arb = nodes.remove(0);
    arb.signal(libc::SIGKILL);
    arb.wait_exit(Duration::from_secs(10));
    let n2 = &nodes[0];
    // Lease LEASE_S, then 2 × 0.5 + 1 s of slack, 250 ms settle, grace_s 0.5.
    poll_until("node 2's leases lapsed and its app stopped", Duration::from_secs(20), || {
        let v = apps(n2);
        v["leases"].as_array().unwrap().is_empty() && v["apps"].as_array().unwrap().iter().all(|a| a["pid"].is_null())
    });
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the app process {pid} is gone");
    let v = apps(n2);
    assert!(v["lapsed"].as_u64().unwrap() >= 1, "{v}");
    assert!(metric(n2, "gati_cluster_leases_lapsed_total") >= 1.0);
    n2.client().ping().expect("node 2 still serves");

    drain(&mut nodes);
    let _ = std::fs::remove_dir_all(&root);
}
