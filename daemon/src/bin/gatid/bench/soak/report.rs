//! The soak's verdict: totals, per-class counts and the resource series as
//! `bench/results/soak.json`, a PNG of RSS over time, a printed summary, and
//! an error (non-zero exit) naming every check that failed.

use serde_json::json;

use super::monitor::{Series, Snapshot};
use super::{hostile, traffic, Args};
use crate::bench::harness::write_json;

/// Target: RSS after the load at most this × RSS after warm-up.
const RSS_GROWTH_TARGET: f64 = 1.1;

/// Everything one soak run measured.
pub(crate) struct Report<'a> {
    pub args: &'a Args,
    /// The cached model's disagreement budget.
    pub budget: f64,
    pub load_secs: f64,
    pub start: Snapshot,
    pub end: Snapshot,
    pub settle_s: f64,
    /// Why the daemon could not be read after the load (it exited).
    pub gone: Option<String>,
    pub series: &'a Series,
    pub valid: &'a traffic::Tallies,
    pub hostile: &'a hostile::Tallies,
    /// The cache gauges after the load.
    pub cache_state: serde_json::Value,
    pub trained_before_load: bool,
    /// A new client after the load got a right answer and Health said ok.
    pub still_serving: Result<(), String>,
    /// SIGTERM ended the daemon cleanly.
    pub stopped: Result<(), String>,
}

