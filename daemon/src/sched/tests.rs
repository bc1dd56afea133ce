//! SGS tests on real threads, fds and child processes (no fake clocks).

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::function::WarmBounds;
use super::worker::{Behaviour, ProcessWorker, ThreadWorker};
use super::*;
use crate::sandbox::Sched;

const LONG: Duration = Duration::from_secs(10);

fn func(name: &str, expected_ms: u64, min: usize, max: usize) -> FunctionDef {
    FunctionDef {
        name: name.into(),
        body: FunctionBody::Exec { program: PathBuf::from("/bin/sh"), args: Vec::new() },
        limits: Limits {
            cpu_cores: 1.0,
            memory_bytes: 64 << 20,
            time_limit: Duration::from_secs(5),
            max_message_bytes: 1 << 16,
            pids: 4,
            sched: Sched::Batch,
        },
        expected: Some(Duration::from_millis(expected_ms)),
        warm: WarmBounds { min, max, keep_alive: Duration::from_secs(60), headroom: 0.0 },
    }
}

fn deployment(
    functions: Vec<FunctionDef>,
    dag_nodes: Vec<usize>,
    edges: &[(usize, usize)],
    deadline_ms: u64,
) -> Arc<Deployment> {
    let dag = Dag::new("d", 0, Duration::from_millis(deadline_ms), dag_nodes, edges, (1, 1)).unwrap();
    Arc::new(Deployment::new(functions, vec![Arc::new(dag)]))
}

fn budget(dep: &Deployment) -> Arc<cores::Cores> {
    Arc::new(cores::Cores::for_policy(&dep.policy))
}

fn request(dep: &Deployment, input: &[u8], deadline: Option<Instant>) -> (DagRequest, Receiver<(DagResult, Instant)>) {
    let (tx, rx) = mpsc::channel();
    let reply = DagReply::new(move |r| {
        let _ = tx.send((r, Instant::now()));
    });
    (DagRequest { dag: Arc::clone(&dep.dags[0]), input: input.to_vec(), deadline, reply }, rx)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + LONG;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn workers(sgs: &Sgs) -> u64 {
    sgs.stats().workers.load(std::sync::atomic::Ordering::Relaxed)
}

/// Appends the function's name to its input, after `sleep`.
fn appender(sleep: Duration) -> impl Fn(&FunctionDef) -> Result<Box<dyn Worker>, WorkerError> + Send + Sync {
    move |f: &FunctionDef| {
        let name = f.name.clone();
        let w = ThreadWorker::spawn(f.limits.time_limit, move |mut input| {
            std::thread::sleep(sleep);
            input.extend_from_slice(name.as_bytes());
            Behaviour::Answer(input)
        })?;
        Ok(Box::new(w) as Box<dyn Worker>)
    }
}

#[test]
fn diamond_dag_runs_with_fan_in_framing() {
    // a → b, a → c, (b, c) → d
    let fs = ["a", "b", "c", "d"].iter().map(|n| func(n, 1, 0, 2)).collect();
    let dep = deployment(fs, vec![0, 1, 2, 3], &[(0, 1), (0, 2), (1, 3), (2, 3)], 2000);
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::ZERO)), budget(&dep)).unwrap();
    let (req, rx) = request(&dep, b"x", None);
    assert!(sgs.submit(req).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    let DagResult::Ok { output, timings } = res else { panic!("{res:?}") };
    // d's input: [len "xab"] "xab" [len "xac"] "xac", then d appends "d".
    let mut want = Vec::new();
    for part in [&b"xab"[..], b"xac"] {
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(part);
    }
    want.push(b'd');
    assert_eq!(output, want);
    assert_eq!(timings.len(), 4);
    assert_eq!(timings[0].function, "a");
    assert_eq!(timings[3].function, "d");
    assert!(timings.iter().all(|t| t.attempts == 1));
    let c = sgs.stats().dags[0].sample();
    assert_eq!((c.arrived, c.answered, c.dispatched), (1, 1, 4));
    assert!(sgs.stats().cold_starts.load(std::sync::atomic::Ordering::Relaxed) >= 1, "empty pools start cold");
    assert!(sgs.join(LONG));
}

