//! Agents survive a home-node restart (issue 12): three gatid daemons on
//! loopback (node 1 the static arbiter, 2 declared GPUs each, f = 0 so
//! every app that can use more GPUs is offered).
//!
//! An app is submitted on node 2 and granted by the auction (its agent on
//! node 2 bids). Node 2 is SIGKILLed — its agent goes with the process —
//! and started again with the same node id and peer address (a fresh
//! directory: nothing on disk carries the agent over). Its join's resync
//! carries a `home` message for the app, the agent is restored (counted in
//! `gati_cluster_agents_restored_total`), and the app bids again and is
//! granted by the auction, not only as leftover. Without the restore the
//! restarted node has no agent for the offer and the app never bids again.
//!
//! Nothing is timed: conditions are polled with generous bounds.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{leases_checked, TestDaemon};
use gatid::api::wire::Kind;
use serde_json::{json, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Lease 2 s, rounds every 0.5 s with a 0.3 s bid deadline, every app in the auction (f = 0).
const CLUSTER: &str = "gpus = 2\nlease_s = 2.0\nround_s = 0.5\nbid_deadline_s = 0.3\nf = 0.0\ngrace_s = 0.5\n";

fn node_config(dir: &Path, key: &Path, id: u32, addrs: &[SocketAddr]) -> String {
    common::static_cluster_config(dir, key, id, addrs, CLUSTER)
}

fn start(root: &Path, dir: &str, key: &Path, id: u32, addrs: &[SocketAddr]) -> TestDaemon {
    let dir = root.join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    TestDaemon::start(&dir, &node_config(&dir, key, id, addrs))
}

fn apps(d: &TestDaemon) -> Value {
    d.client().control_json(Kind::Apps, 0, &[]).expect("apps")
}

fn metrics(d: &TestDaemon) -> String {
    d.client().stats_text().unwrap()
}

fn bids(d: &TestDaemon, result: &str) -> f64 {
    let needle = format!("gati_auction_bids_total{{result=\"{result}\"}} ");
    metrics(d).lines().find_map(|l| l.strip_prefix(&needle)).map_or(0.0, |v| v.trim().parse().unwrap())
}

fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The arbiter's last rounds (`gatictl apps` on the arbiter node).
fn rounds(arb: &TestDaemon) -> Vec<Value> {
    apps(arb)["rounds"].as_array().cloned().unwrap_or_default()
}

fn ids(r: &Value, field: &str) -> Vec<u64> {
    r[field].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

fn round_id(r: &Value) -> u64 {
    r["round"].as_u64().unwrap()
}

/// A round after `after` in which `app`'s agent bid and the auction granted it.
fn bid_and_auctioned(arb: &TestDaemon, app: u64, after: u64) -> bool {
    rounds(arb)
        .iter()
        .any(|r| round_id(r) > after && ids(r, "bids").contains(&app) && ids(r, "auctioned").contains(&app))
}

#[test]
fn a_restarted_home_node_gets_its_agent_back_and_its_app_bids_again() {
    let root = common::tempdir("cluster-agents");
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| common::free_port()).collect();
    let mut nodes: Vec<TestDaemon> = (1..=3u32).map(|id| start(&root, &format!("n{id}"), &key, id, &addrs)).collect();
    poll_until("all nodes welcomed", Duration::from_secs(20), || nodes.iter().all(|d| apps(d)["arbiter"] == 1));

    let req = json!({ "name": "homed", "gpus": 2, "work": 1e6, "command": ["sleep", "600"] });
    let v = nodes[1].client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    let app = v["app"].as_u64().unwrap();
    assert_eq!(v["node"], 2);
    poll_until("the app bids from node 2 and is granted by the auction", Duration::from_secs(30), || {
        bid_and_auctioned(&nodes[0], app, 0)
    });
    assert!(bids(&nodes[1], "sent") >= 1.0);

    // Node 2 dies with its agent; it comes back with the same id and address, nothing kept on disk.
    nodes[1].signal(libc::SIGKILL);
    nodes[1].wait_exit(Duration::from_secs(10));
    let killed_at = rounds(&nodes[0]).iter().map(round_id).max().unwrap();
    let accepted_before = bids(&nodes[0], "accepted");
    nodes[1] = start(&root, "n2-restarted", &key, 2, &addrs);
    poll_until("the restarted node is welcomed", Duration::from_secs(20), || apps(&nodes[1])["arbiter"] == 1);
    poll_until("the restored agent bids and the auction grants its app", Duration::from_secs(30), || {
        bid_and_auctioned(&nodes[0], app, killed_at)
    });
    let restarted = &nodes[1];
    let restored = common::plain_metric(&metrics(restarted), "gati_cluster_agents_restored_total");
    assert_eq!(restored, 1.0, "agents restored on the restarted node");
    assert!(bids(restarted, "sent") >= 1.0, "the restarted node's agent answered an offer");
    assert!(bids(&nodes[0], "accepted") > accepted_before);
    let view = apps(restarted);
    assert_eq!(view["agents"], 1, "{view}");
    let named = view["apps"].as_array().unwrap().iter().any(|a| a["app"] == app && a["name"] == "homed");
    assert!(named, "the restarted node lists its app by name: {view}");
    eprintln!(
        "after the restart: {restored} agent restored, {} bids sent by node 2, {} bids accepted by the arbiter (was {accepted_before})",
        bids(restarted, "sent"),
        bids(&nodes[0], "accepted")
    );
    for (i, d) in nodes.iter().enumerate() {
        leases_checked(&apps(d), &format!("node {}", i + 1));
    }

    for d in nodes.iter_mut() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&root);
}
