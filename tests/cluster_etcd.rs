//! Three gatid daemons on loopback form a cluster on etcd (an etcd started by
//! the test, `/usr/bin/etcd` from Debian's etcd-server, which
//! `scripts/setup.sh` installs): the nodes register, elect an arbiter, and
//! an app submitted on any node is granted; a killed non-arbiter node's
//! leases are reclaimed within one lease period; the arbiter killed, the
//! survivor is elected and grants a new app within one lease period; and at
//! every poll no GPU is in two leases in any live node's view. Also: a
//! deposed arbiter's etcd commit is refused (fencing, against etcd
//! directly), and a stalled arbiter (SIGSTOP past its TTL) is replaced and
//! wakes fenced, rejoining under the new one. And a submit written to an
//! arbiter that then dies without storing it is granted by the next arbiter,
//! once (the home node sends it again until it sees it).
//!
//! Bounds: one lease period (`LEASE_S`) from the kill plus [`MARGIN_S`] for
//! etcd's TTL granularity (TTLs are whole seconds, here 2 s, and etcd checks
//! for expired leases every 500 ms). Nothing else is timed.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDaemon;
use gatid::api::wire::Kind;
use serde_json::{json, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const ETCD: &str = "/usr/bin/etcd";
/// Lease length: at least 2 × the etcd TTL (2 s) + round_s, as config checks require.
const LEASE_S: f64 = 6.0;
/// etcd's TTL granularity (see the module doc).
const MARGIN_S: f64 = 1.0;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// An etcd of the test's own: free loopback ports, a temporary data dir, killed on drop.
struct TestEtcd {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl TestEtcd {
    fn start(dir: &Path) -> TestEtcd {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: run scripts/setup.sh (it installs Debian's etcd-server), then rerun this test"
        );
        let (client, peer) = (free_port(), free_port());
        let data = dir.join("etcd-data");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = Command::new(ETCD)
            .args(["--name", "gati-test", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &format!("gati-test=http://{peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let mut e = TestEtcd { child, url: format!("http://{client}"), dir: dir.to_owned() };
        // Ready once /health says so: etcd accepts connections before its
        // one-member cluster has a leader, and a request then is reset (a
        // fresh-clone run failed so on its first lease grant).
        poll_until("etcd healthy", Duration::from_secs(30), || {
            if let Some(st) = e.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(e.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd exited at start-up ({st}):\n{log}");
            }
            healthy(client)
        });
        e
    }
}

/// Whether etcd at `addr` answers `GET /health` with `"health":"true"`.
fn healthy(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.replace(' ', "").contains("\"health\":\"true\"")
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_config(dir: &Path, key: &Path, id: u32, addrs: &[SocketAddr], etcd: &str) -> String {
    let me = addrs[id as usize - 1];
    let peers: Vec<String> = addrs.iter().filter(|a| **a != me).map(|a| format!("\"{a}\"")).collect();
    format!(
        "{}\n[cluster]\nnode_id = {id}\nlisten = \"{me}\"\nkey_file = \"{}\"\npeers = [{}]\netcd = [\"{etcd}\"]\netcd_prefix = \"/gati-test/\"\ngpus = 2\nlease_s = {LEASE_S}\nround_s = 0.5\nf = 0.5\ngrace_s = 0.5\n",
        common::config(dir, "", &[]),
        key.display(),
        peers.join(", "),
    )
}

fn poll_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// A lease in a view: its app and its GPUs as (node, index).
type LeaseSeen = (u64, Vec<(u64, u64)>);

/// A node's view, checked: no GPU in two leases, no clashing grant seen.
/// Returns (app, GPUs as (node, index)) per lease.
fn view_checked(d: &TestDaemon, who: u32) -> (Value, Vec<LeaseSeen>) {
    let view = d.client().control_json(Kind::Apps, 0, &[]).expect("apps");
    let leases = common::leases_checked(&view, &format!("node {who}"));
    (view, leases)
}

type Nodes = Vec<Option<TestDaemon>>;

/// Samples every node's view in a thread of its own, back to back, for the
/// whole test (the main thread's polls pause while it kills and submits):
/// each view checked as [`view_checked`] does. A dead node's socket refuses
/// and is skipped. Returns the number of views checked, or the first violation.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Sampler {
    fn start(sockets: Vec<PathBuf>) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, sock) in sockets.iter().enumerate() {
                    let Ok(mut c) = gatid::client::Client::connect(sock) else { continue };
                    let Ok(view) = c.control_json(Kind::Apps, 0, &[]) else { continue };
                    if view["conflicts"] != 0 {
                        return Err(format!("node {}: a grant clashed with a lease it saw: {view}", i + 1));
                    }
                    let mut seen = BTreeSet::new();
                    for l in view["leases"].as_array().into_iter().flatten() {
                        for g in l["gpus"].as_array().into_iter().flatten() {
                            if !seen.insert((g["node"].as_u64(), g["index"].as_u64())) {
                                return Err(format!("node {}: GPU {g} leased twice: {view}", i + 1));
                            }
                        }
                    }
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(n)
        });
        Sampler { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = self.thread.take().unwrap().join().expect("sampler thread");
        r.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Every live node's view, each checked.
fn views(nodes: &Nodes) -> Vec<(u32, Value, Vec<LeaseSeen>)> {
    (0..nodes.len())
        .filter_map(|i| nodes[i].as_ref().map(|d| (i as u32 + 1, d)))
        .map(|(id, d)| {
            let (v, l) = view_checked(d, id);
            (id, v, l)
        })
        .collect()
}

fn metric(d: &TestDaemon, line_prefix: &str) -> f64 {
    let text = d.client().stats_text().unwrap();
    text.lines().find_map(|l| l.strip_prefix(line_prefix)).map_or(0.0, |v| v.trim().parse().unwrap())
}

fn submit(d: &TestDaemon, name: &str, gpus: u32) -> u64 {
    let req = json!({ "name": name, "gpus": gpus, "work": 1e6, "command": ["sleep", "20"] });
    let v = d.client().control_json(Kind::AppSubmit, 0, req.to_string().as_bytes()).expect("submit");
    v["app"].as_u64().unwrap()
}

/// App `app`'s progress as the arbiter stored it in the test's etcd.
fn stored_progress(url: &str, app: u64) -> Option<gatid::auction::app::Progress> {
    let cfg: gatid::config::ClusterConfig = toml::from_str(&format!(
        "node_id = 9\nlisten = \"127.0.0.1:1\"\nkey_file = \"k\"\netcd = [\"{url}\"]\netcd_prefix = \"/gati-test/\"\n"
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut e = gatid::auction::etcd::Etcd::connect(&cfg).await.ok()?;
        let (snap, _) = e.snapshot().await.ok()?;
        snap.apps.iter().find(|r| r.id == app).map(|r| r.progress)
    })
}

#[test]
fn cluster_on_etcd_elects_an_arbiter_reclaims_a_dead_node_and_fails_over() {
    let root = common::tempdir("cluster-etcd");
    let etcd = TestEtcd::start(&root);
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Nodes = (1..=3u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            Some(TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, &etcd.url)))
        })
        .collect();
    let bound = Duration::from_secs_f64(LEASE_S + MARGIN_S);
    let sampler = Sampler::start(nodes.iter().flatten().map(|d| d.socket.clone()).collect());

    // An arbiter is elected; every node's view names it.
    let mut arbiter = 0u32;
    poll_until("an arbiter elected and known to every node", Duration::from_secs(30), || {
        let v = views(&nodes);
        let first = v[0].1["arbiter"].as_u64();
        let same = v.iter().all(|(_, view, _)| view["arbiter"].as_u64() == first && view["elected"] == true);
        arbiter = first.unwrap_or(0) as u32;
        same && first.is_some()
    });
    let arb = nodes[arbiter as usize - 1].as_ref().unwrap();
    assert_eq!(metric(arb, &format!("gati_cluster_arbiter{{node=\"{arbiter}\"}} ")), 1.0);
    eprintln!("arbiter elected: node {arbiter}");

    // An app of 6 GPUs (every node's 2), submitted on a non-arbiter node: granted on all three.
    let other = (1..=3).find(|&n| n != arbiter).unwrap();
    let a = submit(nodes[other as usize - 1].as_ref().unwrap(), "wide", 6);
    poll_until("app granted GPUs on all three nodes", Duration::from_secs(30), || {
        views(&nodes).iter().all(|(_, _, leases)| {
            let on: BTreeSet<u64> =
                leases.iter().filter(|(app, _)| *app == a).flat_map(|(_, g)| g.iter().map(|g| g.0)).collect();
            on.len() == 3
        })
    });

    // A non-arbiter node dies: its leases are reclaimed in every live view within one lease period.
    let victim = (1..=3).find(|&n| n != arbiter).unwrap();
    let mut dead = nodes[victim as usize - 1].take().unwrap();
    dead.signal(libc::SIGKILL);
    let killed = Instant::now();
    dead.wait_exit(Duration::from_secs(10));
    poll_until("the dead node's leases reclaimed", bound.saturating_sub(killed.elapsed()), || {
        views(&nodes)
            .iter()
            .all(|(_, _, leases)| leases.iter().all(|(_, g)| g.iter().all(|g| g.0 != u64::from(victim))))
    });
    eprintln!("node {victim} killed: its leases reclaimed after {:.2} s", killed.elapsed().as_secs_f64());
    // The app is re-granted on the two live nodes.
    poll_until("app re-granted on the live nodes", Duration::from_secs(20), || {
        views(&nodes).iter().all(|(_, _, leases)| {
            let on: BTreeSet<u64> =
                leases.iter().filter(|(app, _)| *app == a).flat_map(|(_, g)| g.iter().map(|g| g.0)).collect();
            on.len() == 2
        })
    });
    // Its progress is stored at every round, not only when its leases change.
    let p0 = stored_progress(&etcd.url, a).expect("the wide app is stored");
    poll_until("the wide app's progress stored by a later round", Duration::from_secs(10), || {
        stored_progress(&etcd.url, a).is_some_and(|p| p.last > p0.last && p.done > p0.done)
    });

    // The arbiter dies: the survivor is elected and takes over the stored apps and leases, and an app the old
    // arbiter never granted is granted by the new one, within one lease period of the kill. The new app is
    // submitted just before the kill, while the wide app holds every live GPU on a fresh lease (so the old
    // arbiter cannot grant it first), and once every node has heard of it (so the old arbiter stored it).
    let survivor = (1..=3).find(|&n| n != arbiter && n != victim).unwrap();
    let sv = survivor as usize - 1;
    let c = submit(nodes[sv].as_ref().unwrap(), "after-failover", 1);
    poll_until("every node has heard of the new app", Duration::from_secs(10), || {
        views(&nodes).iter().all(|(_, v, _)| v["apps"].as_array().unwrap().iter().any(|x| x["app"] == c))
    });
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (_, leases) = view_checked(nodes[sv].as_ref().unwrap(), survivor);
    assert!(leases.iter().all(|(app, _)| *app != c), "the new app was granted before the failover: {leases:?}");
    let before = stored_progress(&etcd.url, a).expect("the wide app is stored");
    let mut old = nodes[arbiter as usize - 1].take().unwrap();
    old.signal(libc::SIGKILL);
    let killed = Instant::now();
    let killed_unix = unix_now();
    old.wait_exit(Duration::from_secs(10));
    poll_until("the survivor elected", bound.saturating_sub(killed.elapsed()), || {
        views(&nodes).iter().all(|(_, v, _)| v["arbiter"].as_u64() == Some(u64::from(survivor)))
    });
    let elected = killed.elapsed();
    let mut last = Value::Null;
    let until = Instant::now() + bound.saturating_sub(killed.elapsed());
    while !views(&nodes).iter().all(|(_, v, leases)| {
        last = v.clone();
        leases.iter().any(|(app, _)| *app == c)
    }) {
        assert!(Instant::now() < until, "the new app {c} was not granted within {bound:?} of the kill: {last}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let granted_lease = last["leases"].as_array().unwrap().iter().find(|l| l["app"] == c).unwrap().clone();
    assert!(granted_lease["start"].as_f64().unwrap() > killed_unix, "granted by the new arbiter: {granted_lease}");
    let s = || nodes[sv].as_ref().unwrap();
    let granted = killed.elapsed();
    eprintln!(
        "arbiter node {arbiter} killed: node {survivor} elected after {:.2} s, new app granted after {:.2} s (bound {:.1} s)",
        elected.as_secs_f64(),
        granted.as_secs_f64(),
        bound.as_secs_f64()
    );
    // The dead arbiter's GPUs are no one's; the new arbiter says so in its metrics.
    let (_, leases) = view_checked(s(), survivor);
    assert!(leases.iter().all(|(_, g)| g.iter().all(|g| g.0 == u64::from(survivor))), "{leases:?}");
    assert_eq!(metric(s(), &format!("gati_cluster_arbiter{{node=\"{survivor}\"}} ")), 1.0);
    assert!(metric(s(), "gati_cluster_elections_won_total ") >= 1.0);
    // The new arbiter resumed the wide app from the old one's last stored round: nothing of it went back.
    // (Its lease spanned the dead arbiter's node: it is not counted as running after the last stored round.)
    let after = stored_progress(&etcd.url, a).expect("the wide app is still stored");
    assert!(after.done >= before.done && after.attained >= before.attained && after.last >= before.last);
    eprintln!(
        "wide app's stored progress: done {:.1} before the kill, {:.1} after the failover",
        before.done, after.done
    );

    let sampled = sampler.finish();
    assert!(sampled > 0);
    eprintln!("{sampled} node views sampled throughout, none with a GPU in two leases");

    // Drain.
    for d in nodes.iter_mut().flatten() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut().flatten() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
    drop(etcd);
    let _ = std::fs::remove_dir_all(&root);
}

/// Fencing, against the test's etcd: an arbiter's commits hold only while its
/// election key is the one it won with. Once its etcd lease is gone (here
/// revoked; in a failure, expired) another candidate wins, the old leader's
/// next commit is refused, and the new one reads what the old one stored.
#[test]
fn a_deposed_arbiter_cannot_commit() {
    use gatid::auction::etcd::record::{AppRecord, LeaderRecord, Op};
    use gatid::auction::etcd::{Etcd, EtcdError};

    let root = common::tempdir("cluster-etcd-fence");
    let etcd = TestEtcd::start(&root);
    let cfg: gatid::config::ClusterConfig = toml::from_str(&format!(
        "node_id = 1\nlisten = \"127.0.0.1:1\"\nkey_file = \"k\"\netcd = [\"{}\"]\netcd_prefix = \"/fence/\"\n",
        etcd.url
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let app = |id: u64| AppRecord {
            id,
            node: 1,
            name: format!("a{id}"),
            demand: 1,
            work: 1.0,
            command: vec!["true".into()],
            arrival: 0.0,
            progress: Default::default(),
            model: gatid::auction::throughput::ThroughputModel::linear(1.0, 0.7),
        };
        let mut a = Etcd::connect(&cfg).await.unwrap();
        let mut b = Etcd::connect(&cfg).await.unwrap();
        let la = a.grant(2).await.unwrap();
        let ka = a.campaign(la, &LeaderRecord { node: 1, listen: "127.0.0.1:1".into() }).await.unwrap();
        a.commit(&ka, &[Op::PutApp(app(1))]).await.unwrap();
        // b campaigns (waits), a's lease goes, b wins.
        let lb = b.grant(2).await.unwrap();
        let mut b2 = b.clone();
        let won =
            tokio::spawn(async move { b2.campaign(lb, &LeaderRecord { node: 2, listen: "127.0.0.1:2".into() }).await });
        a.revoke(la).await.unwrap();
        let kb = tokio::time::timeout(Duration::from_secs(10), won).await.expect("b elected").unwrap().unwrap();
        let fenced = a.commit(&ka, &[Op::PutApp(app(2))]).await;
        assert!(matches!(fenced, Err(EtcdError::Fenced)), "{fenced:?}");
        b.commit(&kb, &[Op::PutApp(app(3))]).await.unwrap();
        let (snap, _) = b.snapshot().await.unwrap();
        let ids: Vec<u64> = snap.apps.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![1, 3], "the deposed arbiter's write is not stored");
    });
    drop(etcd);
    let _ = std::fs::remove_dir_all(&root);
}

/// An arbiter that is alive but lost its etcd lease (frozen with SIGSTOP
/// past the TTL, as a partition or a stall would) is replaced; when it
/// wakes, its etcd commits are refused, it sends no grant, stops
/// arbitrating, and rejoins as a member of the new arbiter's view. No view
/// ever shows a GPU in two leases.
#[test]
fn a_stalled_arbiter_is_fenced_and_rejoins_as_a_member() {
    let root = common::tempdir("cluster-etcd-stall");
    let etcd = TestEtcd::start(&root);
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addrs: Vec<SocketAddr> = (0..2).map(|_| free_port()).collect();
    let nodes: Nodes = (1..=2u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            Some(TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, &etcd.url)))
        })
        .collect();
    let bound = Duration::from_secs_f64(LEASE_S + MARGIN_S);
    let mut x = 0u32;
    poll_until("an arbiter elected", Duration::from_secs(30), || {
        let v = views(&nodes);
        x = v[0].1["arbiter"].as_u64().unwrap_or(0) as u32;
        x != 0 && v.iter().all(|(_, view, _)| view["arbiter"].as_u64() == Some(u64::from(x)))
    });
    let y = 3 - x;
    let (dx, dy) = (nodes[x as usize - 1].as_ref().unwrap(), nodes[y as usize - 1].as_ref().unwrap());
    let p = submit(dy, "wide", 4);
    poll_until("the wide app granted on both nodes", Duration::from_secs(30), || {
        views(&nodes).iter().all(|(_, _, l)| l.iter().filter(|(a, _)| *a == p).flat_map(|(_, g)| g).count() == 4)
    });

    // The arbiter stalls (its control socket does not answer either: only y is polled meanwhile).
    dx.signal(libc::SIGSTOP);
    let stalled = Instant::now();
    poll_until("y elected while x stalls", bound, || {
        let (v, l) = view_checked(dy, y);
        v["arbiter"].as_u64() == Some(u64::from(y)) && l.iter().all(|(_, g)| g.iter().all(|g| g.0 == u64::from(y)))
    });
    eprintln!("arbiter {x} stalled: node {y} elected after {:.2} s", stalled.elapsed().as_secs_f64());
    let q = submit(dy, "during-stall", 1);
    poll_until("the new arbiter grants", bound, || view_checked(dy, y).1.iter().any(|(a, _)| *a == q));

    // x wakes: fenced, it stops arbitrating and takes y's view; every view stays disjoint.
    dx.signal(libc::SIGCONT);
    poll_until("x rejoins under y", Duration::from_secs(20), || {
        let v = views(&nodes);
        v.iter().all(|(_, view, _)| view["arbiter"].as_u64() == Some(u64::from(y)))
            && metric(dx, &format!("gati_cluster_arbiter{{node=\"{x}\"}} ")) == 0.0
    });
    assert_eq!(metric(dy, &format!("gati_cluster_arbiter{{node=\"{y}\"}} ")), 1.0);
    for _ in 0..20 {
        views(&nodes);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "node {x} after waking: etcd errors fenced {} keepalive {} commit {}",
        metric(dx, "gati_etcd_errors_total{op=\"fenced\"} "),
        metric(dx, "gati_etcd_errors_total{op=\"keepalive\"} "),
        metric(dx, "gati_etcd_errors_total{op=\"commit\"} ")
    );
    drop(nodes);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&root);
}

