//! Proactive warm pools: how many workers each function keeps per SGS.
//!
//! target = clamp(⌈λ × E × (1 + headroom)⌉, min_warm, max_warm), with λ the
//! arrival rate of invocations and E the expected execution time (Little's
//! law: λ × E workers are busy on average). λ is the larger of a short
//! (last two 250 ms windows) and a long (last 2 s) rate, so the pool grows
//! within a window of a rise and shrinks only as the long window forgets.
//! Workers above target that have been idle for `keep_alive` are retired.
//! A start made because work was waiting with no idle or starting worker is
//! a *cold start* (on the critical path) and is counted; starts toward the
//! target are *prestarts* (off the path).
//!
//! In on-demand mode (the OpenWhisk-style baseline) the target is 0: workers
//! are only ever started for waiting work (every start is a cold start) and
//! each is reaped once idle for `keep_alive`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::function::WarmBounds;

/// Width of one rate window.
pub const RATE_WINDOW: Duration = Duration::from_millis(250);
/// Windows in the long rate.
const LONG_WINDOWS: usize = 8;

/// Arrival rate over recent fixed windows.
#[derive(Debug, Clone)]
pub struct ArrivalRate {
    /// (window start, arrivals), oldest first; the last is the current window.
    windows: VecDeque<(Instant, u32)>,
}

impl ArrivalRate {
    pub fn new(now: Instant) -> Self {
        Self { windows: VecDeque::from([(now, 0)]) }
    }

    fn roll(&mut self, now: Instant) {
        let mut last = self.windows.back().map_or(now, |w| w.0);
        while now >= last + RATE_WINDOW {
            last += RATE_WINDOW;
            self.windows.push_back((last, 0));
            if self.windows.len() > LONG_WINDOWS + 1 {
                self.windows.pop_front();
            }
            if now >= last + RATE_WINDOW * (LONG_WINDOWS as u32 + 1) {
                // Long idle: start over rather than step through every empty window.
                self.windows.clear();
                self.windows.push_back((now, 0));
                return;
            }
        }
    }

    pub fn record(&mut self, now: Instant) {
        self.roll(now);
        if let Some(w) = self.windows.back_mut() {
            w.1 += 1;
        }
    }

    /// Arrivals per second: max of the short and the long estimate.
    pub fn per_second(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let Some(&(cur_start, _)) = self.windows.back() else { return 0.0 };
        let cur_elapsed = now.saturating_duration_since(cur_start).as_secs_f64();
        let rate = |n: usize| {
            let ws: Vec<&(Instant, u32)> = self.windows.iter().rev().take(n).collect();
            let count: u32 = ws.iter().map(|w| w.1).sum();
            let span = (ws.len() - 1) as f64 * RATE_WINDOW.as_secs_f64() + cur_elapsed;
            if span <= 0.0 {
                0.0
            } else {
                f64::from(count) / span.max(RATE_WINDOW.as_secs_f64())
            }
        };
        rate(2).max(rate(LONG_WINDOWS + 1))
    }
}

/// Workers to keep for `rate` arrivals/s of `exec` each.
pub fn target(bounds: &WarmBounds, rate: f64, exec: Duration) -> usize {
    let want = (rate * exec.as_secs_f64() * (1.0 + bounds.headroom)).ceil();
    let want = if want.is_finite() && want > 0.0 { want.min(1e6) as usize } else { 0 };
    want.clamp(bounds.min, bounds.max)
}

/// One function's workers in one SGS, by worker key `K`.
#[derive(Debug)]
pub struct FunctionPool<K> {
    pub bounds: WarmBounds,
    pub rate: ArrivalRate,
    /// Idle workers and since when, most recently idle last.
    idle: Vec<(K, Instant)>,
    pub busy: usize,
    pub starting: usize,
    pub cold_starts: u64,
    pub prestarts: u64,
    /// After a failed start, no new starts before this.
    paused_until: Option<Instant>,
    /// Starts that failed since the last one that succeeded.
    failed_starts: u32,
    /// Start only for waiting work; no warm target.
    on_demand: bool,
}

