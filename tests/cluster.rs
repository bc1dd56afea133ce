//! Three gatid daemons on loopback form a cluster (node 1 the static
//! arbiter, 2 declared GPUs each): apps submitted to any node are granted
//! leases, no GPU is leased to two apps at once in any node's view, a granted
//! app runs with its GPUs in `CUDA_VISIBLE_DEVICES`, a killed node's leases
//! are reclaimed within a few lease periods, and frames with a bad key,
//! replayed frames and garbage are refused and counted while the daemon keeps
//! serving.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
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

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn node_config(dir: &Path, key: &Path, id: u32, addrs: &[SocketAddr]) -> String {
    let me = addrs[id as usize - 1];
    let peers: Vec<String> = addrs.iter().filter(|a| **a != me).map(|a| format!("\"{a}\"")).collect();
    format!(
        "{}\n[cluster]\nnode_id = {id}\nlisten = \"{me}\"\nkey_file = \"{}\"\npeers = [{}]\narbiter = \"{}\"\ngpus = 2\nlease_s = {LEASE_S}\nround_s = 0.5\nf = 0.5\ngrace_s = 0.5\n",
        common::config(dir, "", &[]),
        key.display(),
        peers.join(", "),
        addrs[0]
    )
}

fn apps(d: &TestDaemon) -> Value {
    d.client().control_json(Kind::Apps, 0, &[]).expect("apps")
}

fn rejected(d: &TestDaemon, reason: &str) -> f64 {
    let text = d.client().stats_text().unwrap();
    let needle = format!("gati_peer_frames_rejected_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&needle)).map_or(0.0, |v| v.trim().parse().unwrap())
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
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<Option<TestDaemon>> = (1..=3u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            Some(TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs)))
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