#[test]
fn least_slack_request_is_dispatched_first() {
    // One worker; a blocker holds it while two requests queue up.
    let dep = deployment(vec![func("f", 1, 1, 1)], vec![0], &[], 5000);
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::from_millis(40))), budget(&dep)).unwrap();
    wait_until("the warm worker", || workers(&sgs) == 1);
    let now = Instant::now();
    let (blocker, rx0) = request(&dep, b"0", Some(now + Duration::from_secs(5)));
    assert!(sgs.submit(blocker).is_ok());
    wait_until("the blocker to run", || sgs.stats().dags[0].sample().dispatched == 1);
    let (loose, rx1) = request(&dep, b"1", Some(now + Duration::from_secs(3)));
    let (tight, rx2) = request(&dep, b"2", Some(now + Duration::from_millis(1000)));
    assert!(sgs.submit(loose).is_ok());
    assert!(sgs.submit(tight).is_ok());
    let (r0, t0) = rx0.recv_timeout(LONG).unwrap();
    let (r1, t1) = rx1.recv_timeout(LONG).unwrap();
    let (r2, t2) = rx2.recv_timeout(LONG).unwrap();
    assert!(matches!(r0, DagResult::Ok { .. }) && matches!(r1, DagResult::Ok { .. }), "{r0:?} {r1:?}");
    assert!(matches!(&r2, DagResult::Ok { output, .. } if output == b"2f"), "{r2:?}");
    assert!(t0 < t2 && t2 < t1, "tight deadline ran before the loose one");
    assert_eq!(sgs.stats().cold_starts.load(std::sync::atomic::Ordering::Relaxed), 0, "min_warm kept it warm");
    assert!(sgs.join(LONG));
}

#[test]
fn negative_slack_is_answered_without_running() {
    let dep = deployment(vec![func("slow", 50, 0, 1)], vec![0], &[], 5000);
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::ZERO)), budget(&dep)).unwrap();
    let (req, rx) = request(&dep, b"x", Some(Instant::now() + Duration::from_millis(10)));
    assert!(sgs.submit(req).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    assert_eq!(res, DagResult::DeadlineMissed);
    let c = sgs.stats().dags[0].sample();
    assert_eq!((c.missed, c.dispatched), (1, 0), "no work was wasted on it");
    assert!(sgs.join(LONG));
}

#[test]
fn killed_process_worker_is_replaced_and_the_request_retried() {
    // `cat` echoes our framing back; each new process sleeps first, so the
    // test can kill it while the request is in its pipe.
    let mut f = func("echo", 1, 0, 1);
    f.body = FunctionBody::Exec { program: "/bin/sh".into(), args: vec!["-c".into(), "sleep 0.3; exec cat".into()] };
    let dep = deployment(vec![f], vec![0], &[], 5000);
    let pids = Arc::new(Mutex::new(Vec::new()));
    let p = Arc::clone(&pids);
    let factory = move |f: &FunctionDef| {
        let FunctionBody::Exec { program, args } = &f.body else { unreachable!("exec only") };
        let w = ProcessWorker::start(program, args, &f.limits)?;
        p.lock().unwrap().push(w.pid());
        Ok(Box::new(w) as Box<dyn Worker>)
    };
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(factory), budget(&dep)).unwrap();
    let (req, rx) = request(&dep, b"hello", None);
    assert!(sgs.submit(req).is_ok());
    wait_until("the first worker", || !pids.lock().unwrap().is_empty());
    wait_until("dispatch", || sgs.stats().dags[0].sample().dispatched == 1);
    let first = pids.lock().unwrap()[0];
    // SAFETY: SIGKILL to our own child process, still unreaped (its pidfd is open).
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    let DagResult::Ok { output, timings } = res else { panic!("{res:?}") };
    assert_eq!(output, b"hello");
    assert_eq!(timings[0].attempts, 2);
    let s = sgs.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((load(&s.crashes), load(&s.retries)), (1, 1));
    assert_eq!(pids.lock().unwrap().len(), 2, "one replacement");
    assert_eq!(workers(&sgs), 1);
    assert!(sgs.join(LONG));
}

#[test]
fn crash_without_slack_fails_before_the_deadline() {
    let dep = deployment(vec![func("f", 100, 1, 1)], vec![0], &[], 5000);
    let factory = |f: &FunctionDef| {
        let w = ThreadWorker::spawn(f.limits.time_limit, |_| {
            std::thread::sleep(Duration::from_millis(100));
            Behaviour::Exit
        })?;
        Ok(Box::new(w) as Box<dyn Worker>)
    };
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(factory), budget(&dep)).unwrap();
    wait_until("the warm worker", || workers(&sgs) == 1);
    let deadline = Instant::now() + Duration::from_millis(180);
    let (req, rx) = request(&dep, b"x", Some(deadline));
    assert!(sgs.submit(req).is_ok());
    let (res, at) = rx.recv_timeout(LONG).unwrap();
    let DagResult::Failed(msg) = res else { panic!("{res:?}") };
    assert!(msg.contains("no slack left to retry"), "{msg}");
    assert!(at < deadline, "answered {:?} after the deadline", at - deadline);
    wait_until("the replacement", || workers(&sgs) == 1);
    assert!(sgs.join(LONG));
}