impl<K: Copy + PartialEq> FunctionPool<K> {
    pub fn new(bounds: WarmBounds, now: Instant) -> Self {
        Self {
            bounds,
            rate: ArrivalRate::new(now),
            idle: Vec::new(),
            busy: 0,
            starting: 0,
            cold_starts: 0,
            prestarts: 0,
            paused_until: None,
            failed_starts: 0,
            on_demand: false,
        }
    }

    /// Turns the pool into an on-demand one (see the module docs).
    pub fn on_demand(mut self) -> Self {
        self.on_demand = true;
        self
    }

    /// Workers this pool aims to keep at `rate` arrivals/s of `exec` each.
    fn target(&self, rate: f64, exec: Duration) -> usize {
        if self.on_demand {
            0
        } else {
            target(&self.bounds, rate, exec)
        }
    }

    pub fn total(&self) -> usize {
        self.idle.len() + self.busy + self.starting
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// The most recently idle worker (so the others age toward retirement).
    pub fn take_idle(&mut self) -> Option<K> {
        let (k, _) = self.idle.pop()?;
        self.busy += 1;
        Some(k)
    }

    /// A busy worker finished.
    pub fn release(&mut self, k: K, now: Instant) {
        self.busy = self.busy.saturating_sub(1);
        self.idle.push((k, now));
    }

    /// A started worker joined the pool.
    pub fn started(&mut self, k: K, now: Instant) {
        self.starting = self.starting.saturating_sub(1);
        self.failed_starts = 0;
        self.idle.push((k, now));
    }

    /// A start failed: no new starts for `pause`. Returns the starts that
    /// failed in a row (a success resets the count).
    pub fn start_failed(&mut self, now: Instant, pause: Duration) -> u32 {
        self.starting = self.starting.saturating_sub(1);
        self.paused_until = Some(now + pause);
        self.failed_starts += 1;
        self.failed_starts
    }

    /// A worker is gone (crashed, killed); `busy` says whether it was running.
    pub fn remove(&mut self, k: K, busy: bool) {
        if busy {
            self.busy = self.busy.saturating_sub(1);
        } else {
            self.idle.retain(|(x, _)| *x != k);
        }
    }

    /// Workers to start now given `waiting` ready invocations: cold starts for
    /// waiting work no idle or starting worker covers, then prestarts up to
    /// the target. Counts both; the caller starts that many.
    pub fn starts_needed(&mut self, now: Instant, exec: Duration, waiting: usize) -> usize {
        if self.paused_until.is_some_and(|t| now < t) {
            return 0;
        }
        let room = self.bounds.max.saturating_sub(self.total());
        let cold = waiting.saturating_sub(self.idle.len() + self.starting).min(room);
        let rate = self.rate.per_second(now);
        let tgt = self.target(rate, exec);
        let pre = tgt.saturating_sub(self.total() + cold).min(room - cold);
        self.cold_starts += cold as u64;
        self.prestarts += pre as u64;
        self.starting += cold + pre;
        cold + pre
    }

    /// Idle workers to retire: above target and idle for `keep_alive`, oldest first.
    pub fn retire(&mut self, now: Instant, exec: Duration) -> Vec<K> {
        let rate = self.rate.per_second(now);
        let tgt = self.target(rate, exec);
        let mut out = Vec::new();
        while self.total() > tgt {
            match self.idle.first() {
                Some(&(k, since)) if now.saturating_duration_since(since) >= self.bounds.keep_alive => {
                    self.idle.remove(0);
                    out.push(k);
                }
                _ => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> WarmBounds {
        WarmBounds { min: 1, max: 16, keep_alive: Duration::from_millis(500), headroom: 0.25 }
    }

    /// Feeds `rate`/s arrivals for `secs` seconds from `*t`, advancing it.
    fn feed(p: &mut FunctionPool<u32>, t: &mut Instant, rate: u32, secs: u32) {
        let step = Duration::from_secs(1) / rate;
        for _ in 0..rate * secs {
            p.rate.record(*t);
            *t += step;
        }
    }

    #[test]
    fn target_is_rate_times_exec_plus_headroom() {
        let b = bounds();
        assert_eq!(target(&b, 0.0, Duration::from_millis(10)), 1, "min_warm");
        // 200/s × 20 ms = 4 busy, +25 % = 5
        assert_eq!(target(&b, 200.0, Duration::from_millis(20)), 5);
        assert_eq!(target(&b, 10_000.0, Duration::from_millis(20)), 16, "max_warm");
    }

    #[test]
    fn pool_follows_a_rate_change_up_and_down() {
        let t0 = Instant::now();
        let mut t = t0;
        let exec = Duration::from_millis(20);
        let mut p: FunctionPool<u32> = FunctionPool::new(bounds(), t0);
        assert_eq!(p.starts_needed(t, exec, 0), 1, "min_warm prestarted");
        p.started(0, t);

        // 400/s × 20 ms × 1.25 = 10 workers, reached within the first windows.
        feed(&mut p, &mut t, 400, 1);
        let n = p.starts_needed(t, exec, 0);
        assert_eq!(n, 9, "rate rise grows the pool");
        assert_eq!((p.prestarts, p.cold_starts), (10, 0));
        for k in 1..=9 {
            p.started(k, t);
        }
        assert!(p.retire(t, exec).is_empty(), "busy enough: nothing retires");

        // Rate drops to 50/s: target 2; idle workers retire only after keep-alive
        // and once the long window forgot the burst.
        feed(&mut p, &mut t, 50, 1);
        let first = p.retire(t, exec);
        assert!(!first.is_empty() && first.len() < 8, "the long window still remembers: {first:?}");
        assert_eq!(first[0], 0, "oldest idle first");
        feed(&mut p, &mut t, 50, 2);
        let retired = p.retire(t, exec);
        assert_eq!(p.total(), 2, "retired {retired:?}");
        assert_eq!(p.starts_needed(t, exec, 0), 0);
    }

    #[test]
    fn waiting_work_without_worker_is_a_cold_start_bounded_by_max() {
        let t = Instant::now();
        let exec = Duration::from_millis(1);
        let mut p: FunctionPool<u32> =
            FunctionPool::new(WarmBounds { min: 0, max: 2, keep_alive: Duration::ZERO, headroom: 0.0 }, t);
        assert_eq!(p.starts_needed(t, exec, 0), 0);
        assert_eq!(p.starts_needed(t, exec, 5), 2, "never past max_warm");
        assert_eq!(p.cold_starts, 2);
        assert_eq!(p.starts_needed(t, exec, 5), 0, "starting workers cover the wait");
        p.started(1, t);
        assert_eq!(p.take_idle(), Some(1));
        p.remove(1, true);
        assert_eq!(p.total(), 1);
    }

    #[test]
    fn on_demand_starts_only_cold_and_reaps_after_keep_alive() {
        let t0 = Instant::now();
        let mut t = t0;
        let exec = Duration::from_millis(20);
        let mut p: FunctionPool<u32> = FunctionPool::new(bounds(), t0).on_demand();
        assert_eq!(p.starts_needed(t, exec, 0), 0, "no min_warm prestart");
        feed(&mut p, &mut t, 400, 1);
        assert_eq!(p.starts_needed(t, exec, 0), 0, "a high rate starts nothing by itself");
        assert_eq!(p.starts_needed(t, exec, 3), 3, "waiting work starts workers");
        assert_eq!((p.cold_starts, p.prestarts), (3, 0), "every on-demand start is cold");
        for k in 0..3 {
            p.started(k, t);
        }
        assert!(p.retire(t, exec).is_empty(), "idle for less than keep-alive");
        let later = t + bounds().keep_alive;
        assert_eq!(p.retire(later, exec).len(), 3, "all reaped after keep-alive despite the rate");
    }
}
