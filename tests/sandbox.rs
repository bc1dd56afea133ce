//! Sandboxed workers: round trips, faults (crash, timeout, memory, seccomp)
//! and isolation, asserted on what the function itself reports.
//!
//! The function binaries come from the `gati-sdk` crate; build them with the
//! workspace (`cargo test --release --workspace --test sandbox`). Tests that
//! need root (namespaces, cgroups) skip with a printed reason otherwise.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gatid::sandbox::{Exit, FunctionSpec, Limits, Sandbox, SandboxError, Sched};

/// The sdk's binaries sit next to this test's target dir: `<target>/<profile>/`.
/// `--test sandbox` alone does not (re)build another package's binaries, so a
/// missing or stale one fails here with the command that builds it.
fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target profile dir");
    let path = dir.join(name);
    let hint = "build the sdk's function binaries first: cargo build --release -p gati-sdk \
                (or run the whole cargo test --release --workspace)";
    let built = std::fs::metadata(&path).and_then(|m| m.modified());
    let built = built.unwrap_or_else(|_| panic!("{} is missing: {hint}", path.display()));
    // Its sources: the sdk library and its own main (not the other examples').
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/src");
    let own = sources.join("bin").join(format!("{name}.rs"));
    let newest = newest_mtime(&sources).max(std::fs::metadata(&own).and_then(|m| m.modified()).ok());
    if let Some(newest) = newest {
        assert!(built >= newest, "{} is older than its sources: {hint}", path.display());
    }
    path
}

/// The newest modification time of the files directly in `dir`.
fn newest_mtime(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.path().is_file() {
            newest = newest.max(entry.metadata().and_then(|m| m.modified()).ok());
        }
    }
    newest
}

/// Root-only tests are compiled as ignored without root (see daemon/build.rs);
/// a stale build run without root fails here instead of passing unrun.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(unsafe { libc::geteuid() } == 0, "this test needs root; rebuild as the user who runs it");
}

fn spec(program_name: &str, args: &[&str]) -> FunctionSpec {
    FunctionSpec {
        name: format!("test-{program_name}"),
        program: program(program_name),
        args: args.iter().map(|s| s.to_string()).collect(),
        limits: Limits {
            cpu_cores: 1.0,
            memory_bytes: 128 << 20,
            time_limit: Duration::from_secs(5),
            max_message_bytes: 2 << 20,
            pids: 8,
            sched: Sched::Batch,
        },
    }
}

fn testkit(args: &[&str]) -> Sandbox {
    Sandbox::start(&spec("gati-fn-testkit", args)).expect("sandbox starts")
}

