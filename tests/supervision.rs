//! A supervised data plane: an I/O thread that panics is restarted (its
//! connections closed, every other client served), an SGS that dies makes the
//! process exit 70 for systemd to restart it, and the watchdog is fed only
//! while every data-plane thread makes progress. Faults come from the
//! daemon's test hook (`GATI_TEST_HOOKS=1`, request kind 0xFA17).

mod common;

use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::{Dtype, Kind, RequestHeader, Status};
use gatid::client::Client;

const FAULT: u16 = 0xFA17;

fn fault(c: &mut Client, what: &str) -> Result<gatid::client::Response, gatid::client::ClientError> {
    let mut h = RequestHeader::new(Kind::Ping, 1, 0, Dtype::Bytes, &[], what.len() as u32);
    h.kind.set(FAULT);
    c.call(h, what.as_bytes())
}

fn start(
    dir: &std::path::Path,
    server: &str,
    extra: &str,
    tweak: impl FnOnce(&mut std::process::Command),
) -> TestDaemon {
    let text = config(dir, server, &[cifar_model("cifar10", "")]) + extra;
    TestDaemon::start_with(dir, &text, |cmd| {
        cmd.env("GATI_TEST_HOOKS", "1");
        tweak(cmd);
    })
}

fn io_restarts(c: &mut Client) -> u64 {
    let h = c.control_json(Kind::Health, 0, &[]).unwrap();
    h["threads"].as_array().unwrap().iter().filter(|t| t["role"] == "io").map(|t| t["restarts"].as_u64().unwrap()).sum()
}

#[test]
fn the_hook_is_off_without_its_variable() {
    let dir = tempdir("nohook");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[cifar_model("cifar10", "")]));
    let r = fault(&mut d.client(), "panic-io").unwrap();
    assert_eq!(r.status, Status::UnknownKind);
    assert!(d.client().ping().is_ok());
}

#[test]
fn a_panicking_io_thread_is_restarted_and_every_new_client_is_served() {
    let dir = tempdir("io-panic");
    let mut d = start(&dir, "io_threads = 2", "", |_| {});
    let (pixels, label) = cifar_images()[0].clone();
    let mut c = d.client();
    // The first I/O thread answers before the second has started: wait for READY.
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = c.control_json(Kind::Health, 0, &[]).unwrap();
        if h["ready"] == true {
            break h;
        }
        assert!(Instant::now() < deadline, "never ready: {h}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(h["status"], "ok", "{h}");
    let roles: Vec<_> =
        h["threads"].as_array().unwrap().iter().map(|t| t["role"].as_str().unwrap().to_owned()).collect();
    assert_eq!(roles.iter().filter(|r| *r == "io").count(), 2, "{h}");
    assert!(roles.iter().any(|r| r == "batcher"), "{h}");
    // The connection that carries the fault is closed with its thread's others.
    let mut victim = d.client();
    assert!(fault(&mut victim, "panic-io").is_err(), "the panicking thread's connection is closed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while io_restarts(&mut d.client()) == 0 {
        assert!(Instant::now() < deadline, "no I/O thread restart reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whichever thread accepts them, new connections are served.
    for _ in 0..20 {
        let r = d.client().infer("cifar10", Dtype::U8, &[32, 32, 3], &pixels, 0).unwrap().ok().unwrap();
        assert_eq!(argmax(&r.floats()), label);
    }
    let h = d.client().control_json(Kind::Health, 0, &[]).unwrap();
    assert_eq!(h["status"], "ok", "a restarted thread is alive again: {h}");
    assert!(
        h["threads"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["last_error"].as_str().is_some_and(|e| e.contains("test hook"))),
        "{h}"
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the process keeps serving");
}

#[test]
fn a_dead_sgs_makes_the_node_exit_70_for_a_restart() {
    let dir = tempdir("sgs-panic");
    let dag = "\n[[functions]]\nname = \"classifier\"\nkind = \"model\"\nmodel = \"cifar10\"\nexpected_ms = 5.0\n\n[[dags]]\nname = \"direct\"\ndeadline_ms = 5000\nchain = [\"classifier\"]\n";
    let mut d = start(&dir, "", dag, |_| {});
    let (pixels, _) = cifar_images()[0].clone();
    let mut c = d.client();
    // The DAG answers before the fault (the model function takes f32 rows;
    // this model's input is the raw pixels, NHWC).
    let input: Vec<f32> = pixels.iter().map(|&p| f32::from(p)).collect();
    let r = c.invoke_dag("direct", &f32_bytes(&input), 0).unwrap();
    assert_eq!(r.status, Status::Ok, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(fault(&mut c, "panic-sgs").unwrap().status, Status::Ok);
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(70), "exit status {status:?}");
}

#[test]
fn the_watchdog_is_not_fed_while_an_io_thread_is_stuck() {
    let dir = tempdir("stall");
    let notify = NotifySocket::bind(&dir);
    // WATCHDOG_USEC = 1 s: pings every 0.5 s; a thread silent for 2 s is stalled.
    let d = start(&dir, "io_threads = 1", "", |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify.path).env("WATCHDOG_USEC", "1000000");
    });
    notify.expect("READY=1", Duration::from_secs(30));
    notify.expect("WATCHDOG=1", Duration::from_secs(5));
    let mut c = d.client();
    let sent = Instant::now();
    let stuck = std::thread::spawn(move || fault(&mut c, "stall-io 6000").map(|r| r.status));
    // The only I/O thread sleeps 6 s: after 2 s without progress the control
    // loop says so and stops feeding the watchdog. Everything notified before
    // the sleep can have ended (5.5 s after the request) must be unfed.
    let why = notify.expect("STATUS=stalled", Duration::from_secs(5));
    assert!(why.contains("io-0"), "{why}");
    for msg in notify.until(sent + Duration::from_millis(5500)) {
        assert!(!msg.lines().any(|l| l == "WATCHDOG=1"), "watchdog fed while stalled: {msg}");
    }
    assert_eq!(stuck.join().unwrap().unwrap(), Status::Ok);
    // Progress again: the watchdog is fed again.
    notify.expect("WATCHDOG=1", Duration::from_secs(10));
    assert!(d.client().ping().is_ok());
}
