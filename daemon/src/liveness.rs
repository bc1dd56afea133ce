//! Liveness of the daemon's long-running threads: heartbeats, restarts, deaths.
//!
//! Every data-plane thread (I/O, batcher, SGS) and every cache trainer
//! registers a [`Beat`] and beats each time round its loop; idle threads are
//! woken at least once per check period (their loops wait with a timeout, or
//! the control loop pokes them). The control loop sends `WATCHDOG=1` only
//! while every *critical* thread (I/O, batcher, SGS) has beaten within the
//! period and none has died; a critical thread that dies for good makes the
//! process exit non-zero so that systemd restarts it. Trainers are reported,
//! never gating: paced to a small CPU share, a round may rightly take long.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a thread does, and so whether its silence stops the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Io,
    Batcher,
    Sgs,
    Trainer,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Io => "io",
            Role::Batcher => "batcher",
            Role::Sgs => "sgs",
            Role::Trainer => "trainer",
        }
    }

    /// Threads without which the node does not serve.
    pub fn critical(self) -> bool {
        self != Role::Trainer
    }
}

/// How often an idle thread beats on its own (its wait's timeout).
pub const IDLE_BEAT: Duration = Duration::from_millis(500);

const RUNNING: u8 = 0;
/// Ended on purpose (drain, model removed, scheduler retired).
const ENDED: u8 = 1;
/// Died and was not restarted.
const DEAD: u8 = 2;

/// One thread's heartbeat.
#[derive(Debug)]
pub struct Beat {
    name: String,
    role: Role,
    base: Instant,
    /// ns since `base` of the last beat.
    last: AtomicU64,
    state: AtomicU8,
    restarts: AtomicU32,
    /// Why it last failed (panic message or error).
    last_error: Mutex<Option<String>>,
}

impl Beat {
    /// The thread made progress.
    pub fn beat(&self) {
        self.last.store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The thread failed and is being restarted in place.
    pub fn restarted(&self, why: String) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.beat();
    }

    /// The thread ended on purpose.
    pub fn ended(&self) {
        self.state.store(ENDED, Ordering::Release);
    }

    /// The thread died and will not come back.
    pub fn died(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.state.store(DEAD, Ordering::Release);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn since_beat(&self) -> Duration {
        let last = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// A thread's state as `Health` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadReport {
    pub name: String,
    pub role: &'static str,
    /// "running", "stalled" (no beat within the period), or "dead".
    pub state: &'static str,
    pub last_progress_ms: u64,
    pub restarts: u32,
    pub last_error: Option<String>,
}

/// Verdict of one check: may the watchdog be fed?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    /// A critical thread has not made progress within the period.
    Stalled(String),
    /// A critical thread died: the process must exit for a restart.
    Dead(String),
}

/// A registered thread's hold on its beat. Dropped while the thread unwinds
/// from a panic it marks the thread dead; dropped otherwise, ended.
#[derive(Debug)]
pub struct Heartbeat(Arc<Beat>);

impl std::ops::Deref for Heartbeat {
    type Target = Beat;
    fn deref(&self) -> &Beat {
        &self.0
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if self.0.state.load(Ordering::Acquire) != DEAD {
                self.0.died("panicked".into());
            }
        } else if self.0.state.load(Ordering::Acquire) == RUNNING {
            self.0.ended();
        }
    }
}

/// Every registered thread. Threads that ended are forgotten; dead ones stay
/// in the report.
#[derive(Debug, Default)]
pub struct Liveness {
    beats: Mutex<Vec<Arc<Beat>>>,
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a thread; it holds the returned heartbeat for as long as it runs.
    pub fn register(&self, name: impl Into<String>, role: Role) -> Heartbeat {
        let beat = Arc::new(Beat {
            name: name.into(),
            role,
            base: Instant::now(),
            last: AtomicU64::new(0),
            state: AtomicU8::new(RUNNING),
            restarts: AtomicU32::new(0),
            last_error: Mutex::new(None),
        });
        let mut beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats.retain(|b| b.state.load(Ordering::Acquire) != ENDED);
        beats.push(Arc::clone(&beat));
        Heartbeat(beat)
    }

