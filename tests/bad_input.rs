//! Hostile and broken clients: each gets a distinct status or a closed
//! connection, and none of them disturbs a well-behaved client.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use gatid::api::wire::{Dtype, Kind, RequestHeader, Status, HEADER_LEN};
use gatid::client::Client;
use zerocopy::IntoBytes;

/// A well-behaved client that checks its answer is still right.
fn good_request(c: &mut Client, pixels: &[u8], label: usize) {
    let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], pixels, 0).unwrap().ok().unwrap();
    assert_eq!(argmax(&r.floats()), label);
}

fn expect_closed(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // a final error frame may precede the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

#[test]
fn malformed_requests_get_distinct_errors_and_never_affect_others() {
    let dir = tempdir("bad");
    let d = TestDaemon::start(&dir, &config(&dir, "max_frame_bytes = 1048576", &[cifar_model("cifar10", "")]));
    let (pixels, label) = cifar_images()[0].clone();
    let mut good = d.client();
    good_request(&mut good, &pixels, label);

    let mut c = d.client();
    let cases: Vec<(&str, RequestHeader, Vec<u8>, Status)> = vec![
        (
            "unknown model",
            Client::infer_header("nope", Dtype::U8, &[32, 32, 3], 0),
            pixels.clone(),
            Status::UnknownModel,
        ),
        (
            "unknown kind",
            {
                let mut h = RequestHeader::new(Kind::Ping, 0, 0, Dtype::Bytes, &[], 0);
                h.kind.set(99);
                h
            },
            vec![],
            Status::UnknownKind,
        ),
        (
            "unknown dtype",
            {
                let mut h = Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 0);
                h.dtype = 9;
                h
            },
            pixels.clone(),
            Status::BadDtype,
        ),
        ("bytes dtype", Client::infer_header("cifar10", Dtype::Bytes, &[3072], 0), pixels.clone(), Status::BadDtype),
        (
            "wrong f32 shape",
            Client::infer_header("cifar10", Dtype::F32, &[1, 3, 32, 32, 1], 0),
            vec![0; 3072 * 4],
            Status::BadShape,
        ),
        (
            "too many dims",
            {
                let mut h = Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 0);
                h.ndim = 7;
                h
            },
            pixels.clone(),
            Status::BadShape,
        ),
        ("zero dim", Client::infer_header("cifar10", Dtype::U8, &[0, 32, 3], 0), vec![], Status::BadShape),
        (
            "image channels",
            Client::infer_header("cifar10", Dtype::U8, &[32, 32, 2], 0),
            vec![0; 2048],
            Status::BadShape,
        ),
        (
            "payload shorter than shape",
            Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 0),
            pixels[..3000].to_vec(),
            Status::PayloadMismatch,
        ),
        (
            "f32 length",
            Client::infer_header("cifar10", Dtype::F32, &[1, 32, 32, 3], 0),
            vec![0; 3072 * 4 - 4],
            Status::PayloadMismatch,
        ),
        (
            "NaN input",
            Client::infer_header("cifar10", Dtype::F32, &[1, 32, 32, 3], 0),
            f32_bytes(&vec![f32::NAN; 3072]),
            Status::BadPayload,
        ),
    ];
    for (what, header, payload, want) in cases {
        let r = c.call(header, &payload).unwrap();
        assert_eq!(r.status, want, "{what}");
        good_request(&mut good, &pixels, label);
    }
    // The same connection still works after all those errors.
    good_request(&mut c, &pixels, label);

    // Oversized frame: TooLarge, then the connection is closed (its payload is never read).
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let h = RequestHeader::new(Kind::Infer, 1, 1, Dtype::U8, &[1], 2 << 20);
    s.write_all(h.as_bytes()).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).unwrap();
    let resp = gatid::api::wire::ResponseHeader::parse(&hb).unwrap();
    assert_eq!(Status::from_u16(resp.status.get()), Some(Status::TooLarge));
    expect_closed(&mut s);
    good_request(&mut good, &pixels, label);

    // Bad magic: unparseable framing closes the connection.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(&[0xAB; HEADER_LEN]).unwrap();
    expect_closed(&mut s);
    // Wrong version.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    let mut h = RequestHeader::new(Kind::Ping, 1, 0, Dtype::Bytes, &[], 0);
    h.version.set(77);
    s.write_all(h.as_bytes()).unwrap();
    expect_closed(&mut s);
    good_request(&mut good, &pixels, label);

    // Truncated frames: half a header, and a header with half its payload, then hang up.
    for cut in [HEADER_LEN / 2, HEADER_LEN + 1000] {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        let h = Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 0);
        let mut frame = h.as_bytes().to_vec();
        frame[24..28].copy_from_slice(&3072u32.to_le_bytes());
        frame.extend_from_slice(&pixels);
        s.write_all(&frame[..cut]).unwrap();
        drop(s);
        good_request(&mut good, &pixels, label);
    }

    // Garbage from many clients at once, while the good client keeps working.
    let garbage: Vec<_> = (0..16)
        .map(|i| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                let junk: Vec<u8> = (0..4096u32).map(|k| (k.wrapping_mul(2654435761).wrapping_add(i)) as u8).collect();
                let _ = s.write_all(&junk);
            })
        })
        .collect();
    for _ in 0..5 {
        good_request(&mut good, &pixels, label);
    }
    for g in garbage {
        g.join().unwrap();
    }
    let health = d.client().control_json(Kind::Health, 0, &[]).unwrap();
    assert_eq!(health["status"], "ok");
}