const T: Duration = Duration::from_secs(10);

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn echo_round_trips_including_a_mebibyte_and_refuses_oversize() {
    require_root();
    let mut sb = testkit(&["echo"]);
    eprintln!("cold start {:?}, isolation {:?}", sb.start_time(), sb.isolation());
    assert_eq!(sb.call(b"hello", T).unwrap(), b"hello");
    assert_eq!(sb.call(b"", T).unwrap(), b"");
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(sb.call(&big, T).unwrap(), big);
    let max = sb.limits().max_message_bytes;
    match sb.call(&vec![0; max + 1], T) {
        Err(SandboxError::TooLarge { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // An oversized response is an error too, and the worker stays usable.
    let asked = format!("!big {}", max + 1);
    let outcome = sb.call(asked.as_bytes(), T);
    assert!(matches!(&outcome, Err(SandboxError::Function(m)) if m.contains("exceeds")), "{outcome:?}");
    assert_eq!(sb.call(b"still alive", T).unwrap(), b"still alive");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn handler_errors_and_panics_come_back_as_function_errors() {
    require_root();
    let mut sb = testkit(&["echo"]);
    assert!(matches!(sb.call(b"!err no such class", T), Err(SandboxError::Function(m)) if m == "no such class"));
    assert!(matches!(sb.call(b"!panic", T), Err(SandboxError::Function(m)) if m.contains("asked to panic")));
    assert_eq!(sb.call(b"after", T).unwrap(), b"after");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn a_crash_mid_request_is_reported_not_waited_on() {
    require_root();
    let mut sb = testkit(&["crash"]);
    let t = Instant::now();
    match sb.call(b"boom", T) {
        Err(SandboxError::Crashed { detail }) => eprintln!("crash detail: {detail}"),
        other => panic!("expected Crashed, got {other:?}"),
    }
    // Crashed, not TimedOut: the pidfd woke the caller long before its timeout T.
    eprintln!("crash noticed after {:?}", t.elapsed());
    assert!(matches!(sb.exit(), Some(Exit::Signal(_))), "exit {:?}", sb.exit());
    assert!(!sb.is_alive());
    assert!(matches!(sb.submit(b"x"), Err(SandboxError::Crashed { .. })));
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn a_function_past_its_time_limit_is_killed() {
    require_root();
    let mut s = spec("gati-fn-testkit", &["sleep"]);
    s.limits.time_limit = Duration::from_millis(300);
    let mut sb = Sandbox::start(&s).unwrap();
    let t = Instant::now();
    assert!(matches!(sb.call(b"zzz", T), Err(SandboxError::TimedOut)));
    let took = t.elapsed();
    // Never before the limit; and the limit, not the call's timeout T, ended it.
    assert!(took >= Duration::from_millis(300) && took < T, "took {took:?}");
    assert_eq!(sb.exit(), Some(Exit::Signal(libc::SIGKILL)));

    // The non-blocking path: submit, then try_take reports TimedOut once the limit passes.
    let mut sb = Sandbox::start(&s).unwrap();
    sb.submit(b"zzz").unwrap();
    assert!(sb.try_take().is_none());
    let give_up = Instant::now() + T;
    while !sb.deadline_passed() && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(sb.deadline_passed());
    assert!(matches!(sb.try_take(), Some(Err(SandboxError::TimedOut))));
    assert!(sb.try_take().is_none(), "reported once");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn the_memory_limit_holds() {
    require_root();
    let mut s = spec("gati-fn-testkit", &["alloc"]);
    s.limits.memory_bytes = 64 << 20;
    let mut sb = Sandbox::start(&s).unwrap();
    eprintln!("isolation: {:?}", sb.isolation());
    assert_eq!(sb.call(b"16", T).unwrap(), b"allocated 16 MiB");
    match sb.call(b"256", T) {
        Err(SandboxError::Crashed { detail }) => {
            eprintln!("over the limit: {detail}");
            assert_eq!(sb.exit(), Some(Exit::Signal(libc::SIGKILL)));
        }
        Err(SandboxError::Function(msg)) => assert!(msg.contains("allocation refused"), "{msg}"),
        other => panic!("expected the 256 MiB allocation to fail, got {other:?}"),
    }
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn a_forbidden_syscall_is_killed_by_seccomp() {
    require_root();
    for name in ["socket", "ptrace", "unshare"] {
        let mut sb = testkit(&["syscall", name]);
        match sb.call(b"go", T) {
            Err(SandboxError::Crashed { detail }) => assert!(detail.contains("SIGSYS"), "{detail}"),
            other => panic!("{name}: expected a seccomp kill, got {other:?}"),
        }
        assert_eq!(sb.exit(), Some(Exit::Signal(libc::SIGSYS)), "{name}");
    }
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn a_clone_with_a_namespace_flag_is_killed_by_seccomp() {
    require_root();
    let mut sb = testkit(&["syscall", "clone-newuser"]);
    match sb.call(b"go", T) {
        Err(SandboxError::Crashed { detail }) => assert!(detail.contains("SIGSYS"), "{detail}"),
        other => panic!("expected a seccomp kill, got {other:?}"),
    }
    assert_eq!(sb.exit(), Some(Exit::Signal(libc::SIGSYS)));
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn clone3_fails_with_enosys_and_threads_still_start() {
    require_root();
    let mut sb = testkit(&["syscall", "clone3"]);
    let answer = String::from_utf8(sb.call(b"go", T).unwrap()).unwrap();
    let enosys = std::io::Error::from_raw_os_error(libc::ENOSYS).to_string();
    assert_eq!(answer, format!("clone3 returned -1 ({enosys})"));
    assert!(sb.is_alive());

    // glibc's pthread_create meets the same ENOSYS and falls back to clone
    // with thread flags, which the filter lets through.
    let mut sb = testkit(&["thread"]);
    for _ in 0..3 {
        assert_eq!(sb.call(b"go", T).unwrap(), b"thread 720 joined");
    }
}

/// The function can write every byte of the shared region; the daemon reads
/// none of it back without checking, and never the layout it owns.
#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn a_guest_scribbling_over_shared_memory_is_contained() {
    require_root();
    // Control block garbage (magic, capacity, max message): not read back.
    let mut sb = testkit(&["scribble", "control"]);
    assert_eq!(sb.call(b"go", T).unwrap(), b"scribbled");
    assert_eq!(sb.call(b"go", T).unwrap(), b"scribbled", "the layout is the daemon's own");
    // The daemon's ring indices: the next push checks them, refuses and kills.
    let mut sb = testkit(&["scribble", "indices"]);
    assert_eq!(sb.call(b"go", T).unwrap(), b"scribbled");
    match sb.call(b"again", T) {
        Err(SandboxError::Protocol(msg)) => assert!(msg.contains("request ring"), "{msg}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(!sb.is_alive(), "a worker that broke the protocol is killed");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn the_function_sees_only_itself_no_network_and_no_host_files() {
    require_root();
    let secret = std::env::temp_dir().join(format!("gati-sandbox-secret-{}", std::process::id()));
    std::fs::write(&secret, "host secret").unwrap();
    let mut sb = testkit(&["probe"]);
    let iso = sb.isolation().clone();
    for ns in ["pid", "mount", "net", "ipc", "uts"] {
        assert!(iso.namespaces.contains(&ns), "{ns} missing from {iso:?}");
    }
    assert!(iso.private_root && iso.seccomp && iso.capabilities_dropped && iso.bounding_set_dropped);
    let input = format!("read=/etc/hostname\nread={}\nread=/proc/1/environ", secret.display());
    let report = String::from_utf8(sb.call(input.as_bytes(), T).unwrap()).unwrap();
    std::fs::remove_file(&secret).ok();
    eprintln!("{report}");
    let get = |key: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}"))
            .to_string()
    };
    assert_eq!(get("pid"), "1");
    assert_eq!(get("proc_pids"), "1", "only itself in /proc");
    assert_eq!(get("net_ifaces"), "lo", "only loopback");
    assert_eq!(get("hostname"), "gati-sandbox");
    assert_ne!(get("uid"), "0");
    assert_eq!(get("CapEff"), "0000000000000000");
    assert_eq!(get("CapBnd"), "0000000000000000");
    assert_eq!(get("NoNewPrivs"), "1");
    assert_eq!(get("Seccomp"), "2");
    assert_eq!(iso.sched, Sched::Batch);
    assert_eq!(get("sched_policy"), libc::SCHED_BATCH.to_string(), "workers run SCHED_BATCH by default");
    assert!(get("read /etc/hostname").starts_with("err:"), "host /etc/hostname readable");
    assert!(get(&format!("read {}", secret.display())).starts_with("err:"), "host /tmp file readable");
    let root: Vec<String> = get("root").split(',').map(str::to_owned).collect();
    assert!(root.iter().all(|e| ["bin", "lib", "lib64", "proc", "usr"].contains(&e.as_str())), "root holds {root:?}");
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn pid_fd_and_wake_fd_drive_a_non_blocking_caller() {
    require_root();
    let mut sb = testkit(&["echo"]);
    sb.submit(b"ping").unwrap();
    assert!(matches!(sb.submit(b"again"), Err(SandboxError::Busy)));
    let mut pfd = libc::pollfd { fd: sb.wake_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: polls one live pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
    assert_eq!(sb.try_take().unwrap().unwrap(), b"ping");
    assert!(sb.try_take().is_none());
    sb.kill();
    let mut pfd = libc::pollfd { fd: sb.pid_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: polls one live pollfd.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1);
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn example_functions_preprocess_and_top_k() {
    require_root();
    // A 64×48 PNG, encoded here, comes back as 32×32×3 RGB.
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 100]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let mut pre = Sandbox::start(&spec("gati-fn-preprocess", &[])).unwrap();
    let out = pre.call(&png, T).unwrap();
    assert_eq!(out.len(), 32 * 32 * 3);
    assert!(out.chunks(3).all(|px| px[2] == 100), "blue channel kept");
    assert!(matches!(pre.call(b"not an image", T), Err(SandboxError::Function(m)) if m.contains("decode")));

    let mut topk = Sandbox::start(&spec("gati-fn-topk", &["2"])).unwrap();
    let logits: Vec<u8> = [0.0f32, 3.0, 1.0, 5.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let json = String::from_utf8(topk.call(&logits, T).unwrap()).unwrap();
    assert!(json.starts_with("[{\"class\":3,\"p\":0.8"), "{json}");
    assert!(json.contains("{\"class\":1,"), "{json}");
    assert_eq!(json.matches("class").count(), 2);
}

/// Cold start and warm round-trip figures (printed; see docs/sandbox.md).
#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: namespaces, cgroups (CI runs as root)")]
fn cold_start_and_round_trip_times() {
    require_root();
    let mut starts: Vec<Duration> = (0..20).map(|_| testkit(&["echo"]).start_time()).collect();
    starts.sort();
    let mut sb = testkit(&["echo"]);
    let payload = [7u8; 64];
    for _ in 0..100 {
        sb.call(&payload, T).unwrap();
    }
    let n = 10_000;
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            sb.call(&payload, T).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    let mean = times.iter().sum::<Duration>() / n as u32;
    eprintln!(
        "cold start: median {:?}, max {:?} (20 starts); echo call 64 B: mean {:?}, p50 {:?}, p99 {:?} ({n} calls)",
        starts[10],
        starts[19],
        mean,
        times[n / 2],
        times[n * 99 / 100]
    );
}

/// Runs as root or not: whatever `isolation()` claims must hold in the
/// function's own view (unprivileged, the jail uses a user namespace, or no
/// namespaces at all where the kernel refuses them, and says so).
#[test]
fn claimed_isolation_matches_what_the_function_sees() {
    let mut sb = testkit(&["probe"]);
    let iso = sb.isolation().clone();
    eprintln!("applied: {iso:?}");
    let report = String::from_utf8(sb.call(b"read=/etc/hostname", T).unwrap()).unwrap();
    let get = |key: &str| report.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or("").to_string();
    if iso.namespaces.contains(&"pid") {
        assert_eq!(get("proc_pids"), "1");
    }
    if iso.namespaces.contains(&"net") {
        assert_eq!(get("net_ifaces"), "lo");
    }
    if iso.namespaces.contains(&"uts") {
        assert_eq!(get("hostname"), "gati-sandbox");
    }
    if iso.private_root {
        assert!(get("read /etc/hostname").starts_with("err:"));
    }
    assert_eq!(get("uid"), iso.uid.to_string());
    assert_eq!(get("Seccomp"), if iso.seccomp { "2" } else { "0" });
    assert_eq!(get("NoNewPrivs"), if iso.no_new_privs { "1" } else { "0" });
    if iso.capabilities_dropped {
        assert_eq!(get("CapEff"), "0000000000000000");
    }
    if iso.bounding_set_dropped {
        assert_eq!(get("CapBnd"), "0000000000000000");
    }
    if iso.cgroup.is_none() {
        assert!(iso.cgroup_note.is_some(), "no cgroup and no reason given");
    }
}

/// Root or not: a worker runs under the policy its function asks for, and
/// `isolation()` says which (`SCHED_BATCH` by default, see `Sched`).
#[test]
fn a_worker_runs_under_the_configured_scheduling_policy() {
    for (sched, policy) in [(Sched::Batch, libc::SCHED_BATCH), (Sched::Normal, libc::SCHED_OTHER)] {
        let mut s = spec("gati-fn-testkit", &["probe"]);
        s.limits.sched = sched;
        let mut sb = Sandbox::start(&s).expect("sandbox starts");
        assert_eq!(sb.isolation().sched, sched);
        let report = String::from_utf8(sb.call(b"", T).unwrap()).unwrap();
        let got = report.lines().find_map(|l| l.strip_prefix("sched_policy=")).unwrap_or("none").to_string();
        assert_eq!(got, policy.to_string(), "{sched:?}: {report}");
    }
}