    /// Threads that have not ended.
    fn all(&self) -> Vec<Arc<Beat>> {
        let beats = self.beats.lock().unwrap_or_else(|p| p.into_inner());
        beats.iter().filter(|b| b.state.load(Ordering::Acquire) != ENDED).cloned().collect()
    }

    /// Whether every critical thread beat within `period` and none died.
    pub fn check(&self, period: Duration) -> Verdict {
        let mut stalled = Vec::new();
        for b in self.all() {
            if !b.role.critical() {
                continue;
            }
            if b.state.load(Ordering::Acquire) == DEAD {
                let why = b.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
                return Verdict::Dead(format!("{} died: {why}", b.name));
            }
            let quiet = b.since_beat();
            if quiet > period {
                stalled.push(format!("{} ({} ms)", b.name, quiet.as_millis()));
            }
        }
        if stalled.is_empty() {
            Verdict::Alive
        } else {
            Verdict::Stalled(format!("no progress within {} ms: {}", period.as_millis(), stalled.join(", ")))
        }
    }

    /// Every thread's state, by name.
    pub fn report(&self, period: Duration) -> Vec<ThreadReport> {
        let mut out: Vec<ThreadReport> = self
            .all()
            .iter()
            .map(|b| {
                let quiet = b.since_beat();
                let state = match b.state.load(Ordering::Acquire) {
                    DEAD => "dead",
                    _ if quiet > period => "stalled",
                    _ => "running",
                };
                ThreadReport {
                    name: b.name.clone(),
                    role: b.role.name(),
                    state,
                    last_progress_ms: quiet.as_millis() as u64,
                    restarts: b.restarts(),
                    last_error: b.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The process's threads (one daemon per process; in-process tests and
/// benchmarks share it harmlessly).
pub fn node() -> &'static Liveness {
    static NODE: std::sync::OnceLock<Liveness> = std::sync::OnceLock::new();
    NODE.get_or_init(Liveness::default)
}

/// A panic's message, for logs and reports.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_or_dead_critical_thread_stops_the_watchdog_a_trainer_does_not() {
        let l = Liveness::new();
        let io = l.register("io-0", Role::Io);
        let trainer = l.register("train-m", Role::Trainer);
        io.beat();
        assert_eq!(l.check(Duration::from_secs(5)), Verdict::Alive);
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(l.check(Duration::from_millis(10)), Verdict::Stalled(s) if s.contains("io-0")));
        io.beat();
        trainer.died("boom".into());
        assert_eq!(l.check(Duration::from_secs(5)), Verdict::Alive, "trainers never gate");
        io.restarted("panicked".into());
        assert_eq!(io.restarts(), 1);
        io.died("gave up".into());
        assert!(matches!(l.check(Duration::from_secs(5)), Verdict::Dead(s) if s.contains("io-0")));
        let r = l.report(Duration::from_secs(5));
        assert_eq!(
            r.iter().map(|t| (t.name.as_str(), t.state)).collect::<Vec<_>>(),
            [("io-0", "dead"), ("train-m", "dead")]
        );
        // A thread that ended on purpose is forgotten; one that panicked is dead.
        drop(l.register("batch-x", Role::Batcher));
        assert_eq!(l.report(Duration::from_secs(5)).len(), 2);
        let l2 = Arc::clone(&l);
        let _ = std::thread::spawn(move || {
            let _hb = l2.register("sgs-0", Role::Sgs);
            panic!("sgs failed");
        })
        .join();
        assert!(matches!(l.check(Duration::from_secs(5)), Verdict::Dead(_)));
        assert_eq!(l.report(Duration::from_secs(5)).len(), 3);
        assert_eq!(panic_message(&*std::panic::catch_unwind(|| panic!("x {}", 1)).unwrap_err()), "x 1");
    }
}