#[test]
fn inflight_and_connection_limits() {
    let dir = tempdir("limits");
    let d = TestDaemon::start(
        &dir,
        &config(&dir, "max_inflight_per_conn = 2\nmax_connections = 4", &[cifar_model("cifar10", "")]),
    );
    let (pixels, label) = cifar_images()[0].clone();
    let mut c = d.client();
    for _ in 0..20 {
        c.send(Client::infer_header("cifar10", Dtype::U8, &[32, 32, 3], 0), &pixels).unwrap();
    }
    let statuses: Vec<Status> = (0..20).map(|_| c.recv().unwrap().status).collect();
    assert!(statuses.iter().filter(|s| **s == Status::Ok).count() >= 2);
    assert!(statuses.contains(&Status::Busy), "{statuses:?}");
    assert!(statuses.iter().all(|s| matches!(s, Status::Ok | Status::Busy)));
    good_request(&mut c, &pixels, label);

    // Connection limit: 4 open (c + 3 more); the 5th is refused with a status and closed.
    let others: Vec<Client> = (0..3).map(|_| d.client()).collect();
    let mut extra = UnixStream::connect(&d.socket).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    extra.read_exact(&mut hb).unwrap();
    let resp = gatid::api::wire::ResponseHeader::parse(&hb).unwrap();
    assert_eq!(Status::from_u16(resp.status.get()), Some(Status::TooManyConnections));
    drop(others);
    good_request(&mut c, &pixels, label);
}