impl Report<'_> {
    /// Prints, writes the JSON and the plot; errors if any check failed.
    pub fn finish(self) -> anyhow::Result<()> {
        let v = self.valid;
        let valid = v.sum(|c| c.sent);
        let hostile = self.hostile.sum(|c| c.sent);
        let requests = valid + hostile;
        let lost = v.sum(|c| c.lost);
        let errored = v.sum(|c| c.errors.values().sum());
        let cached = v.per_class.get("infer_fmnist_cached").cloned().unwrap_or_default();
        let cached_answers = cached.ok + cached.disagreements;
        let allowed = (self.budget * cached_answers as f64).floor() as u64;
        let over_budget = cached.disagreements.saturating_sub(allowed);
        let mismatched = v.sum(|c| c.mismatched) + v.foreign + over_budget;
        let violations = self.hostile.sum(|c| c.violations);
        let rss_warm = self.series.rss_warm_mb.unwrap_or(self.start.rss_mb);
        let rss_peak = self.series.rss_peak_mb().max(self.start.rss_mb).max(self.end.rss_mb);
        let rss_ok = self.end.rss_mb <= RSS_GROWTH_TARGET * rss_warm;
        let queued_peak = self.series.samples.iter().filter_map(|s| s.at.queued_bytes).reduce(f64::max);
        let result = json!({
            "quick": self.args.quick,
            "clients": self.args.clients,
            "window_per_client": super::WINDOW,
            "hostile_share": super::HOSTILE_SHARE,
            "expanding_shapes": !self.args.no_expanding,
            "stalled_headers": !self.args.no_stalled_headers,
            "requests": requests,
            "valid": valid,
            "hostile": hostile,
            "seconds": self.load_secs,
            "req_per_s": requests as f64 / self.load_secs,
            "lost": lost,
            "duplicated": v.duplicated,
            "mismatched": mismatched,
            "mismatched_foreign_id": v.foreign,
            "errored": errored,
            "reconnects": v.reconnects,
            "hostile_violations": violations,
            "cache": {
                "model": "fmnist", "budget": self.budget, "answers": cached_answers,
                "from_cache": cached.cache_answers, "disagreements": cached.disagreements,
                "disagreement_rate": cached.disagreements as f64 / cached_answers.max(1) as f64,
                "over_budget": over_budget, "trained_before_load": self.trained_before_load,
                "after_load": self.cache_state,
            },
            "rss_start_mb": self.start.rss_mb,
            "rss_warm_mb": rss_warm,
            "rss_peak_mb": rss_peak,
            "rss_hwm_mb": self.end.hwm_mb,
            "rss_end_mb": self.end.rss_mb,
            "rss_end_over_warm": self.end.rss_mb / rss_warm,
            "rss_target_met": rss_ok,
            "fds_start": self.start.fds,
            "fds_end": self.end.fds,
            "queued_bytes_peak": queued_peak,
            "settle_s": self.settle_s,
            "daemon_gone": self.gone,
            "still_serving": self.still_serving.as_ref().err(),
            "clean_stop": self.stopped.as_ref().err(),
            "per_class": { "valid": v.per_class, "hostile": self.hostile.per_class },
            "series": self.series.samples,
        });
        self.print(&result, rss_ok);
        write_json(&self.args.out, &result)?;
        let points: Vec<(f64, f64)> = self.series.samples.iter().map(|s| (s.t_s, s.at.rss_mb)).collect();
        crate::bench::plot::over_time(&self.args.plot, &points, RSS_GROWTH_TARGET * rss_warm)?;
        println!("wrote {} and {}", self.args.out.display(), self.args.plot.display());

        let mut failed = Vec::new();
        for (what, n) in [
            ("lost", lost),
            ("duplicated", v.duplicated),
            ("mismatched", mismatched),
            ("valid requests answered with an error", errored),
            ("hostile frames answered Ok or not at all", violations),
        ] {
            if n > 0 {
                failed.push(format!("{n} {what}"));
            }
        }
        if errored > 0 {
            let by_class: Vec<String> = v
                .per_class
                .iter()
                .filter(|(_, c)| !c.errors.is_empty())
                .map(|(k, c)| format!("{k} {:?}", c.errors))
                .collect();
            failed.push(format!("errors by class: {}", by_class.join(", ")));
        }
        if self.end.fds != self.start.fds {
            failed.push(format!("fds {} at the end vs {} at the start", self.end.fds, self.start.fds));
        }
        if let Some(e) = &self.gone {
            failed.push(format!("daemon gone after the load: {e}"));
        }
        if let Err(e) = &self.still_serving {
            failed.push(format!("not serving after the load: {e}"));
        }
        if let Err(e) = &self.stopped {
            failed.push(format!("no clean stop: {e}"));
        }
        anyhow::ensure!(failed.is_empty(), "soak failed: {}", failed.join("; "));
        Ok(())
    }

    fn print(&self, r: &serde_json::Value, rss_ok: bool) {
        println!();
        println!(
            "{} requests ({} valid, {} hostile) in {:.1} s, {:.0} req/s",
            r["requests"],
            r["valid"],
            r["hostile"],
            self.load_secs,
            r["req_per_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "lost {}  duplicated {}  mismatched {}  errored {}  hostile violations {}",
            r["lost"], r["duplicated"], r["mismatched"], r["errored"], r["hostile_violations"]
        );
        let c = &r["cache"];
        let us = |v: &serde_json::Value| v.as_f64().map_or_else(|| "n/a".into(), |x| format!("{x:.0}"));
        println!(
            "fmnist cache: {} of {} answers from a cache, {} disagree ({:.3} %, budget {:.1} %); generation {}, expected {} vs {} us/row",
            c["from_cache"],
            c["answers"],
            c["disagreements"],
            c["disagreement_rate"].as_f64().unwrap_or(0.0) * 100.0,
            self.budget * 100.0,
            c["after_load"]["generation"],
            us(&c["after_load"]["expected_us"]),
            us(&c["after_load"]["baseline_us"]),
        );
        println!("{:<26} {:>8} {:>8} {:>6} {:>10}  errors", "valid class", "sent", "ok", "lost", "mismatched");
        for (k, n) in &self.valid.per_class {
            println!("{k:<26} {:>8} {:>8} {:>6} {:>10}  {:?}", n.sent, n.ok, n.lost, n.mismatched, n.errors);
        }
        println!("{:<26} {:>8} {:>10}  outcomes", "hostile class", "sent", "violations");
        for (k, n) in &self.hostile.per_class {
            println!("{k:<26} {:>8} {:>10}  {:?}", n.sent, n.violations, n.outcomes);
        }
        println!(
            "RSS MB: start {:.1}, after warm-up {:.1}, peak {:.1} (VmHWM {:.1}), end {:.1} = {:.3} × warm ({} ≤ {RSS_GROWTH_TARGET})",
            self.start.rss_mb,
            r["rss_warm_mb"].as_f64().unwrap_or(0.0),
            r["rss_peak_mb"].as_f64().unwrap_or(0.0),
            self.end.hwm_mb,
            self.end.rss_mb,
            r["rss_end_over_warm"].as_f64().unwrap_or(0.0),
            if rss_ok { "met:" } else { "MISSED:" }
        );
        println!(
            "fds: start {}, end {} (after {:.1} s settle); queued bytes peak {}",
            self.start.fds,
            self.end.fds,
            self.settle_s,
            r["queued_bytes_peak"].as_f64().map_or_else(|| "n/a".into(), |q| format!("{q:.0}"))
        );
    }
}
