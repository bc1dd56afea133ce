//! eBPF steering with real datagrams: the kernel program delivers each UDP
//! request to the socket the maps say (weights, least-loaded, after the routes
//! change, after a socket is replaced; unknown targets, other kinds and
//! malformed datagrams to the default socket, counted), and a daemon with
//! `[server] udp` answers DAG requests read by its SGSs. Each kernel test runs
//! in a private network namespace of its own (the test thread unshares one,
//! brings `lo` up, and the daemon it starts inherits it).
//!
//! The Unix stream verdict is tested in tests/steer_unix.rs.
//!
//! Kernel steering needs root (BPF, namespaces) and a build with clang: those
//! tests show as ignored with the reason in builds without either. The fallback (`mode = "auto"` where
//! BPF cannot load) runs everywhere: as root, the daemon runs with every
//! capability dropped.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::steer::*;
use common::*;
use gatid::api::wire::{Dtype, Kind, RequestHeader, Status};
use gatid::client::udp::{timed_out, UdpClient};
use gatid::sched::route::pick_least_loaded;
use gatid::steer::layout::{Counter, DEFAULT_SLOT};
use gatid::steer::udp::reuseport_socket;
use gatid::steer::Kernel;

/// A reuseport group with the program attached: the default socket and one per SGS slot.
struct Group {
    kernel: Kernel,
    addr: SocketAddr,
    default: UdpSocket,
    sgs: Vec<UdpSocket>,
    client: UdpSocket,
}

impl Group {
    fn new(n: usize) -> Self {
        let mut kernel = Kernel::load().expect("load the steering program");
        let default = reuseport_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = default.local_addr().unwrap();
        kernel.attach(&default).unwrap();
        kernel.set_socket(DEFAULT_SLOT, &default).unwrap();
        let sgs: Vec<UdpSocket> = (0..n).map(|_| reuseport_socket(addr).unwrap()).collect();
        for (k, s) in sgs.iter().enumerate() {
            kernel.set_socket(k as u32, s).unwrap();
        }
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(addr).unwrap();
        Self { kernel, addr, default, sgs, client }
    }

