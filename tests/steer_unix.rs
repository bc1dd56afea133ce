//! eBPF steering of Unix stream clients: the verdict program redirects an skb
//! that is exactly one whole `InvokeDag` frame to the SGS the maps say (weights,
//! least-loaded, after the routes change, an emptied slot); partial frames,
//! several frames in one write and other kinds pass to the I/O thread; and a
//! daemon with `[steer] unix = "kernel"` answers every request on its
//! connection, pipelined or split. Needs root and a build with clang: the tests
//! show as ignored with the reason in builds without either.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::steer::*;
use common::*;
use gatid::api::wire::{Dtype, Kind, RequestHeader, Status};
use gatid::steer::layout::{Counter, OFF_STAMP};
use gatid::steer::unix::socket_cookie;
use gatid::steer::Kernel;
use zerocopy::IntoBytes;

/// A client connection the Unix verdict watches and `n` SGS sockets it redirects to.
struct UnixGroup {
    kernel: Kernel,
    client: UnixStream,
    /// The daemon's end of the client's connection.
    conn: UnixStream,
    cookie: u64,
    /// The ends the kernel redirects into (their peers are kept open).
    sgs: Vec<(UnixStream, UnixStream)>,
}

impl UnixGroup {
    fn new(n: usize) -> Self {
        let mut kernel = Kernel::load().expect("load the steering programs");
        kernel.unix_ready().expect("the Unix stream verdict loads");
        let (client, conn) = UnixStream::pair().unwrap();
        let cookie = socket_cookie(conn.as_raw_fd()).unwrap();
        kernel.unix_adopt(cookie, &conn).unwrap();
        let sgs: Vec<(UnixStream, UnixStream)> = (0..n).map(|_| UnixStream::pair().unwrap()).collect();
        for (k, (rx, _)) in sgs.iter().enumerate() {
            kernel.unix_set_sgs(k as u32, rx).unwrap();
        }
        Self { kernel, client, conn, cookie, sgs }
    }