#[test]
fn socket_mode_is_0660_by_default() {
    let dir = tempdir("peercred");
    // Mode 0660 by default.
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    drop(d);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: connects as another uid (CI runs as root)")]
fn peer_allowlist_refuses_other_uids() {
    require_root();
    let dir = tempdir("peercred2");
    // World-writable socket so only SO_PEERCRED decides; uid 65534 (nobody) not allowed.
    let d = TestDaemon::start(
        &dir,
        &config(&dir, "socket_mode = \"0666\"\nallow_uids = [4242]", &[cifar_model("cifar10", "")]),
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = d.socket.clone();
    // gatictl run as another uid reports what the daemon answered.
    let as_uid = |uid: u32| -> (bool, String) {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatictl"))
            .args(["--socket"])
            .arg(&socket)
            .arg("health")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = as_uid(65534);
    assert!(!ok && err.contains("Unauthorized"), "nobody is not in allow_uids: {err}");
    let (ok, err) = as_uid(4242);
    assert!(ok, "4242 is in allow_uids: {err}");
    assert!(d.client().ping().is_ok(), "root is always allowed");
}

#[test]
fn a_client_that_never_reads_is_throttled_not_buffered() {
    let dir = tempdir("noread");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let (pixels, label) = cifar_images()[0].clone();
    let rss = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = rss(d.child.id());
    // ListModels answers are ~1 KB each and cheap to make: 40 000 unread would be ~40 MB.
    let socket = d.socket.clone();
    let writer = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        let h = RequestHeader::new(Kind::ListModels, 1, 0, Dtype::Bytes, &[], 0);
        let mut written = 0;
        for _ in 0..40_000 {
            if s.write_all(h.as_bytes()).is_err() {
                break; // the daemon stopped reading: our socket buffer is full
            }
            written += 1;
        }
        (s, written)
    });
    let (mut s, written) = writer.join().unwrap();
    assert!(written < 40_000, "the daemon kept reading a client that never reads");
    let grown_kb = rss(d.child.id()).saturating_sub(before);
    assert!(grown_kb < 16 * 1024, "daemon grew by {grown_kb} KiB buffering unread answers");
    // Others are served meanwhile.
    good_request(&mut d.client(), &pixels, label);
    // Reading drains it: every request sent is answered, in order.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for _ in 0..written {
        let mut hb = [0u8; HEADER_LEN];
        s.read_exact(&mut hb).unwrap();
        let h = gatid::api::wire::ResponseHeader::parse(&hb).unwrap();
        let mut body = vec![0u8; h.payload_len.get() as usize];
        s.read_exact(&mut body).unwrap();
        assert_eq!(Status::from_u16(h.status.get()), Some(Status::Ok));
    }
}

/// The daemon's resident set, MiB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kb / 1024.0
}

#[test]
fn a_frame_whose_shape_expands_past_memory_is_refused_and_the_node_keeps_serving() {
    let dir = tempdir("expand");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let (pixels, label) = cifar_images()[0].clone();
    let mut good = d.client();
    good_request(&mut good, &pixels, label);
    let before = rss_mb(d.child.id());
    let mut c = d.client();
    // 4 Mi one-pixel images: 4 MiB on the wire, 48 GiB of f32 once resized to 32x32x3.
    for n in [4u32 << 20, 33, 1 << 16] {
        let r = c.infer("cifar10", Dtype::U8, &[n, 1, 1, 1], &vec![9u8; n as usize], 0).unwrap();
        assert_eq!(r.status, Status::TooManyRows, "{n} images");
        let r = c.infer("cifar10", Dtype::U8, &[n, 1, 1, 3], &vec![9u8; 3 * n as usize], 0).unwrap();
        assert_eq!(r.status, Status::TooManyRows, "{n} RGB images");
    }
    // At max_batch (32) the same expansion is served.
    let r = c.infer("cifar10", Dtype::U8, &[32, 1, 1, 3], &[9u8; 96], 0).unwrap().ok().unwrap();
    assert_eq!(r.floats().len(), 32 * 10);
    // A new connection is still accepted and served, and memory did not grow by
    // anything like the expansion.
    good_request(&mut d.client(), &pixels, label);
    good_request(&mut good, &pixels, label);
    let after = rss_mb(d.child.id());
    assert!(after < before + 64.0, "RSS {before:.0} -> {after:.0} MiB");
}

