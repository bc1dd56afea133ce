//! The daemon as systemd runs it: readiness and stopping notifications,
//! watchdog, socket activation, SIGHUP reload under load, SIGTERM drain,
//! config errors (exit 78), and the unit files themselves (verify, and the
//! `systemd-analyze security` exposure budget).

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::{Dtype, Kind, Status};
use gatid::client::Client;

#[test]
fn notify_ready_after_models_then_watchdog_then_stopping() {
    let dir = tempdir("notify");
    let notify = NotifySocket::bind(&dir);
    let mut d = TestDaemon::start_with(
        &dir,
        &config(&dir, "", &[cifar_model("cifar10", ""), fmnist_model("fmnist", "")]),
        |cmd| {
            cmd.env("NOTIFY_SOCKET", &notify.path).env("WATCHDOG_USEC", "200000");
        },
    );
    let ready = notify.expect("READY=1", Duration::from_secs(30));
    assert!(ready.contains("STATUS=serving 2 model(s)"), "{ready}");
    // READY means the models answer.
    let models = d.client().control_json(Kind::ListModels, 0, &[]).unwrap();
    assert_eq!(models["models"].as_array().unwrap().len(), 2);
    notify.expect("WATCHDOG=1", Duration::from_secs(2));
    d.signal(libc::SIGTERM);
    notify.expect("STOPPING=1", Duration::from_secs(5));
    assert!(d.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn socket_activation_uses_the_passed_socket() {
    let tool = which("systemd-socket-activate")
        .expect("systemd-socket-activate not installed (scripts/setup.sh installs systemd)");
    let dir = tempdir("activate");
    let activated = dir.join("activated.sock");
    // The config names another path: with a socket from systemd it must not be bound.
    let cfg = config(&dir, "", &[cifar_model("cifar10", "")]);
    let cfg_path = dir.join("gatid.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let mut child = Command::new(tool)
        .arg("-l")
        .arg(&activated)
        .arg(env!("CARGO_BIN_EXE_gatid"))
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .env("GATI_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    // systemd-socket-activate starts gatid on the first connection.
    let mut c = loop {
        if let Ok(mut c) = Client::connect(&activated) {
            if c.ping().is_ok() {
                break c;
            }
        }
        assert!(Instant::now() < until, "activated gatid did not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (pixels, label) = cifar_images()[3].clone();
    let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], &pixels, 0).unwrap().ok().unwrap();
    assert_eq!(argmax(&r.floats()), label);
    assert!(!dir.join("gatid.sock").exists(), "gatid bound its own socket despite activation");
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
        .ok_or(())
}

#[test]
fn sighup_reload_adds_replaces_removes_models_without_failing_requests() {
    let dir = tempdir("reload");
    let cifar = cifar_model("cifar10", "");
    let d = TestDaemon::start(&dir, &config(&dir, "", std::slice::from_ref(&cifar)));
    let (pixels, label) = cifar_images()[1].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (socket, stop, done, pixels) = (d.socket.clone(), Arc::clone(&stop), Arc::clone(&done), pixels.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = c.infer("cifar10", Dtype::U8, &[32, 32, 3], &pixels, 0).unwrap();
                    if r.status != Status::Ok || argmax(&r.floats()) != label {
                        failures.push(r.status);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    let wait_models = |want: &[&str]| {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let v = d.client().control_json(Kind::ListModels, 0, &[]).unwrap();
            let names: Vec<String> =
                v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
            if names == want {
                return v;
            }
            assert!(Instant::now() < until, "models {names:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Add fmnist and replace cifar10 (new max_batch) while under load.
    std::fs::write(&d.config, config(&dir, "", &[cifar_model("cifar10", "max_batch = 4"), fmnist_model("fmnist", "")]))
        .unwrap();
    d.signal(libc::SIGHUP);
    let v = wait_models(&["cifar10", "fmnist"]);
    assert_eq!(v["models"][0]["max_batch"], 4, "cifar10 was replaced");
    let (fpx, flabel) = fmnist_test(1).remove(0);
    let r = d.client().infer("fmnist", Dtype::U8, &[28, 28, 1], &fpx, 0).unwrap().ok().unwrap();
    assert_eq!(argmax(&r.floats()), flabel);
    // An invalid config is refused; the daemon keeps serving the previous one.
    std::fs::write(&d.config, "[server]\nbogus = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    wait_models(&["cifar10", "fmnist"]);
    // Remove fmnist.
    std::fs::write(&d.config, config(&dir, "", &[cifar])).unwrap();
    d.signal(libc::SIGHUP);
    wait_models(&["cifar10"]);
    let r = d.client().infer("fmnist", Dtype::U8, &[28, 28, 1], &fpx, 0).unwrap();
    assert_eq!(r.status, Status::UnknownModel);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<Status> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(done.load(Ordering::Relaxed) > 20, "load kept running during reloads");
    assert!(failures.is_empty(), "requests failed during reload: {failures:?}");
}

#[test]
fn sighup_during_start_up_or_the_moment_the_node_answers_is_a_reload_never_an_exit() {
    let dir = tempdir("early-hup");
    let text = config(&dir, "", &[fmnist_model("fmnist", "")]);
    // While the models load: held until the node runs, then a reload.
    let mut d = TestDaemon::spawn(&dir, &text);
    std::thread::sleep(Duration::from_millis(30));
    d.signal(libc::SIGHUP);
    d.wait_ready();
    // The moment it first answers (the main thread may still be setting up).
    for _ in 0..3 {
        let sent = Instant::now();
        d.signal(libc::SIGHUP);
        loop {
            assert!(d.child.try_wait().unwrap().is_none(), "gatid exited on SIGHUP");
            let health = d.client().control_json(Kind::Health, 0, &[]).unwrap();
            let age = health["last_reload"]["age_s"].as_f64();
            if age.is_some_and(|a| a <= sent.elapsed().as_secs_f64()) {
                assert_eq!(health["last_reload"]["ok"], true, "{health}");
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(10), "SIGHUP not handled as a reload: {health}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(d.child.try_wait().unwrap().is_none(), "gatid exited on SIGHUP");
    d.client().ping().unwrap();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let dir = tempdir("drain");
    let mut d =
        TestDaemon::start(&dir, &config(&dir, "drain_timeout_ms = 60000", &[cifar_model("cifar10", "max_batch = 16")]));
    let images = cifar_images();
    let mut batch = Vec::new();
    for (px, _) in images.iter().take(16) {
        batch.extend(px.iter().map(|&p| f32::from(p)));
    }
    let payload = f32_bytes(&batch);
    // 4 connections × 8 pipelined 16-row requests ≈ 512 rows of queued work.
    let mut clients: Vec<Client> = (0..4).map(|_| d.client()).collect();
    for c in &mut clients {
        for _ in 0..8 {
            c.send(Client::infer_header("cifar10", Dtype::F32, &[16, 32, 32, 3], 0), &payload).unwrap();
        }
    }
    // Wait until the daemon has read them all (they are in flight), then stop it.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = gatid::telemetry::summary::summarize(&d.client().stats_text().unwrap());
        let received: f64 = stats["inflight"].as_f64().unwrap()
            + stats["requests"].as_array().unwrap().iter().map(|r| r["count"].as_f64().unwrap()).sum::<f64>();
        if received >= 32.0 {
            break;
        }
        assert!(Instant::now() < until, "daemon did not read the requests");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    // New connections are no longer served once draining started.
    let refused = match Client::connect(&d.socket) {
        Err(_) => true,
        Ok(mut c) => c.ping().is_err(),
    };
    assert!(refused, "a new connection was served during drain");
    for c in &mut clients {
        for _ in 0..8 {
            let r = c.recv().unwrap();
            assert_eq!(r.status, Status::Ok, "in-flight request not answered during drain");
            assert_eq!(r.shape, vec![16, 10]);
            for (row, logits) in r.floats().chunks(10).enumerate() {
                assert_eq!(argmax(logits), images[row].1);
            }
        }
    }
    let st = d.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0));
    assert!(!d.socket.exists(), "socket file removed on exit");
}

#[test]
fn bad_config_lists_every_error_and_exits_78_binding_nothing() {
    let dir = tempdir("badcfg");
    let cfg = format!(
        "[server]\nsocket = \"{}\"\nio_threads = 0\ncolour = \"red\"\n\n[metrics]\nlisten = \"10.1.2.3:9000\"\n\n[[models]]\nname = \"a b\"\npath = \"/nonexistent.onnx\"\nmax_batch = 0\ninput = {{ layout = \"NHWC\", height = 32, width = 32, channels = 3, std = [0.0, 1.0] }}\n",
        dir.join("gatid.sock").display()
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, &cfg).unwrap();
    for args in [vec!["check-config"], vec!["serve", "--config"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_gatid")).args(&args).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in [
            "line 4: server.colour",
            "line 3: server.io_threads",
            "line 7: metrics.listen",
            "models[0].name",
            "models[0].path",
            "models[0].max_batch",
            "models[0].input.std",
        ] {
            assert!(err.contains(needle), "{args:?}: `{needle}` missing from:\n{err}");
        }
        assert!(!dir.join("gatid.sock").exists(), "a bad config bound the socket");
    }
    // Syntax errors too, with the line.
    std::fs::write(&path, "[server\nsocket = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatid")).args(["check-config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
    // The shipped example config is valid (given the set-up ran).
    let out = Command::new(env!("CARGO_BIN_EXE_gatid"))
        .args(["check-config"])
        .arg(root().join("configs/cpu.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn broken_model_file_fails_start_with_a_clear_error() {
    let dir = tempdir("broken");
    let bad = dir.join("broken.onnx");
    std::fs::write(&bad, b"this is not an onnx model at all").unwrap();
    let cfg = config(&dir, "", &[]) + &format!("[[models]]\nname = \"broken\"\npath = \"{}\"\ninput = {{ layout = \"NCHW\", height = 2, width = 2, channels = 1 }}\n", bad.display());
    std::fs::write(dir.join("gatid.toml"), cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatid"))
        .args(["serve", "--config"])
        .arg(dir.join("gatid.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(gatid::EXIT_MODEL.into()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model `broken`") && err.contains("malformed ONNX"), "{err}");
    assert!(!dir.join("gatid.sock").exists());
}

#[test]
fn systemd_units_verify() {
    which("systemd-analyze").expect("systemd-analyze not installed (scripts/setup.sh installs systemd)");
    let dir = tempdir("units");
    let units = root().join("systemd");
    // ExecStart must point at an existing binary for verify: use the one just built.
    let service = std::fs::read_to_string(units.join("gatid.service"))
        .unwrap()
        .replace("/usr/local/bin/gatid", env!("CARGO_BIN_EXE_gatid"));
    std::fs::write(dir.join("gatid.service"), service).unwrap();
    std::fs::copy(units.join("gatid.socket"), dir.join("gatid.socket")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "gatid.socket", "gatid.service"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("gatid.service:"), "systemd-analyze verify:\n{text}");
    // The hardening budget: offline analysis of the file, so the same on every machine.
    let exposure = security_exposure(&dir);
    println!("systemd-analyze security gatid.service: {exposure}");
    assert!(exposure <= 2.0, "gatid.service exposure {exposure} > 2.0 (it was 1.3)");
    // A broken unit is caught (the check can fail).
    std::fs::write(dir.join("gatid.service"), "[Service]\nType=notifyy\nExecStart=relative/path\n").unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "gatid.service"]).current_dir(&dir).output().unwrap();
    assert!(!out.status.success() || !out.stderr.is_empty(), "verify accepted a broken unit");
    // … and so is an unhardened one.
    std::fs::write(dir.join("gatid.service"), format!("[Service]\nExecStart={}\n", env!("CARGO_BIN_EXE_gatid")))
        .unwrap();
    let bare = security_exposure(&dir);
    assert!(bare > 2.0, "an unhardened unit rated {bare}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `systemd-analyze security --offline=true` of `dir`/gatid.service: the overall exposure.
fn security_exposure(dir: &std::path::Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", "gatid.service"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.split_once("Overall exposure level for gatid.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in systemd-analyze security output:\n{text}"))
}
