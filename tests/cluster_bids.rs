//! Agents bid over the wire (issue 12): three gatid daemons on loopback
//! (node 1 the static arbiter, 2 declared GPUs each, f = 0 so every app that
//! can use GPUs is offered) and the test itself as a fourth member with a
//! hand-written agent.
//!
//! - every node's agents answer offers for the apps submitted on it, over
//!   the wire (nodes 2, 3) and in process (node 1), and the apps are granted
//!   by the auction;
//! - an app whose home node is SIGSTOPped does not bid, takes no part in the
//!   auction of the rounds while it is stopped, and the cluster keeps
//!   granting the others; woken, the node rejoins and its agent bids again;
//! - the test's agent sends over-size, non-positive-ρ, stale and
//!   not-offered bids, each refused and counted under its reason, then a
//!   valid one, which the auction grants.
//!
//! Nothing is timed: conditions are polled with generous bounds.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{leases_checked, TestDaemon};
use gatid::api::wire::Kind;
use gatid::auction::peer::frame::{open, ClusterKey, ReplayGuard, Sealer};
use gatid::auction::peer::message::{Message, WireOption};
use serde_json::{json, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
/// The test's own member.
const FAKE: u32 = 4;

/// Lease 2 s, rounds every 0.5 s with a 0.3 s bid deadline, every app in the auction (f = 0).
const CLUSTER: &str = "gpus = 2\nlease_s = 2.0\nround_s = 0.5\nbid_deadline_s = 0.3\nf = 0.0\ngrace_s = 0.5\n";

fn node_config(dir: &Path, key: &Path, id: u32, addrs: &[SocketAddr]) -> String {
    common::static_cluster_config(dir, key, id, addrs, CLUSTER)
}

fn apps(d: &TestDaemon) -> Value {
    d.client().control_json(Kind::Apps, 0, &[]).expect("apps")
}

/// `name{label="value"}` from a daemon's metrics (0 when absent).
fn metric(d: &TestDaemon, name: &str, label: &str, value: &str) -> f64 {
    let text = d.client().stats_text().unwrap();
    let needle = format!("{name}{{{label}=\"{value}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&needle)).map_or(0.0, |v| v.trim().parse().unwrap())
}

fn bids(d: &TestDaemon, result: &str) -> f64 {
    metric(d, "gati_auction_bids_total", "result", result)
}

fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn submit(d: &TestDaemon, name: &str, gpus: u32) -> u64 {
    let req = json!({ "name": name, "gpus": gpus, "work": 1e6, "command": ["sleep", "600"] });
    let v = d.client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    v["app"].as_u64().unwrap()
}

/// The arbiter's last rounds (`gatictl apps` on the arbiter node).
fn rounds(arb: &TestDaemon) -> Vec<Value> {
    apps(arb)["rounds"].as_array().cloned().unwrap_or_default()
}

fn ids(r: &Value, field: &str) -> Vec<u64> {
    r[field].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// The test as cluster member [`FAKE`]: its link to the arbiter (join,
/// heartbeats, its messages) and its listener (what the arbiter sends it).
struct FakeNode {
    tx: Arc<Mutex<(TcpStream, Sealer)>>,
    rx: mpsc::Receiver<Message>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeNode {
    fn join(arbiter: SocketAddr) -> FakeNode {
        let key = ClusterKey::new(KEY).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (msgs, rx) = mpsc::channel();
        let (s, k) = (Arc::clone(&stop), key.clone());
        let reader = std::thread::spawn(move || {
            let mut guard = ReplayGuard::default();
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                while !s.load(Ordering::Relaxed) {
                    let mut len = [0u8; 4];
                    match c.read_exact(&mut len) {
                        Ok(()) => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            continue
                        }
                        Err(_) => break,
                    }
                    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    if c.read_exact(&mut frame).is_err() {
                        break;
                    }
                    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    if let Ok(o) = open(&k, &mut guard, &frame) {
                        let _ = msgs.send(o.message);
                    }
                }
            }
        });
        let stream = TcpStream::connect(arbiter).unwrap();
        let tx = Arc::new(Mutex::new((stream, Sealer::new(key, FAKE, 1))));
        let node = FakeNode { tx, rx, stop, threads: vec![reader] };
        node.send(&Message::Join { node: FAKE, listen: listen.to_string(), gpus: Vec::new() });
        let (s, tx) = (Arc::clone(&node.stop), Arc::clone(&node.tx));
        let beat = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut g = tx.lock().unwrap();
                let f = g.1.seal(&Message::Heartbeat { node: FAKE });
                let _ = write_framed(&mut g.0, &f);
                drop(g);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut node = node;
        node.threads.push(beat);
        node
    }

    fn send(&self, m: &Message) {
        let mut g = self.tx.lock().unwrap();
        let f = g.1.seal(m);
        write_framed(&mut g.0, &f).expect("write to the arbiter");
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

fn write_framed(s: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    let mut b = (frame.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(frame);
    s.write_all(&b)
}

#[test]
fn agents_bid_over_the_wire_a_stopped_agent_sits_out_and_bad_bids_are_refused() {
    let root = common::tempdir("cluster-bids");
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| common::free_port()).collect();
    let mut nodes: Vec<TestDaemon> = (1..=3u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs))
        })
        .collect();
    poll_until("all nodes welcomed", Duration::from_secs(20), || nodes.iter().all(|d| apps(d)["arbiter"] == 1));
    let arb = &nodes[0];

    // One app of 2 GPUs per node: its agent is on that node.
    let app: Vec<u64> = (0..3).map(|i| submit(&nodes[i], &format!("job{}", i + 1), 2)).collect();
    poll_until("every app granted by the auction, every agent bidding", Duration::from_secs(30), || {
        let mut granted = BTreeSet::new();
        for (i, d) in nodes.iter().enumerate() {
            granted.extend(leases_checked(&apps(d), &format!("node {}", i + 1)).into_iter().map(|(a, _)| a));
        }
        let auctioned: BTreeSet<u64> = rounds(arb).iter().flat_map(|r| ids(r, "auctioned")).collect();
        app.iter().all(|a| granted.contains(a) && auctioned.contains(a))
            && nodes.iter().all(|d| bids(d, "sent") >= 1.0)
            && bids(arb, "accepted") >= 3.0
    });
    // Nodes 2 and 3 bid over TCP; the arbiter's own agent in process.
    for d in &nodes[1..] {
        assert!(metric(d, "gati_peer_frames_sent_total", "kind", "bid") >= 1.0);
    }
    assert_eq!(metric(arb, "gati_peer_frames_sent_total", "kind", "bid"), 0.0);
    let offers = {
        let text = arb.client().stats_text().unwrap();
        common::plain_metric(&text, "gati_auction_offers_total")
    };
    assert!(offers >= 3.0, "offers sent: {offers}");
    eprintln!(
        "wire bids: node 1 accepted {}, sent by nodes 1/2/3: {}/{}/{}; {offers} offers",
        bids(arb, "accepted"),
        bids(&nodes[0], "sent"),
        bids(&nodes[1], "sent"),
        bids(&nodes[2], "sent")
    );

    // Node 3 stops: its agent does not answer; app 3 sits out every auction meanwhile, the others are granted.
    let seen_before = rounds(arb).iter().map(|r| r["round"].as_u64().unwrap()).max().unwrap();
    let lease_before = arb_lease_ids(arb).into_iter().max().unwrap_or(0);
    let missing_before = bids(arb, "missing");
    nodes[2].signal(libc::SIGSTOP);
    let mut sat_out = false;
    let mut others_granted = false;
    poll_until("node 3's app misses a round and the others are granted", Duration::from_secs(30), || {
        for r in rounds(arb).iter().filter(|r| r["round"].as_u64().unwrap() > seen_before) {
            assert!(!ids(r, "auctioned").contains(&app[2]), "node 3's app won an auction while stopped: {r}");
            sat_out |= ids(r, "missing").contains(&app[2]) && ids(r, "offered").contains(&app[2]);
        }
        let view = apps(arb);
        others_granted |= leases_checked(&view, "node 1")
            .iter()
            .zip(view["leases"].as_array().unwrap())
            .any(|((a, _), l)| *a != app[2] && l["id"].as_u64().unwrap() > lease_before);
        sat_out && others_granted
    });
    assert!(bids(arb, "missing") > missing_before);
    // Node 3 wakes: removed meanwhile, it is made to rejoin (its heartbeats are refused and its
    // connection closed), and its agent bids again.
    let stopped_until = rounds(arb).iter().map(|r| r["round"].as_u64().unwrap()).max().unwrap();
    nodes[2].signal(libc::SIGCONT);
    poll_until("node 3 rejoins and its agent bids again", Duration::from_secs(30), || {
        rounds(arb).iter().any(|r| r["round"].as_u64().unwrap() > stopped_until && ids(r, "bids").contains(&app[2]))
    });

    // The test's own agent: a member with no GPUs and one app.
    let fake = FakeNode::join(addrs[0]);
    let fake_app = (u64::from(FAKE) << 32) + 1;
    poll_until("the fake node is a member", Duration::from_secs(10), || {
        fake.rx.try_iter().any(|m| matches!(m, Message::Welcome { arbiter: 1, .. }))
    });
    fake.send(&Message::Submit {
        node: FAKE,
        app: fake_app,
        name: "fake".into(),
        demand: 1,
        work: 1000.0,
        command: vec!["sleep".into(), "600".into()],
    });
    let reasons = ["too_many_options", "invalid", "stale", "not_offered"];
    let before = reasons.map(|r| bids(arb, r));
    let until = Instant::now() + Duration::from_secs(40);
    let mut offered = 0;
    loop {
        let won = rounds(arb).iter().any(|r| ids(r, "auctioned").contains(&fake_app));
        let counted = reasons.iter().zip(before).all(|(r, b)| bids(arb, r) >= b + 1.0);
        if won && counted {
            break;
        }
        assert!(Instant::now() < until, "fake agent: won {won}, refusals counted {counted} after {offered} offers");
        let Ok(m) = fake.rx.recv_timeout(Duration::from_millis(200)) else { continue };
        let Message::Offer { round, app, free, .. } = m else { continue };
        assert_eq!(app, fake_app, "an offer for another node's app reached the fake node");
        offered += 1;
        let (n, _) = free[0];
        let one = WireOption { per_node: vec![(n, 1)], rho: 0.5 };
        let bid = |round, rho_without, options: Vec<WireOption>| Message::Bid { round, app, rho_without, options };
        fake.send(&bid(round, 2.0, vec![one.clone(); 129])); // too_many_options
        fake.send(&bid(round, -1.0, vec![one.clone()])); // invalid
        fake.send(&bid(round, 2.0, vec![WireOption { per_node: vec![(n, 1)], rho: 0.0 }])); // invalid
        fake.send(&bid(round - 1, 2.0, vec![one.clone()])); // stale
        fake.send(&bid(round, 2.0, vec![WireOption { per_node: vec![(99, 1)], rho: 0.5 }])); // not_offered
        fake.send(&bid(round, 2.0, vec![one.clone()])); // accepted: a tiny ρ, the auction grants it
    }
    for r in reasons {
        eprintln!("bids refused as {r}: {}", bids(arb, r) - before[reasons.iter().position(|x| *x == r).unwrap()]);
    }
    eprintln!("the fake agent won an auction after {offered} offers");
    fake.finish();
    arb.client().ping().expect("the arbiter still serves");
    leases_checked(&apps(arb), "node 1 at the end");

    for d in nodes.iter_mut() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Lease ids in the arbiter's view.
fn arb_lease_ids(arb: &TestDaemon) -> Vec<u64> {
    apps(arb)["leases"].as_array().unwrap().iter().map(|l| l["id"].as_u64().unwrap()).collect()
}