    /// Sends `d` and returns the slot whose socket received it (DEFAULT_SLOT for the default).
    fn deliver(&self, d: &[u8]) -> u32 {
        self.client.send(d).unwrap();
        let socks: Vec<&UdpSocket> = self.sgs.iter().chain([&self.default]).collect();
        let mut fds: Vec<libc::pollfd> =
            socks.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: fds is a valid array of pollfds; bounded wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5000) };
        assert!(n > 0, "no socket received the datagram within 5 s");
        let k = fds.iter().position(|p| p.revents & libc::POLLIN != 0).unwrap();
        let mut buf = [0u8; 4096];
        let got = socks[k].recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], d, "the datagram arrives whole");
        if k == self.sgs.len() {
            DEFAULT_SLOT
        } else {
            k as u32
        }
    }

    fn dag(&self, dag: u32, rid: u64) -> u32 {
        self.deliver(&datagram(Kind::InvokeDag, rid, dag, b"x"))
    }

    fn count(&self, c: Counter) -> u64 {
        self.kernel.counters()[c as usize]
    }
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program in a private network namespace")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn kernel_steers_each_datagram_as_the_maps_say() {
    require_root();
    private_netns();
    let mut g = Group::new(3);
    let board = g.kernel.load_board();
    // Each SGS publishes what it holds (`held`) before every datagram.
    let picks = |g: &Group, dag: u32, rids: std::ops::Range<u64>, held: [u32; 3]| {
        rids.map(|r| {
            for (s, &q) in held.iter().enumerate() {
                board.set(s, q, 0);
            }
            g.dag(dag, r)
        })
        .collect::<Vec<_>>()
    };

    // Weights: request id modulo the total weight walks the routes.
    g.kernel.publish(7, &routes(&[(0, 1), (2, 3)])).unwrap();
    assert_eq!(picks(&g, 7, 0..8, [0; 3]), vec![0, 2, 2, 2, 0, 2, 2, 2]);
    let mut steered = 8;

    // Least loaded first: what the SGSs publish on the mapped board.
    assert_eq!(picks(&g, 7, 0..4, [0, 0, 5]), vec![0; 4], "SGS 2 holds more requests");
    assert_eq!(picks(&g, 7, 0..4, [9, 0, 0]), vec![2; 4], "now SGS 0 does");
    steered += 8;

    // A burst between two publishes: each pick counts on its SGS, so the
    // burst levels the two and then alternates instead of herding onto SGS 0.
    board.set(0, 3, 0);
    board.set(2, 6, 0);
    let burst: Vec<u32> = (0..11).map(|r| g.dag(7, r * 4)).collect();
    assert_eq!(&burst[..3], &[0, 0, 0], "{burst:?}");
    assert_eq!(burst.iter().filter(|&&s| s == 0).count(), 7, "{burst:?}");
    assert_eq!((board.queued(0), board.queued(2)), (10, 10), "each pick counted on its SGS");
    board.set(0, 0, 0);
    board.set(2, 0, 0);
    steered += 11;

    // The LB rescales: the new routes apply to the next datagram.
    g.kernel.publish(7, &routes(&[(1, 1)])).unwrap();
    assert_eq!(picks(&g, 7, 0..3, [0; 3]), vec![1; 3]);
    g.kernel.publish(7, &routes(&[(0, 1), (1, 1)])).unwrap();
    assert_eq!(picks(&g, 7, 0..4, [0; 3]), vec![0, 1, 0, 1]);
    steered += 7;

    // An SGS's socket is replaced: the old one closes, the new one receives.
    let fresh = reuseport_socket(g.addr).unwrap();
    g.kernel.set_socket(1, &fresh).unwrap();
    g.sgs[1] = fresh;
    assert_eq!(picks(&g, 7, 0..4, [0; 3]), vec![0, 1, 0, 1], "slot 1 is the new socket");
    steered += 4;
    assert_eq!(g.count(Counter::Steered), steered);

    // Unknown DAG, a route to an empty slot, an emptied slot: the default socket.
    assert_eq!(g.dag(99, 0), DEFAULT_SLOT);
    g.kernel.publish(8, &routes(&[(5, 1)])).unwrap();
    assert_eq!(g.dag(8, 0), DEFAULT_SLOT, "slot 5 has no socket");
    g.kernel.clear_socket(0).unwrap();
    assert_eq!(g.dag(7, 0), DEFAULT_SLOT, "slot 0 emptied");
    g.kernel.set_socket(0, &g.sgs[0]).unwrap();
    assert_eq!(g.count(Counter::Fallback), 3);
    // Removed routes fall back too.
    g.kernel.publish(8, &[]).unwrap();
    assert_eq!(g.dag(8, 0), DEFAULT_SLOT);
    assert_eq!(g.count(Counter::Fallback), 4);

    // Other kinds and malformed datagrams go to the default socket, counted.
    assert_eq!(g.deliver(&datagram(Kind::Ping, 1, 0, b"")), DEFAULT_SLOT);
    assert_eq!(g.deliver(&datagram(Kind::Infer, 1, 7, b"abc")), DEFAULT_SLOT);
    assert_eq!(g.count(Counter::Other), 2);
    assert_eq!(g.deliver(b"short"), DEFAULT_SLOT);
    let mut bad = datagram(Kind::InvokeDag, 1, 7, b"x");
    bad[0] = b'X';
    assert_eq!(g.deliver(&bad), DEFAULT_SLOT);
    let mut old = datagram(Kind::InvokeDag, 1, 7, b"x");
    old[4] = 9;
    assert_eq!(g.deliver(&old), DEFAULT_SLOT, "unknown version");
    assert_eq!(g.count(Counter::Malformed), 3);
    assert_eq!(g.count(Counter::Dropped), 0);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program in a private network namespace")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn kernel_and_userspace_rule_agree() {
    require_root();
    private_netns();
    let mut g = Group::new(4);
    let board = g.kernel.load_board();
    let r = routes(&[(0, 2), (1, 1), (3, 3), (2, 1)]);
    g.kernel.publish(11, &r).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..40 {
        for s in 0..4 {
            board.set(s, (next() % 3) as u32, 0);
        }
        for _ in 0..5 {
            let rid = next();
            let want = pick_least_loaded(&r, rid, |s| board.queued(s)).unwrap() as u32;
            assert_eq!(g.dag(11, rid), want, "round {round}, request id {rid}");
        }
    }
    assert_eq!(g.count(Counter::Steered), 200);
}