/// A submit the arbiter never stores is not lost: the arbiter is stopped
/// (SIGSTOP: it neither handles nor stores what reaches it), an app is
/// submitted on another node and written to the stopped arbiter's
/// connection, the arbiter is killed. The home node keeps the app until it
/// sees it in the arbiter's state and sends it again to the next arbiter,
/// which grants it within one lease period of the kill, as one app.
#[test]
fn a_submit_sent_to_a_dying_arbiter_is_granted_by_the_next_one_exactly_once() {
    let root = common::tempdir("cluster-etcd-submit");
    let etcd = TestEtcd::start(&root);
    let key = root.join("cluster.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Nodes = (1..=3u32)
        .map(|id| {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            Some(TestDaemon::start(&dir, &node_config(&dir, &key, id, &addrs, &etcd.url)))
        })
        .collect();
    let bound = Duration::from_secs_f64(LEASE_S + MARGIN_S);
    let mut x = 0u32;
    poll_until("an arbiter elected", Duration::from_secs(30), || {
        let v = views(&nodes);
        x = v[0].1["arbiter"].as_u64().unwrap_or(0) as u32;
        x != 0 && v.iter().all(|(_, view, _)| view["arbiter"].as_u64() == Some(u64::from(x)))
    });
    let h = (1..=3).find(|&n| n != x).unwrap();
    let mut old = nodes[x as usize - 1].take().unwrap();
    let home = || nodes[h as usize - 1].as_ref().unwrap();
    let sent = |d: &TestDaemon| metric(d, "gati_peer_frames_sent_total{kind=\"submit\"} ");

    old.signal(libc::SIGSTOP);
    let before = sent(home());
    let c = submit(home(), "lost-submit", 1);
    poll_until("the submit written to the arbiter's connection", Duration::from_secs(10), || sent(home()) > before);
    old.signal(libc::SIGKILL);
    let killed = Instant::now();
    old.wait_exit(Duration::from_secs(10));
    drop(old);
    let mut last = Value::Null;
    let until = killed + bound;
    while !views(&nodes).iter().all(|(_, v, leases)| {
        last = v.clone();
        v["arbiter"].as_u64().is_some_and(|a| a != u64::from(x)) && leases.iter().any(|(app, _)| *app == c)
    }) {
        assert!(Instant::now() < until, "the app {c} was not granted within {bound:?} of the kill: {last}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let resent = metric(home(), "gati_cluster_submits_resent_total ");
    eprintln!(
        "arbiter {x} killed: app {c} granted by node {} after {:.2} s; its submit written {} times over TCP, resent {resent} times on a welcome",
        last["arbiter"],
        killed.elapsed().as_secs_f64(),
        sent(home()) - before
    );
    assert!(resent >= 1.0, "the home node sent the submit again");
    // One app: never more than its one GPU leased in any view, one entry in every list.
    for _ in 0..20 {
        for (id, v, leases) in views(&nodes) {
            let held: usize = leases.iter().filter(|(app, _)| *app == c).map(|(_, g)| g.len()).sum();
            assert!(held <= 1, "node {id}: app {c} holds {held} GPUs: {v}");
            let listed = v["apps"].as_array().unwrap().iter().filter(|a| a["app"] == c).count();
            assert_eq!(listed, 1, "node {id}: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(home().client().control_json(Kind::Apps, 0, &[]).unwrap()["agents"], 1);
    for d in nodes.iter_mut().flatten() {
        d.signal(libc::SIGTERM);
    }
    for d in nodes.iter_mut().flatten() {
        assert!(d.wait_exit(Duration::from_secs(30)).success());
    }
    drop(etcd);
    let _ = std::fs::remove_dir_all(&root);
}
