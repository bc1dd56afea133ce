//! A function's stderr goes through the daemon's rate-limited log, not
//! straight into the daemon's own stderr: a function printing in a loop is
//! answered as usual, its lines past the per-function allowance are dropped
//! and counted, long lines are cut, and the daemon's own messages still get
//! through.

mod common;

use std::fs::File;
use std::time::{Duration, Instant};

use common::*;
use gatid::api::wire::Status;
use gatid::sandbox::stderr::{BURST, LINES_PER_S, MAX_LINE};

/// `gati_function_stderr_lines_total{function="chatty",result=…}` (0 when absent).
fn lines(text: &str, result: &str) -> f64 {
    let key = format!("gati_function_stderr_lines_total{{function=\"chatty\",result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[test]
#[cfg_attr(gati_unprivileged, ignore = "needs root: DAG exec functions run in sandboxes (CI runs as root)")]
fn a_function_flooding_stderr_is_rate_limited_and_counted_while_it_is_served() {
    require_root();
    let dir = tempdir("function-logs");
    let log = dir.join("stderr.log");
    let parts = [
        exec_function("chatty", "gati-fn-testkit", &["chatty"], "expected_ms = 1.0\nmin_warm = 1"),
        "[[dags]]\nname = \"chatty\"\ndeadline_ms = 30000\nchain = [\"chatty\"]\n".to_string(),
    ];
    let file = File::create(&log).unwrap();
    let d = TestDaemon::start_with(&dir, &config(&dir, "", &parts), |cmd| {
        cmd.stderr(file);
    });
    let mut c = d.client();
    c.stream().set_read_timeout(Some(Duration::from_secs(60))).unwrap();

    // 20 000 lines and a 10 KiB one in one request: answered, never blocked.
    let t = Instant::now();
    let r = c.invoke_dag("chatty", b"20000", 0).unwrap();
    assert_eq!(r.status, Status::Ok, "{}", String::from_utf8_lossy(&r.payload));
    assert_eq!(r.payload, b"said 20000");
    // Every line is accounted for: logged or dropped.
    let until = Instant::now() + Duration::from_secs(30);
    let (logged, dropped) = loop {
        let text = c.stats_text().unwrap();
        let (l, dr) = (lines(&text, "logged"), lines(&text, "dropped"));
        if l + dr >= 20_001.0 {
            break (l, dr);
        }
        assert!(Instant::now() < until, "lines accounted: {l} logged, {dr} dropped of 20001");
        std::thread::sleep(Duration::from_millis(20));
    };
    let allowance = BURST + LINES_PER_S * t.elapsed().as_secs_f64() + 1.0;
    assert!(logged >= 1.0 && logged <= allowance, "logged {logged}, allowance {allowance}");
    assert_eq!(logged + dropped, 20_001.0);

    // The daemon's own warning says so; the log holds only the logged lines.
    let text = wait_for_text(&log, "lines dropped", Duration::from_secs(30));
    let in_log = text.lines().filter(|l| l.contains("chatty line ")).count() as f64;
    assert!(in_log <= logged, "{in_log} lines in the log, {logged} counted as logged");

    // A long line, once the allowance refills, is logged cut at MAX_LINE.
    let until = Instant::now() + Duration::from_secs(30);
    let cut = loop {
        let r = c.invoke_dag("chatty", b"0", 0).unwrap();
        assert_eq!(r.payload, b"said 0");
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(l) = text.lines().find(|l| l.contains("[cut]")) {
            break l.to_string();
        }
        assert!(Instant::now() < until, "no cut line logged");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ls = cut.matches('L').count();
    assert!((MAX_LINE - 8..=MAX_LINE + 8).contains(&ls), "the 10 KiB line is cut to {MAX_LINE} bytes: {ls}");
    let r = c.invoke_dag("chatty", b"3", 0).unwrap();
    assert_eq!(r.payload, b"said 3", "the function still serves");
}