#[test]
fn overdue_worker_is_killed_and_retried() {
    let mut f = func("f", 1, 0, 2);
    f.limits.time_limit = Duration::from_millis(50);
    let dep = deployment(vec![f], vec![0], &[], 5000);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let factory = move |f: &FunctionDef| {
        let c = Arc::clone(&calls);
        let w = ThreadWorker::spawn(f.limits.time_limit, move |input| {
            if c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_secs(3));
            }
            Behaviour::Answer(input)
        })?;
        Ok(Box::new(w) as Box<dyn Worker>)
    };
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(factory), budget(&dep)).unwrap();
    let started = Instant::now();
    let (req, rx) = request(&dep, b"x", None);
    assert!(sgs.submit(req).is_ok());
    let (res, at) = rx.recv_timeout(LONG).unwrap();
    // The hung first attempt was killed and a later one answered (on a loaded
    // machine a retry can itself overrun the 50 ms limit and be retried again).
    assert!(matches!(&res, DagResult::Ok { timings, .. } if timings[0].attempts >= 2), "{res:?}");
    assert!(at - started < Duration::from_millis(2500), "waited for the hung worker (3 s)");
    assert!(sgs.join(LONG));
}

#[test]
fn scheduler_invokes_by_name_and_routes_through_the_table() {
    let dep = deployment(vec![func("f", 1, 0, 1)], vec![0], &[], 1000);
    let table = Arc::new(UserRouteTable::default());
    let s = Scheduler::start(Arc::clone(&dep), Arc::new(appender(Duration::ZERO)), table.clone(), LbPolicy::default())
        .unwrap();
    assert_eq!(table.lookup(dep.dags[0].id, 0), Some(0));
    let (tx, rx) = mpsc::channel();
    let t2 = tx.clone();
    s.invoke("d", b"in".to_vec(), None, DagReply::new(move |r| tx.send(r).unwrap()));
    s.invoke("nope", Vec::new(), None, DagReply::new(move |r| t2.send(r).unwrap()));
    let mut got = [rx.recv_timeout(LONG).unwrap(), rx.recv_timeout(LONG).unwrap()];
    got.sort_by_key(|r| matches!(r, DagResult::Ok { .. }));
    assert_eq!(got[0], DagResult::Failed("unknown DAG `nope`".into()));
    assert!(matches!(&got[1], DagResult::Ok { output, .. } if output == b"inf"));
    assert!(s.stop(LONG));
}

#[test]
fn failing_cold_start_answers_waiting_requests() {
    let dep = deployment(vec![func("f", 1, 0, 1)], vec![0], &[], 5000);
    let factory =
        |_: &FunctionDef| -> Result<Box<dyn Worker>, WorkerError> { Err(WorkerError::Start("no such program".into())) };
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(factory), budget(&dep)).unwrap();
    let (req, rx) = request(&dep, b"x", None);
    assert!(sgs.submit(req).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    assert!(matches!(&res, DagResult::Failed(m) if m.contains("no such program")), "{res:?}");
    assert!(sgs.join(LONG));
}

/// One failed start is not the end: the request waits out the back-off and
/// runs on the worker the next start brings.
#[test]
fn a_transient_start_failure_delays_waiting_requests_but_does_not_fail_them() {
    let dep = deployment(vec![func("f", 1, 0, 1)], vec![0], &[], 5000);
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = Arc::clone(&tries);
    let ok = appender(Duration::ZERO);
    let factory = move |f: &FunctionDef| -> Result<Box<dyn Worker>, WorkerError> {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return Err(WorkerError::Start("fork failed: resource temporarily unavailable".into()));
        }
        ok(f)
    };
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(factory), budget(&dep)).unwrap();
    let (req, rx) = request(&dep, b"x", None);
    assert!(sgs.submit(req).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    assert!(matches!(&res, DagResult::Ok { output, .. } if output == b"xf"), "{res:?}");
    assert!(tries.load(std::sync::atomic::Ordering::SeqCst) >= 2, "a second start brought the worker");
    assert!(sgs.join(LONG));
}