#[test]
fn over_the_node_byte_budget_requests_get_busy_at_once_and_service_resumes() {
    let dir = tempdir("budget");
    let server = "max_frame_bytes = 1048576\nmax_queued_bytes = 1048576";
    let d = TestDaemon::start(&dir, &config(&dir, server, &[cifar_model("cifar10", "")]));
    let (pixels, label) = cifar_images()[0].clone();
    let mut good = d.client();
    good_request(&mut good, &pixels, label);
    // Headers that declare big frames and stall hold nothing: only bytes sent count.
    let stalled: Vec<UnixStream> = (0..16)
        .map(|i| {
            let mut s = UnixStream::connect(&d.socket).unwrap();
            let n = (1 << 20) - 64;
            let h = RequestHeader::new(Kind::Infer, i, gatid::api::wire::model_id("cifar10"), Dtype::U8, &[n], n);
            s.write_all(h.as_bytes()).unwrap();
            s.write_all(&[0]).unwrap();
            s
        })
        .collect();
    for _ in 0..20 {
        good_request(&mut good, &pixels, label);
    }
    // An answered request gives its share back just after its answer is written:
    // wait until only the stalled bytes are held, so the hog below races nobody.
    let queued = |c: &mut Client| c.control_json(Kind::Health, 0, &[]).unwrap()["queued_bytes"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued(&mut good) != 16 {
        assert!(std::time::Instant::now() < deadline, "stalled headers hold {} bytes, not 16", queued(&mut good));
        std::thread::sleep(Duration::from_millis(5));
    }
    // A client that really sends almost a whole 1 MiB frame spends the budget
    // (1 KiB is left: less than a request of the good client).
    let mut hog = UnixStream::connect(&d.socket).unwrap();
    let n = (1 << 20) - 1024;
    let h =
        RequestHeader::new(Kind::Infer, 77, gatid::api::wire::model_id("cifar10"), Dtype::U8, &[n as u32], n as u32);
    hog.write_all(h.as_bytes()).unwrap();
    hog.write_all(&vec![0u8; n - 16]).unwrap();
    // Poll (with control requests, which carry no payload) until the hog's bytes
    // have been read: the budget is then spent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued(&mut good) < (n - 16) as u64 {
        assert!(std::time::Instant::now() < deadline, "the hog's bytes were never all read");
        std::thread::sleep(Duration::from_millis(5));
    }
    let refused = good.infer("cifar10", Dtype::U8, &[32, 32, 3], &pixels, 0).unwrap();
    assert_eq!(refused.status, Status::Busy);
    assert!(String::from_utf8_lossy(&refused.payload).contains("queued_bytes"), "the refusal names its reason");
    assert!(good.ping().is_ok(), "the refused client's connection still works");
    // The hog finishes its frame: it is answered (a 1-D shape is not an image),
    // its charge is given back, and service resumes.
    hog.write_all(&[0u8; 16]).unwrap();
    let mut buf = [0u8; HEADER_LEN];
    hog.read_exact(&mut buf).unwrap();
    let resp = gatid::api::wire::ResponseHeader::parse(&buf).unwrap();
    assert_eq!(Status::from_u16(resp.status.get()), Some(Status::BadShape));
    good_request(&mut good, &pixels, label);
    let stats = good.stats_text().unwrap();
    assert!(stats.contains("reason=\"queued_bytes\""), "refusals are counted by reason");
    drop(stalled);
}

#[test]
fn a_full_model_queue_answers_busy_whatever_the_deadline() {
    let dir = tempdir("queue");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "max_batch = 8\nmax_queue_rows = 8")]));
    let (pixels, label) = cifar_images()[0].clone();
    // 64 pipelined 8-row requests without deadlines (no admission check): the
    // queue holds one batch, so most are refused Busy at once; none is lost.
    let mut c = d.client();
    let batch: Vec<u8> = pixels.iter().copied().cycle().take(8 * pixels.len()).collect();
    for _ in 0..64 {
        c.send(Client::infer_header("cifar10", Dtype::U8, &[8, 32, 32, 3], 0), &batch).unwrap();
    }
    let mut busy = 0;
    for _ in 0..64 {
        let r = c.recv().unwrap();
        match r.status {
            Status::Ok => assert!(r.floats().chunks(10).all(|row| argmax(row) == label)),
            Status::Busy => {
                assert!(String::from_utf8_lossy(&r.payload).starts_with("model_queue"));
                busy += 1;
            }
            s => panic!("unexpected {s:?}"),
        }
    }
    assert!(busy > 0, "the queue was never full");
    good_request(&mut c, &pixels, label);
}
