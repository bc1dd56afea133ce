//! The daemon seen from outside while the soak runs: RSS and peak RSS
//! (`/proc/PID/status`), open fds (`/proc/PID/fd`) and the `gati_queued_bytes`
//! gauge from its metrics (when the daemon has it), once a second, printed as
//! a table row and kept as a time series.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::Progress;
use gatid::client::Client;
use gatid::telemetry::names;

/// Between samples.
const PERIOD: Duration = Duration::from_secs(1);
/// Longest wait after the load for the fds to come back to their start count.
const SETTLE_MAX: Duration = Duration::from_secs(15);
/// Shortest settle after the load before the end RSS is read.
const SETTLE_MIN: Duration = Duration::from_secs(3);

/// The daemon's resources at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Snapshot {
    pub rss_mb: f64,
    /// Peak RSS so far (VmHWM): catches spikes between samples, though the
    /// kernel raises it only at unmaps, so memory returned with madvise can
    /// leave a sampled peak above it.
    pub hwm_mb: f64,
    pub fds: usize,
    pub queued_bytes: Option<f64>,
}

fn status_mb(status: &str, key: &str) -> Option<f64> {
    let kb: f64 = status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The sum of the `gati_queued_bytes` series in a metrics text, if it has any.
fn queued_bytes(metrics: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.strip_prefix(names::QUEUED_BYTES).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

impl Snapshot {
    /// Reads the daemon `pid`'s resources; `c` asks for its metrics.
    pub fn take(pid: u32, c: &mut Client) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("daemon gone")?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).context("daemon gone")?.count();
        Ok(Self {
            rss_mb: status_mb(&status, "VmRSS:").context("daemon gone (a zombie: no VmRSS)")?,
            hwm_mb: status_mb(&status, "VmHWM:").context("daemon gone (a zombie: no VmHWM)")?,
            fds,
            queued_bytes: c.stats_text().ok().as_deref().and_then(queued_bytes),
        })
    }

    /// What is left of a daemon that exited: no memory, no fds.
    pub fn gone() -> Self {
        Self { rss_mb: f64::NAN, hwm_mb: f64::NAN, fds: 0, queued_bytes: None }
    }

    fn queued(&self) -> String {
        self.queued_bytes.map_or_else(|| "n/a".into(), |q| format!("{q:.0}"))
    }
}

/// One row of the time series.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub t_s: f64,
    pub requests: u64,
    pub req_per_s: f64,
    #[serde(flatten)]
    pub at: Snapshot,
}

/// The samples, and the RSS once the warm-up share of the requests was done.
#[derive(Debug, Default)]
pub(crate) struct Series {
    pub samples: Vec<Sample>,
    pub rss_warm_mb: Option<f64>,
}

impl Series {
    pub fn rss_peak_mb(&self) -> f64 {
        self.samples.iter().map(|s| s.at.rss_mb).fold(0.0, f64::max)
    }
}

/// Samples once a second until `finished()`, printing each row; a daemon
/// that disappears sets `abort`.
pub(crate) fn watch(
    pid: u32,
    c: &mut Client,
    progress: &Progress,
    started: Instant,
    warm_at: u64,
    finished: impl Fn() -> bool,
) -> Series {
    println!("{:>7} {:>10} {:>8} {:>8} {:>6} {:>12}", "time s", "requests", "req/s", "RSS MB", "fds", "queued B");
    let mut series = Series::default();
    let (mut last_t, mut last_n) = (0.0, 0u64);
    let mut next = started + PERIOD;
    loop {
        while Instant::now() < next && !finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let over = finished();
        next += PERIOD;
        let t = started.elapsed().as_secs_f64();
        let n = progress.done();
        match Snapshot::take(pid, c) {
            Ok(at) => {
                let rate = (n - last_n) as f64 / (t - last_t).max(1e-9);
                println!("{t:>7.1} {n:>10} {rate:>8.0} {:>8.1} {:>6} {:>12}", at.rss_mb, at.fds, at.queued());
                if series.rss_warm_mb.is_none() && n >= warm_at {
                    series.rss_warm_mb = Some(at.rss_mb);
                }
                series.samples.push(Sample { t_s: t, requests: n, req_per_s: rate, at });
            }
            Err(e) => {
                println!("{t:>7.1} {n:>10} daemon: {e:#}");
                progress.abort.store(true, Ordering::Relaxed);
            }
        }
        (last_t, last_n) = (t, n);
        if over {
            return series;
        }
    }
}

/// Before the load: waits (bounded) until the daemon's fd count has held
/// still for a second (connections just closed on our side may still be
/// open on its side), then reads its resources.
pub(crate) fn steady(pid: u32, c: &mut Client) -> anyhow::Result<Snapshot> {
    let t = Instant::now();
    let (mut last, mut since) = (usize::MAX, Instant::now());
    while t.elapsed() < SETTLE_MAX {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).context("daemon gone")?.count();
        if fds != last {
            (last, since) = (fds, Instant::now());
        } else if since.elapsed() >= PERIOD {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Snapshot::take(pid, c)
}

/// After the load: waits (bounded) for the fds to come back to `fds_start`,
/// and at least [`SETTLE_MIN`], then reads the daemon's resources.
pub(crate) fn settle(pid: u32, c: &mut Client, fds_start: usize) -> anyhow::Result<(Snapshot, f64)> {
    let t = Instant::now();
    loop {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).context("daemon gone")?.count();
        if (fds == fds_start && t.elapsed() >= SETTLE_MIN) || t.elapsed() >= SETTLE_MAX {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((Snapshot::take(pid, c)?, t.elapsed().as_secs_f64()))
}

/// The cache gauges of `model` (null where absent).
pub(crate) fn cache_state(c: &mut Client, model: &str) -> serde_json::Value {
    let text = c.stats_text().unwrap_or_default();
    let v = |name| gatid::telemetry::summary::model_value(&text, name, model);
    let us = |name| v(name).map(|s| s * 1e6);
    serde_json::json!({
        "generation": v(names::CACHE_GENERATION),
        "expected_us": us(names::CACHE_EXPECTED_LATENCY_SECONDS),
        "baseline_us": us(names::CACHE_BASELINE_LATENCY_SECONDS),
        "memory_bytes": v(names::CACHE_MEMORY_BYTES),
        "live_disagreement": v(names::CACHE_LIVE_DISAGREEMENT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_bytes_sums_its_series_and_ignores_others() {
        let text = "# HELP gati_queued_bytes x\ngati_queued_bytes 10\ngati_queued_bytes_max 99\n\
                    gati_queued_bytes{model=\"a\"} 5\n";
        assert_eq!(queued_bytes(text), Some(15.0));
        assert_eq!(queued_bytes("gati_requests_total 3\n"), None);
    }
}