    /// Writes `parts` (one write each); returns what each socket received
    /// within a short wait: (SGS index or None for the connection, bytes).
    fn deliver(&mut self, parts: &[&[u8]]) -> Vec<(Option<usize>, Vec<u8>)> {
        for p in parts {
            self.client.write_all(p).unwrap();
        }
        let want: usize = parts.iter().map(|p| p.len()).sum();
        let mut got = Vec::new();
        let mut total = 0;
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while total < want {
            assert!(std::time::Instant::now() < until, "only {total} of {want} bytes arrived within 5 s");
            let socks: Vec<&UnixStream> = self.sgs.iter().map(|(rx, _)| rx).chain([&self.conn]).collect();
            let mut fds: Vec<libc::pollfd> =
                socks.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
            // SAFETY: fds is a valid array of pollfds; bounded wait.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if r <= 0 {
                continue;
            }
            for (k, p) in fds.iter().enumerate() {
                if p.revents & libc::POLLIN == 0 {
                    continue;
                }
                let mut buf = vec![0u8; 65536];
                // SAFETY: recv into a live buffer of its length, non-blocking.
                let n = unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n > 0 {
                    buf.truncate(n as usize);
                    total += buf.len();
                    got.push(((k < self.sgs.len()).then_some(k), buf));
                }
            }
        }
        got
    }

    /// One whole InvokeDag frame: the SGS it was redirected to (None: passed).
    fn dag(&mut self, dag: u32, rid: u64) -> Option<usize> {
        let f = datagram(Kind::InvokeDag, rid, dag, b"xyz");
        let got = self.deliver(&[&f]);
        assert_eq!(got.len(), 1, "one frame arrives in one piece: {got:?}");
        let (at, bytes) = &got[0];
        let mut want = f.clone();
        if at.is_some() {
            want[OFF_STAMP..OFF_STAMP + 8].copy_from_slice(&self.cookie.to_le_bytes());
        }
        assert_eq!(
            bytes,
            &want,
            "the frame arrives whole (stamped with the cookie when steered); at {at:?}, cookie {}, counters {:?}",
            self.cookie,
            self.kernel.unix_counters()
        );
        *at
    }

    fn count(&self, c: Counter) -> u64 {
        self.kernel.unix_counters()[c as usize]
    }
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn unix_verdict_steers_whole_frames_as_the_maps_say() {
    require_root();
    let mut g = UnixGroup::new(3);
    let board = g.kernel.load_board();
    g.kernel.publish(7, &routes(&[(0, 1), (2, 3)])).unwrap();
    // Each SGS publishes what it holds (nothing) before every write.
    let picks: Vec<_> = (0..8)
        .map(|r| {
            (0..3).for_each(|s| board.set(s, 0, 0));
            g.dag(7, r)
        })
        .collect();
    assert_eq!(picks, [0, 2, 2, 2, 0, 2, 2, 2].map(Some));
    board.set(0, 0, 0);
    board.set(2, 5, 0);
    assert_eq!(g.dag(7, 1), Some(0), "SGS 2 holds more requests");
    assert_eq!(board.queued(0), 1, "the pick counted on its SGS");
    board.set(2, 0, 0);
    g.kernel.publish(7, &routes(&[(1, 1)])).unwrap();
    assert_eq!(g.dag(7, 0), Some(1), "after the LB rescaled");
    assert_eq!(g.count(Counter::Steered), 10);

    // Unknown DAG, an emptied SGS slot: passed to the connection.
    assert_eq!(g.dag(99, 0), None);
    g.kernel.unix_clear_sgs(1);
    assert_eq!(g.dag(7, 0), None, "slot 1 emptied");
    assert_eq!(g.count(Counter::Fallback), 2);
    g.kernel.unix_set_sgs(1, &g.sgs[1].0).unwrap();
    // Another kind: passed.
    let ping = datagram(Kind::Ping, 1, 0, b"");
    assert_eq!(g.deliver(&[&ping]), vec![(None, ping.clone())]);
    assert_eq!(g.count(Counter::Other), 1);

    // A frame in two writes (split after the length field), two frames in one
    // write: passed, in order; the next whole frame is steered again.
    let f = datagram(Kind::InvokeDag, 3, 7, b"abcdef");
    let got = g.deliver(&[&f[..40], &f[40..]]);
    assert!(got.iter().all(|(at, _)| at.is_none()), "{got:?}");
    assert_eq!(got.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<_>>(), f);
    let two = [f.clone(), f.clone()].concat();
    let got = g.deliver(&[&two]);
    assert_eq!(got, vec![(None, two.clone())]);
    assert_eq!(g.dag(7, 4), Some(1), "at a frame boundary again");
    // A header split before its length: the connection is passed from then on.
    let got = g.deliver(&[&f[..10], &f[10..]]);
    assert!(got.iter().all(|(at, _)| at.is_none()), "{got:?}");
    assert_eq!(g.dag(7, 5), None, "frame boundaries unknown: everything passes");
    assert_eq!(g.count(Counter::Steered), 11);
    assert!(g.count(Counter::Malformed) >= 5, "{:?}", g.kernel.unix_counters());
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program in a private network namespace")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn daemon_serves_unix_dag_requests_steered_in_the_kernel() {
    require_root();
    private_netns();
    let dir = tempdir("steer-unix");
    let d = TestDaemon::start(&dir, &udp_config(&dir, "mode = \"ebpf\"\nunix = \"kernel\""));
    let s = health_steer(&d);
    assert_eq!(s["unix"]["mode"], "kernel", "{s}");
    let mut c = d.client();
    let reference = c.invoke_dag("digits", &input(), 0).unwrap();
    assert_eq!(reference.status, Status::Ok);
    for i in 0..20 {
        let r = c.invoke_dag("digits", &input(), 0).unwrap();
        assert_eq!(r.status, Status::Ok, "request {i}: {}", String::from_utf8_lossy(&r.payload));
        assert_eq!(r.payload, reference.payload, "request {i}");
    }
    // Pipelined on one connection: every answer comes, by request id.
    let ids: std::collections::BTreeSet<u64> =
        (0..8).map(|_| c.send(gatid::client::Client::dag_header("digits", 784 * 4, 0), &input()).unwrap()).collect();
    let mut got = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let r = c.recv().unwrap();
        assert_eq!(r.status, Status::Ok);
        got.insert(r.request_id);
    }
    assert_eq!(got, ids, "one answer per request id");
    // A fresh connection that pipelines at once (before the daemon has even
    // accepted it, likely): handed to the kernel only once all it sent is read.
    for round in 0..5 {
        let mut p = d.client();
        let ids: std::collections::BTreeSet<u64> = (0..16)
            .map(|_| p.send(gatid::client::Client::dag_header("digits", 784 * 4, 0), &input()).unwrap())
            .collect();
        let mut got = std::collections::BTreeSet::new();
        for _ in 0..16 {
            let r = p.recv().unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(r.status, Status::Ok, "round {round}");
            got.insert(r.request_id);
        }
        assert_eq!(got, ids, "round {round}: one answer per request id");
        assert_eq!(p.invoke_dag("digits", &input(), 0).unwrap().status, Status::Ok, "round {round}: then one more");
    }
    let s = health_steer(&d);
    let u = &s["unix"];
    // The connection's first frame may be written before the daemon adds it to
    // the sockhash: the I/O thread reads it (no verdict runs on it).
    assert!(u["kernel_counters"]["steered"].as_u64().unwrap() >= 28, "{s}");
    assert!(u["sgs_counters"]["steered"].as_u64().unwrap() >= 28, "{s}");
    assert_eq!(u["sgs_counters"]["dropped"], 0, "{s}");

    // A frame in two writes, an unknown DAG and a Ping: the I/O thread answers them.
    let mut raw = UnixStream::connect(&d.socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut resp = [0u8; 64];
    // Pings until the verdict sees one: the connection is then the kernel's
    // (it is handed over once all it sent has been read).
    let others = || health_steer(&d)["unix"]["kernel_counters"]["other"].as_u64().unwrap();
    let before = others();
    for k in 0.. {
        assert!(k < 200, "the connection was never handed to the kernel");
        raw.write_all(RequestHeader::new(Kind::Ping, 1, 0, Dtype::Bytes, &[], 0).as_bytes()).unwrap();
        std::io::Read::read_exact(&mut raw, &mut resp).unwrap();
        if others() > before {
            break;
        }
    }
    let body = input();
    let mut h = gatid::client::Client::dag_header("digits", body.len(), 0);
    h.request_id.set(77);
    raw.write_all(h.as_bytes()).unwrap();
    raw.write_all(&body).unwrap();
    std::io::Read::read_exact(&mut raw, &mut resp).unwrap();
    let head = gatid::api::wire::ResponseHeader::parse(&resp).unwrap();
    assert_eq!((head.request_id.get(), head.status.get()), (77, Status::Ok as u16));
    let mut out = vec![0u8; head.payload_len.get() as usize];
    std::io::Read::read_exact(&mut raw, &mut out).unwrap();
    assert_eq!(out, reference.payload, "the split frame is answered as a whole one");
    assert_eq!(c.invoke_dag("no-such-dag", b"x", 0).unwrap().status, Status::UnknownModel);
    assert_eq!(c.ping().unwrap().status, Status::Ok);
    let s = health_steer(&d);
    let k = &s["unix"]["kernel_counters"];
    assert!(k["malformed"].as_u64().unwrap() >= 2, "the two halves: {s}");
    assert!(k["fallback"].as_u64().unwrap() >= 1, "the unknown DAG: {s}");
    assert!(k["other"].as_u64().unwrap() >= 1, "the Ping: {s}");
    drop(raw);
    drop(c);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: loads a BPF program")]
#[cfg_attr(all(gati_no_bpf, not(gati_unprivileged)), ignore = "built without clang: no BPF program to load")]
fn a_frame_written_during_the_hand_off_keeps_the_connection_steerable() {
    require_root();
    let mut kernel = Kernel::load().expect("load the steering programs");
    kernel.unix_ready().expect("the Unix stream verdict loads");
    let (rx, _tx) = UnixStream::pair().unwrap();
    kernel.unix_set_sgs(0, &rx).unwrap();
    kernel.publish(7, &routes(&[(0, 1)])).unwrap();
    let frame = |rid: u64| datagram(Kind::InvokeDag, rid, 7, b"abc");
    let read_all = |s: &UnixStream| {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: recv into a live buffer of its length, non-blocking.
            let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    };
    let rids = |bytes: &[u8]| -> Vec<u64> {
        bytes
            .chunks(frame(0).len())
            .map(|f| RequestHeader::parse(f[..64].try_into().unwrap()).unwrap().request_id.get())
            .collect()
    };

    // A whole frame queued before the insert (the client wrote as it connected).
    let (mut client, conn) = UnixStream::pair().unwrap();
    client.write_all(&frame(1)).unwrap();
    assert!(gatid::steer::unix::queued_whole_frames(conn.as_raw_fd()));
    let cookie = socket_cookie(conn.as_raw_fd()).unwrap();
    kernel.unix_adopt(cookie, &conn).unwrap();
    for rid in 2..=4 {
        client.write_all(&frame(rid)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        if rid == 2 {
            // The I/O thread reads what reached the connection, as the daemon does.
            let mut seen = rids(&read_all(&conn));
            seen.extend(rids(&read_all(&rx)).iter().map(|r| r + 100));
            assert_eq!(seen.len(), 2, "each frame arrives once: {seen:?}");
        }
    }
    let steered = rids(&read_all(&rx));
    assert!(steered.contains(&4), "steered after the hand-off race: {steered:?}, {:?}", kernel.unix_counters());
    assert_eq!(kernel.unix_counters()[Counter::Malformed as usize], 0);

    // Half a frame queued: its boundaries are unknown to the verdict.
    let (mut client, conn) = UnixStream::pair().unwrap();
    client.write_all(&frame(5)[..40]).unwrap();
    assert!(!gatid::steer::unix::queued_whole_frames(conn.as_raw_fd()));
}