#[test]
fn stop_finishes_in_flight_work_and_refuses_the_rest() {
    let dep = deployment(vec![func("f", 1, 1, 1)], vec![0], &[], 5000);
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::from_millis(30))), budget(&dep)).unwrap();
    wait_until("the warm worker", || workers(&sgs) == 1);
    let (first, rx1) = request(&dep, b"1", None);
    assert!(sgs.submit(first).is_ok());
    wait_until("dispatch", || sgs.stats().dags[0].sample().dispatched == 1);
    sgs.stop();
    let (late, rx2) = request(&dep, b"2", None);
    assert!(sgs.submit(late).is_ok());
    assert!(matches!(rx1.recv_timeout(LONG).unwrap().0, DagResult::Ok { .. }), "in-flight work finishes");
    assert!(matches!(rx2.recv_timeout(LONG).unwrap().0, DagResult::Failed(_)), "late work is refused");
    assert!(sgs.join(LONG));
}

/// A model function through the node's factory: the served model's batcher
/// runs the invocation. Needs ONNX Runtime (`ORT_DYLIB_PATH`, set by scripts/test.sh).
#[test]
fn model_function_runs_on_the_served_model() {
    use crate::config::{Cuts, InputConfig, Layout, ModelConfig, OutputKind, Resize};
    use crate::infer::{LoadedModel, ModelHandle, Registry};
    crate::infer::runtime::environment(None).expect("ONNX Runtime (scripts/test.sh sets ORT_DYLIB_PATH)");
    let cfg = ModelConfig {
        name: "fm".into(),
        path: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/fmnist_resnet.onnx"),
        cuts: Cuts::Mode("none".into()),
        max_queue_rows: None,
        input: InputConfig {
            layout: Layout::NCHW,
            height: 28,
            width: 28,
            channels: 1,
            scale: 1.0,
            mean: vec![],
            std: vec![],
            resize: Resize::None,
        },
        output: OutputKind::Logits,
        labels: vec![],
        max_batch: 4,
        max_queue_delay_us: 0,
        intra_threads: 1,
        cache: None,
        backend: Default::default(),
        device: 0,
        fallback: Default::default(),
    };
    let handle = ModelHandle::start(LoadedModel::load(&cfg).unwrap(), Duration::ZERO).unwrap();
    let registry = Arc::new(Registry::default());
    registry.replace([(crate::id::model_id("fm"), Arc::new(handle))].into_iter().collect());
    let mut f = func("classify", 5, 1, 1);
    f.body = FunctionBody::Model("fm".into());
    let dep = deployment(vec![f], vec![0], &[], 5000);
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(NodeWorkers { registry }), budget(&dep)).unwrap();
    let input: Vec<u8> = (0..2 * 28 * 28).flat_map(|i| ((i % 7) as f32 / 7.0).to_le_bytes()).collect();
    let (req, rx) = request(&dep, &input, None);
    assert!(sgs.submit(req).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    let DagResult::Ok { output, .. } = res else { panic!("{res:?}") };
    assert_eq!(output.len(), 2 * 10 * 4, "two rows of 10 f32 logits");
    let (bad, rx) = request(&dep, &input[..10], None);
    assert!(sgs.submit(bad).is_ok());
    let (res, _) = rx.recv_timeout(LONG).unwrap();
    assert!(matches!(&res, DagResult::Failed(m) if m.contains("not a whole number")), "{res:?}");
    assert!(sgs.join(LONG));
}

#[test]
fn baseline_policy_is_fifo_deadline_oblivious_and_starts_on_demand() {
    use crate::config::DispatchConfig;
    use std::sync::atomic::Ordering::Relaxed;
    // One worker at most, started only when work waits.
    let gati = deployment(vec![func("f", 1, 1, 1)], vec![0], &[], 5000);
    let dep =
        Arc::new(Deployment::new(gati.functions.clone(), gati.dags.clone()).with_policy(DispatchConfig::baseline()));
    assert_eq!(dep.sgs_threads(), 1, "no LB scaling: one SGS");
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::from_millis(40))), budget(&dep)).unwrap();
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(workers(&sgs), 0, "on demand: min_warm is not prestarted");
    let now = Instant::now();
    let (blocker, rx0) = request(&dep, b"0", Some(now + Duration::from_secs(5)));
    assert!(sgs.submit(blocker).is_ok());
    wait_until("the blocker to run", || sgs.stats().dags[0].sample().dispatched == 1);
    assert_eq!(sgs.stats().cold_starts.load(Relaxed), 1, "the on-demand start is a cold start");
    assert_eq!(sgs.stats().prestarts.load(Relaxed), 0);
    // The loose request arrives first, the tight one second: FIFO runs them in that order.
    let (loose, rx1) = request(&dep, b"1", Some(now + Duration::from_secs(3)));
    let (tight, rx2) = request(&dep, b"2", Some(now + Duration::from_millis(1000)));
    assert!(sgs.submit(loose).is_ok());
    assert!(sgs.submit(tight).is_ok());
    // A deadline already hopeless is still run and answered with its output (late).
    let (late, rx3) = request(&dep, b"3", Some(now));
    assert!(sgs.submit(late).is_ok());
    let (_, t0) = rx0.recv_timeout(LONG).unwrap();
    let (r1, t1) = rx1.recv_timeout(LONG).unwrap();
    let (r2, t2) = rx2.recv_timeout(LONG).unwrap();
    let (r3, _) = rx3.recv_timeout(LONG).unwrap();
    assert!(matches!(r1, DagResult::Ok { .. }) && matches!(r2, DagResult::Ok { .. }), "{r1:?} {r2:?}");
    assert!(t0 < t1 && t1 < t2, "FIFO: the loose request (first in) ran before the tight one");
    assert!(matches!(&r3, DagResult::Ok { output, .. } if output == b"3f"), "{r3:?}");
    let c = sgs.stats().dags[0].sample();
    assert_eq!((c.answered, c.missed, c.late), (4, 0, 1), "{c:?}");
    assert!(sgs.join(LONG));
}