/// 20 DAG requests over UDP, each answered as the Unix socket answers it;
/// Ping, unknown targets, other kinds and framing errors get their answers.
fn serve_over_udp(d: &TestDaemon) -> serde_json::Value {
    let reference = d.client().invoke_dag("digits", &input(), 0).unwrap();
    assert_eq!(reference.status, Status::Ok);
    let addr: SocketAddr = health_steer(d)["udp"].as_str().expect("udp address in Health").parse().unwrap();
    let mut u = UdpClient::connect(addr, Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        let r = u.invoke_dag("digits", &input(), 0).unwrap();
        assert_eq!(r.status, Status::Ok, "request {i}: {}", String::from_utf8_lossy(&r.payload));
        assert_eq!(r.payload, reference.payload, "request {i} answers as over the Unix socket");
    }
    assert_eq!(u.ping().unwrap().status, Status::Ok);
    assert_eq!(u.invoke_dag("no-such-dag", b"x", 0).unwrap().status, Status::UnknownModel);
    let infer = RequestHeader::new(Kind::Infer, 0, 1, Dtype::U8, &[1], 1);
    assert_eq!(u.call(infer, b"x").unwrap().status, Status::UnknownKind);
    let mut short = gatid::client::Client::dag_header("digits", 10, 0);
    short.payload_len.set(10);
    assert_eq!(u.call(short, b"abc").unwrap().status, Status::PayloadMismatch, "one request per datagram");
    // Malformed: no answer (nothing to answer to), but counted.
    u.send_raw(b"not a header").unwrap();
    let mut quick = UdpClient::connect(addr, Duration::from_millis(300)).unwrap();
    quick.send_raw(b"GATI").unwrap();
    let e = quick.recv(0).unwrap_err();
    assert!(timed_out(&e), "{e}");
    health_steer(d)
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program in a private network namespace")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn daemon_serves_udp_dag_requests_steered_in_the_kernel() {
    require_root();
    private_netns();
    let dir = tempdir("steer-kernel");
    let d = TestDaemon::start(&dir, &udp_config(&dir, "mode = \"ebpf\""));
    let s = serve_over_udp(&d);
    assert_eq!(s["mode"], "ebpf", "{s}");
    assert!(s["why"].is_null(), "{s}");
    let k = &s["kernel_counters"];
    assert!(k["steered"].as_u64().unwrap() >= 21, "20 + the PayloadMismatch one: {s}");
    assert!(k["fallback"].as_u64().unwrap() >= 1, "the unknown DAG: {s}");
    assert!(k["other"].as_u64().unwrap() >= 2, "Ping and Infer: {s}");
    assert!(k["malformed"].as_u64().unwrap() >= 2, "{s}");
    let table = s["table"].as_array().unwrap();
    assert_eq!(table.len(), 1, "{s}");
    assert_eq!(table[0]["routes"].as_array().unwrap().len(), 2, "digits on both SGSs: {s}");
    assert_eq!(s["load"].as_array().unwrap().len(), 2, "{s}");

    // A reload onto 1 SGS: the new scheduler gets the sockets, slot 1 is emptied.
    std::fs::write(&d.config, udp_config_sgs(&dir, "mode = \"ebpf\"", 1)).unwrap();
    d.signal(libc::SIGHUP);
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while health_steer(&d)["table"][0]["routes"].as_array().map_or(0, Vec::len) != 1 {
        assert!(std::time::Instant::now() < until, "no reload within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr: SocketAddr = s["udp"].as_str().unwrap().parse().unwrap();
    let mut u = UdpClient::connect(addr, Duration::from_secs(10)).unwrap();
    let before = health_steer(&d)["kernel_counters"]["steered"].as_u64().unwrap();
    for i in 0..10 {
        let r = u.invoke_dag("digits", &input(), 0).unwrap();
        assert_eq!(r.status, Status::Ok, "after the reload, request {i}: {}", String::from_utf8_lossy(&r.payload));
    }
    let after = health_steer(&d)["kernel_counters"]["steered"].as_u64().unwrap();
    assert_eq!(after - before, 10, "steered by the kernel after the reload");
}

#[test]
fn auto_mode_falls_back_to_userspace_and_says_why() {
    // As root, every capability is dropped so that BPF cannot load; otherwise
    // the test's own lack of privilege does it.
    let dir = tempdir("steer-fallback");
    let wrapper: &[&str] = if is_root() { &["setpriv", "--inh-caps=-all", "--bounding-set=-all"] } else { &[] };
    let d = TestDaemon::start_wrapped(&dir, &udp_config(&dir, "mode = \"auto\""), wrapper, |_| {});
    let s = serve_over_udp(&d);
    assert_eq!(s["mode"], "userspace", "{s}");
    let why = s["why"].as_str().unwrap_or_default();
    assert!(!why.is_empty() && !why.contains("configured"), "the reason BPF did not load: {s}");
    let u = &s["udp_counters"];
    assert!(u["steered"].as_u64().unwrap() >= 20, "routed by the I/O thread: {s}");
    assert!(u["malformed"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["kernel_counters"]["steered"], 0, "{s}");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program in a private network namespace")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn udp_dag_requests_are_refused_during_the_drain() {
    require_root();
    private_netns();
    let dir = tempdir("steer-drain");
    let testkit = sdk_program("gati-fn-testkit");
    let parts = [
        format!(
            "[[functions]]\nname = \"slow\"\nkind = \"exec\"\nprogram = \"{}\"\nargs = [\"slow\", \"3000\"]\ntime_limit_ms = 10000\n\
             memory_mb = 64\nexpected_ms = 1.0\nmin_warm = 1\n",
            testkit.display()
        ),
        format!(
            "[[functions]]\nname = \"echo\"\nkind = \"exec\"\nprogram = \"{}\"\nargs = [\"echo\"]\n\
             memory_mb = 64\nexpected_ms = 1.0\nmin_warm = 1\n",
            testkit.display()
        ),
        "[[dags]]\nname = \"hold\"\ndeadline_ms = 10000\nchain = [\"slow\"]\n\n\
         [[dags]]\nname = \"echo\"\ndeadline_ms = 5000\nchain = [\"echo\"]\nmin_sgs = 2\nmax_sgs = 2\n"
            .into(),
        "[steer]\nmode = \"ebpf\"\n".into(),
    ];
    let mut d = TestDaemon::start(&dir, &config(&dir, "udp = \"127.0.0.1:0\"", &parts));
    let addr: SocketAddr = health_steer(&d)["udp"].as_str().unwrap().parse().unwrap();
    let mut u = UdpClient::connect(addr, Duration::from_secs(10)).unwrap();
    assert_eq!(u.invoke_dag("echo", b"hi", 0).unwrap().status, Status::Ok, "served before the drain");
    // A request in flight holds the drain open for 3 s.
    let mut c = d.client();
    let held = c.send(gatid::client::Client::dag_header("hold", 2, 0), b"hi").unwrap();
    // Wait until an SGS holds it (the load the SGSs publish).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !health_steer(&d)["load"].as_array().unwrap().iter().any(|l| l["queued"].as_u64() > Some(0)) {
        assert!(std::time::Instant::now() < until, "the held request never reached an SGS");
        std::thread::sleep(Duration::from_millis(10));
    }
    d.signal(libc::SIGTERM);
    let mut quick = UdpClient::connect(addr, Duration::from_millis(500)).unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        assert!(std::time::Instant::now() < until, "no ShuttingDown answer within 10 s of SIGTERM");
        match quick.invoke_dag("echo", b"hi", 0) {
            Ok(r) if r.status == Status::Ok => std::thread::sleep(Duration::from_millis(10)),
            Ok(r) => break r.status,
            Err(e) => assert!(timed_out(&e), "{e}"),
        }
    };
    assert_eq!(status, Status::ShuttingDown, "a UDP DAG request during the drain is refused");
    let r = c.recv().expect("the request in flight is answered");
    assert_eq!(r.request_id, held);
    assert!(matches!(r.status, Status::Ok | Status::ShuttingDown), "{:?}", r.status);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}