#[test]
fn core_budget_is_shared_by_every_sgs() {
    // Two SGSs, two warm workers each, one lease for the node: the four
    // invocations run one at a time across both SGSs (a release on one wakes
    // the other), and never two at once.
    let dep = deployment(vec![func("f", 40, 2, 2)], vec![0], &[], 5000);
    let cores = Arc::new(cores::Cores::new(1));
    let start = |i| Sgs::start(i, Arc::clone(&dep), Arc::new(appender(Duration::from_millis(40))), Arc::clone(&cores));
    let (a, b) = (start(0).unwrap(), start(1).unwrap());
    wait_until("the warm workers", || workers(&a) == 2 && workers(&b) == 2);
    let mut rxs = Vec::new();
    for k in 0..4u8 {
        let (req, rx) = request(&dep, &[k], None);
        assert!(if k % 2 == 0 { &a } else { &b }.submit(req).is_ok());
        rxs.push(rx);
    }
    let t0 = Instant::now();
    let mut done = Vec::new();
    for rx in &rxs {
        let answered = loop {
            match rx.recv_timeout(Duration::ZERO) {
                Ok((res, at)) => break (res, at),
                Err(_) => {
                    assert!(cores.used() <= 1, "{} leases of 1", cores.used());
                    assert!(t0.elapsed() < LONG, "a request hung");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        assert!(matches!(answered.0, DagResult::Ok { .. }), "{:?}", answered.0);
        done.push(answered.1 - t0);
    }
    done.sort();
    for w in done.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(30), "two ran at once: {done:?}");
    }
    assert!(a.join(LONG) && b.join(LONG));
    assert_eq!(cores.used(), 0, "every lease returned");
}

#[test]
fn overload_is_shed_at_arrival_not_run_late() {
    // One lease, 30 ms per request, 100 ms deadlines, six requests at once:
    // three can make it. The other three are answered DeadlineMissed on
    // arrival (shedding), not after waiting for their turn.
    let policy = crate::config::DispatchConfig { core_budget: true, shed: true, cores: 1, ..Default::default() };
    let dep = deployment(vec![func("f", 30, 1, 1)], vec![0], &[], 100);
    let dep = Arc::new(Deployment::new(dep.functions.clone(), dep.dags.clone()).with_policy(policy));
    let cores = budget(&dep);
    assert_eq!(cores.total(), Some(1));
    let sgs = Sgs::start(0, Arc::clone(&dep), Arc::new(appender(Duration::from_millis(30))), cores).unwrap();
    wait_until("the warm worker", || workers(&sgs) == 1);
    let t0 = Instant::now();
    let rxs: Vec<_> = (0..6u8)
        .map(|k| {
            let (req, rx) = request(&dep, &[k], None);
            assert!(sgs.submit(req).is_ok());
            rx
        })
        .collect();
    let mut ok = 0;
    let mut shed_at = Vec::new();
    for rx in &rxs {
        match rx.recv_timeout(LONG).unwrap() {
            (DagResult::Ok { .. }, at) => {
                assert!(at - t0 <= Duration::from_millis(100) + Duration::from_millis(30), "{:?}", at - t0);
                ok += 1;
            }
            (DagResult::DeadlineMissed, at) => shed_at.push(at - t0),
            (r, _) => panic!("{r:?}"),
        }
    }
    assert_eq!(ok, 3, "three fit in the deadline; shed answered at {shed_at:?}");
    assert!(shed_at.iter().all(|&t| t < Duration::from_millis(25)), "shed on arrival, not late: {shed_at:?}");
    assert!(sgs.join(LONG));
}
