//! The caches of one model at run time: the active cache per cut, the window
//! of recent full-model answers, the background trainer, and the live
//! disagreement measured by shadow checks.
//!
//! Serving reads [`ModelCaches::active`] (an `Arc` swapped whole) and reports
//! what happened. The trainer runs paced at SCHED_BATCH, so serving never waits
//! on a lock it holds (a preempted trainer holding a lock would stall the
//! batcher for milliseconds: priority inversion): the batcher only `try_lock`s
//! the window (a busy window drops that batch's samples) and picks up new
//! caches the trainer *offers* with `try_lock`; `active` is written only by
//! serving-side threads. Memory crosses threads one way only: the trainer
//! deep-copies the window, and caches it built are freed on its own thread
//! (serving hands replaced sets back): glibc frees into the allocating
//! thread's arena under that arena's lock, which a preempted trainer may hold.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use super::placement::{place, CutOption, CutState, Plan, Problem};
use super::policy::min_certifiable_rows;

mod live;
use super::store;
use super::train::{self, Candidate};
use super::CutCache;
use crate::config::CacheConfig;
pub use live::PROBATION_HITS;

/// One cut's cache and threshold.
#[derive(Clone)]
pub struct CutEntry {
    pub cache: Arc<dyn CutCache>,
    pub threshold: f32,
}

/// The caches serving uses now, one slot per cut: 0 = the model input, i = the end
/// of stage i (the last stage's end is the model's answer, so it has none).
#[derive(Clone, Default)]
pub struct Active {
    pub cuts: Vec<Option<CutEntry>>,
    /// Trainings so far (0 = nothing trained yet).
    pub generation: u64,
    /// The placement that chose these caches (none before the first training).
    pub plan: Option<Plan>,
}

/// One full-model answer with the features it had at every cut.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Pooled features per cut (empty for a cut without features).
    pub features: Vec<Vec<f32>>,
    pub label: u32,
    /// Requests this row stands for: 1, or 1/shadow_fraction for a hit that was
    /// recorded only because it was shadow-checked.
    pub weight: f32,
}

/// Counters per cut.
#[derive(Debug, Default)]
pub struct CutStats {
    pub hits: AtomicU64,
    pub shadow_checks: AtomicU64,
    pub shadow_mismatches: AtomicU64,
}

/// A model's caches.
pub struct ModelCaches {
    pub config: CacheConfig,
    /// The model's name (metrics label).
    pub name: String,
    pub classes: usize,
    active: RwLock<Arc<Active>>,
    /// A newly trained set waiting for the batcher to install it, and replaced
    /// sets waiting for the trainer to free them.
    offered: Mutex<Offer>,
    /// Trainings so far (the trainer's count; `Active::generation` lags it until installed).
    generation: AtomicU64,
    /// Rows in the window, and whether a training was asked for (CacheTrain, shadow checks).
    window_rows: std::sync::atomic::AtomicUsize,
    force: AtomicBool,
    /// Hits still to be withheld and judged by the full model (see [`PROBATION_HITS`]).
    probation: AtomicU64,
    window: Mutex<Window>,
    wake: Condvar,
    stop: AtomicBool,
    /// Rows answered (hits and full runs) since the last decay.
    pub rows: AtomicU64,
    pub stats: Vec<CutStats>,
    /// Fraction of the budget the next tuning may spend (f32 bits): lowered when
    /// live disagreement runs over budget, raised back slowly when under it.
    budget_scale: std::sync::atomic::AtomicU32,
    /// Current cost of each stage, µs per row (from the model's cost model).
    stage_costs: StageCosts,
    /// The model's last answer per connection (the stream prior).
    last: Mutex<HashMap<u64, u32>>,
    /// Identifies the model and settings the saved state belongs to.
    fingerprint: u64,
}

/// Reads the model's current per-stage costs, µs per row.
pub type StageCosts = Box<dyn Fn() -> Vec<f64> + Send + Sync>;

/// Largest share of the budget a tuning may spend (also the starting share):
/// the rest absorbs what certifying on the window cannot see — the choice
/// among many cuts, predictors and budget shares on the same held-out rows,
/// and hits known only through the few shadow-checked ones (each standing
/// for 1/shadow_fraction requests). Measured on EfficientNet's recurring and
/// shuffled streams: 0.8 gave 1.18 %, 0.7 gave 1.03–1.10 % against a 1 %
/// budget — served disagreement ~1.5× what the window certified.
const MAX_BUDGET_SCALE: f32 = 0.5;

/// Shadow checks (over all cuts) the live estimate needs before the tuning
/// follows it, and before its counters are halved to follow the stream.
const LIVE_CHECKS: u64 = 100;

/// Connections remembered for the stream prior before the map is cleared.
const MAX_STREAMS: usize = 65_536;

struct Window {
    samples: VecDeque<Sample>,
    fresh: usize,
}

#[derive(Default)]
struct Offer {
    next: Option<Arc<Active>>,
    retired: Vec<Arc<Active>>,
}

impl ModelCaches {
    /// Caches for a model with `cuts` cut slots (one per stage: the input and every
    /// stage end but the last) and `classes` outputs;
    /// starts the trainer thread (it holds only a weak reference).
    pub fn start(
        config: CacheConfig,
        cuts: usize,
        classes: usize,
        name: &str,
        stage_costs: StageCosts,
        fingerprint: u64,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            config,
            name: name.to_string(),
            classes,
            active: RwLock::new(Arc::new(Active { cuts: vec![None; cuts], generation: 0, plan: None })),
            offered: Mutex::new(Offer::default()),
            generation: AtomicU64::new(0),
            window_rows: std::sync::atomic::AtomicUsize::new(0),
            force: AtomicBool::new(false),
            probation: AtomicU64::new(0),
            window: Mutex::new(Window { samples: VecDeque::new(), fresh: 0 }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            rows: AtomicU64::new(0),
            stats: (0..cuts).map(|_| CutStats::default()).collect(),
            budget_scale: std::sync::atomic::AtomicU32::new(MAX_BUDGET_SCALE.to_bits()),
            stage_costs,
            last: Mutex::new(HashMap::new()),
            fingerprint,
        });
        for c in 0..cuts {
            crate::telemetry::cache_cut_state(name, c, CutState::Untrained, 0.0);
        }
        me.restore();
        let weak = Arc::downgrade(&me);
        let thread = format!("train-{name}");
        std::thread::Builder::new().name(thread.clone()).spawn(move || {
            let beat = crate::liveness::node().register(thread, crate::liveness::Role::Trainer);
            // A panic in a training round loses that round only: the trainer
            // owns nothing but copies, so it starts again from the window.
            loop {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| trainer(weak.clone(), &beat))) {
                    Ok(()) => return,
                    Err(p) => {
                        let why = crate::liveness::panic_message(&*p);
                        tracing::error!(thread = %beat.name(), error = %why, "cache trainer panicked; restarting it");
                        crate::telemetry::thread_restarted("trainer");
                        beat.restarted(why);
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            }
        })?;
        Ok(me)
    }

    /// The caches to consult now (installs a set the trainer offered, if any:
    /// serving threads call this, never the trainer).
    pub fn active(&self) -> Arc<Active> {
        if let Ok(mut offered) = self.offered.try_lock() {
            if let Some(next) = offered.next.take() {
                let old = std::mem::replace(&mut *self.active.write().unwrap_or_else(|p| p.into_inner()), next);
                offered.retired.push(old);
            }
        }
        Arc::clone(&self.active.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds full-model answers to the window; wakes the trainer when enough are
    /// new. Never waits: if the trainer holds the window, these samples are dropped.
    pub fn record(&self, samples: impl IntoIterator<Item = Sample>) {
        let Ok(mut w) = self.window.try_lock() else { return };
        for s in samples {
            if w.samples.len() == self.config.window {
                w.samples.pop_front();
            }
            w.samples.push_back(s);
            w.fresh += 1;
        }
        self.window_rows.store(w.samples.len(), Ordering::Relaxed);
        if w.fresh >= self.config.retrain_every && w.samples.len() >= self.config.min_samples {
            self.wake.notify_one();
        }
    }

    /// Asks the trainer to train now (calibration finished, or a cut proved
    /// wrong): returns the current generation, the window's rows and the rows a
    /// training needs. Never waits.
    pub fn train_now(&self) -> (u64, usize, usize) {
        self.force.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        (self.generation.load(Ordering::Relaxed), self.window_rows.load(Ordering::Relaxed), self.rows_needed())
    }

    /// Window rows a training needs: fewer cannot certify a single exit.
    fn rows_needed(&self) -> usize {
        let scale = f32::from_bits(self.budget_scale.load(Ordering::Relaxed));
        self.config.min_samples.max(min_certifiable_rows(self.config.budget * scale)).min(self.config.window)
    }

    /// The model's previous answer on each of `streams` (connections), if any.
    pub fn priors(&self, streams: &[u64]) -> Vec<Option<u32>> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        streams.iter().map(|s| last.get(s).copied()).collect()
    }

    /// Remembers the answer just given on `stream`.
    pub fn remember(&self, answers: impl IntoIterator<Item = (u64, u32)>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() > MAX_STREAMS {
            last.clear();
        }
        last.extend(answers);
    }

    /// Bytes held by the active caches.
    pub fn mem_bytes(&self) -> usize {
        self.active().cuts.iter().flatten().map(|e| e.cache.mem_bytes()).sum()
    }

    /// Fits candidate predictors at every cut on the window, predicts each row
    /// out of fold, and lets the placement optimizer pick the active cuts,
    /// predictors and thresholds; returns the new set.
    pub fn train(&self, samples: &[Sample]) -> Active {
        let cuts = self.stats.len();
        let labels: Vec<u32> = samples.iter().map(|s| s.label).collect();
        let weights: Vec<f32> = samples.iter().map(|s| s.weight).collect();
        let mut candidates: Vec<Vec<Candidate>> = (0..cuts)
            .map(|c| {
                let dim = samples.first().map_or(0, |s| s.features.get(c).map_or(0, Vec::len));
                if dim == 0 || samples.iter().any(|s| s.features.get(c).map_or(0, Vec::len) != dim) {
                    return Vec::new();
                }
                let x: Vec<f32> = samples.iter().flat_map(|s| s.features[c].iter().copied()).collect();
                train::candidates(&self.config, c, &x, dim, &labels, self.classes, self.config.stream_prior)
            })
            .collect();
        let options: Vec<Vec<CutOption>> =
            candidates.iter().map(|v| v.iter().map(|c| c.option.clone()).collect()).collect();
        let stage_us = (self.stage_costs)();
        let scale = self.adapt_budget_scale();
        let plan = place(&Problem {
            options: &options,
            labels: &labels,
            weights: &weights,
            stage_us: &stage_us,
            budget: self.config.budget * scale,
            max_memory_bytes: self.config.max_memory_bytes,
            shadow_fraction: f64::from(self.config.shadow_fraction),
            min_hits: weights.iter().sum::<f32>() / 50.0,
        });
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Active {
            cuts: plan
                .choice
                .iter()
                .zip(candidates.iter_mut())
                .map(|(choice, cands)| {
                    choice.map(|(k, threshold)| CutEntry { cache: Arc::clone(&cands[k].cache), threshold })
                })
                .collect(),
            generation,
            plan: Some(plan),
        }
    }

    /// Sets the share of the budget the next tuning may spend from the live
    /// disagreement since the last training, then halves the counters so the
    /// estimate follows the stream (older traffic weighs less).
    fn adapt_budget_scale(&self) -> f32 {
        let live = self.live_disagreement();
        let old = f32::from_bits(self.budget_scale.load(Ordering::Relaxed));
        let checks: u64 = self.stats.iter().map(|s| s.shadow_checks.load(Ordering::Relaxed)).sum();
        // With 5 % of hits shadow-checked, a round of 256 rows brings a handful of
        // checks: halving the counters every round kept them near 12, under any
        // threshold, so the scale never moved. They are halved only once there
        // are enough, and the estimate is followed only then.
        if checks < LIVE_CHECKS {
            return old;
        }
        let scale = if live > self.config.budget {
            (old * 0.6).max(0.05)
        } else if live < self.config.budget * 0.5 {
            (old * 1.15).min(MAX_BUDGET_SCALE)
        } else {
            old
        };
        self.budget_scale.store(scale.to_bits(), Ordering::Relaxed);
        let halve = |a: &AtomicU64| a.store(a.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
        halve(&self.rows);
        for s in &self.stats {
            halve(&s.hits);
            halve(&s.shadow_checks);
            halve(&s.shadow_mismatches);
        }
        scale
    }

    /// Swaps in a new set of caches (serving-side threads only; the trainer
    /// offers); the replaced set goes back to the trainer to be freed.
    pub fn install(&self, active: Active) {
        let old = std::mem::replace(&mut *self.active.write().unwrap_or_else(|p| p.into_inner()), Arc::new(active));
        self.offered.lock().unwrap_or_else(|p| p.into_inner()).retired.push(old);
    }

    /// Hands a newly trained set to serving, which installs it at its next
    /// batch; frees (here, on the trainer's thread) the sets serving replaced.
    fn offer(&self, active: Option<Arc<Active>>) {
        let retired = {
            let mut o = self.offered.lock().unwrap_or_else(|p| p.into_inner());
            if active.is_some() {
                o.next = active;
            }
            std::mem::take(&mut o.retired)
        };
        drop(retired);
    }
}

impl ModelCaches {
    /// Loads saved state (if the config names a state file and it matches this model).
    fn restore(&self) {
        let Some(path) = &self.config.state_file else { return };
        store::remove_stale_temporaries(path);
        let state = match store::load(path, self.fingerprint) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(model = %self.name, error = %e, "cache state not loaded; starting cold");
                return;
            }
        };
        let cuts = self.stats.len();
        let restored: Vec<Option<CutEntry>> = (0..cuts)
            .map(|c| {
                let (p, threshold) = state.meta.cuts.get(c).cloned().flatten()?;
                Some(CutEntry { cache: p.into_cache(), threshold })
            })
            .collect();
        let active = restored.iter().filter(|c| c.is_some()).count();
        let restored_states: Vec<CutState> =
            restored.iter().map(|c| if c.is_some() { CutState::Active } else { CutState::Untrained }).collect();
        let rows = state.window.len();
        {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            w.samples = state.window.into_iter().filter(|s| s.features.len() == cuts).collect();
            while w.samples.len() > self.config.window {
                w.samples.pop_front();
            }
            self.window_rows.store(w.samples.len(), Ordering::Relaxed);
            // Kinds rebuilt from the window (k-NN) are retrained at once.
            w.fresh = if state.meta.cuts.iter().all(Option::is_none) { self.config.retrain_every } else { 0 };
        }
        self.generation.store(state.meta.generation, Ordering::Relaxed);
        self.budget_scale.store(state.meta.budget_scale.clamp(0.05, MAX_BUDGET_SCALE).to_bits(), Ordering::Relaxed);
        self.install(Active { cuts: restored, generation: state.meta.generation, plan: None });
        self.start_probation();
        crate::telemetry::cache_trained(&self.name, state.meta.generation, 0.0, 0.0);
        for (c, e) in restored_states.iter().enumerate() {
            crate::telemetry::cache_cut_state(&self.name, c, *e, 0.0);
        }
        tracing::info!(model = %self.name, rows, active_cuts = active, generation = state.meta.generation, "cache state restored");
    }

    /// Saves the active caches and the window (no-op without a state file).
    pub fn persist(&self) {
        self.persist_with(&self.active());
    }

    /// Saves `active` and the window.
    fn persist_with(&self, active: &Active) {
        let Some(path) = &self.config.state_file else { return };
        let window: Vec<Sample> =
            self.window.lock().unwrap_or_else(|p| p.into_inner()).samples.iter().cloned().collect();
        let meta = store::Meta {
            generation: active.generation,
            budget_scale: f32::from_bits(self.budget_scale.load(Ordering::Relaxed)),
            cuts: active
                .cuts
                .iter()
                .map(|c| c.as_ref().and_then(|e| Some((e.cache.persist()?, e.threshold))))
                .collect(),
        };
        if let Err(e) = store::save(path, self.fingerprint, &store::State { meta, window }) {
            tracing::warn!(model = %self.name, error = %e, "cache state not saved");
        }
    }
}

impl Drop for ModelCaches {
    fn drop(&mut self) {
        self.persist();
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_all();
    }
}

/// The background trainer: waits for fresh samples, trains off the serving
/// path at low priority, swaps the result in. Ends when the model is dropped.
fn trainer(me: std::sync::Weak<ModelCaches>, beat: &crate::liveness::Beat) {
    // SCHED_BATCH at nice 0, paced to its share (`cache::pace`, 100 µs at a
    // time): a guaranteed small share of the CPU, never a busy thread. The
    // trainer used to run at SCHED_IDLE, which any serving thread preempts at
    // once, but which also starves it whenever anything else on the machine is
    // busy: on a loaded 2-vCPU machine no training finished in minutes, so the
    // caches never came up. SCHED_BATCH keeps the scheduler from preempting a
    // woken serving thread in its favour; the pacing keeps its slices short.
    // (Unpaced, nice 10 raised serving p99 from 0.7 to 3.1 ms: a woken thread
    // waited out the trainer's slice.)
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 = the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "trainer stays SCHED_OTHER");
    }
    let mut last_save: Option<Instant> = None;
    loop {
        beat.beat();
        let Some(caches) = me.upgrade() else { return };
        let forced;
        // A deep copy: the trainer must not end up freeing serving's allocations.
        let samples: Vec<Sample> = {
            let w = caches.window.lock().unwrap_or_else(|p| p.into_inner());
            // Out-of-fold tuning holds every row out once; fewer rows than this
            // cannot certify a single exit, so training earlier would only cost CPU.
            let needed = caches.rows_needed();
            let ready = |w: &Window| {
                (w.fresh >= caches.config.retrain_every || caches.force.load(Ordering::Relaxed))
                    && w.samples.len() >= needed
            };
            let (mut w, _) = caches
                .wake
                .wait_timeout_while(w, std::time::Duration::from_millis(500), |w| {
                    !ready(w) && !caches.stop.load(Ordering::Relaxed)
                })
                .unwrap_or_else(|p| p.into_inner());
            if caches.stop.load(Ordering::Relaxed) {
                return;
            }
            if !ready(&w) {
                drop(w);
                caches.offer(None);
                continue;
            }
            w.fresh = 0;
            forced = caches.force.swap(false, Ordering::Relaxed);
            w.samples.iter().cloned().collect()
        };
        let t0 = Instant::now();
        // The CPU share is held inside training (`cache::pace`), ~1 ms at a time;
        // the pace clock starts now, not when the trainer began waiting.
        super::set_pace(caches.config.trainer_cpu_share);
        let active = caches.train(&samples);
        let summary: Vec<String> = active
            .cuts
            .iter()
            .map(|c| c.as_ref().map_or("off".into(), |e| format!("{} {:.3}", e.cache.kind(), e.threshold)))
            .collect();
        let (expected_us, baseline_us) = active.plan.as_ref().map_or((0.0, 0.0), |p| (p.expected_us, p.baseline_us));
        tracing::info!(
            samples = samples.len(),
            took_ms = t0.elapsed().as_millis() as u64,
            thresholds = ?summary,
            expected_us = format!("{expected_us:.1}"),
            baseline_us = format!("{baseline_us:.1}"),
            "caches retrained"
        );
        // Offered first, announced after: whoever sees the new generation in the
        // metrics gets the new caches from its next batch on.
        let active = Arc::new(active);
        caches.offer(Some(Arc::clone(&active)));
        // The first caches, and caches trained on rows that were not live, are
        // judged on live traffic before they answer.
        if forced || active.generation == 1 {
            caches.start_probation();
        }
        let mem: usize = active.cuts.iter().flatten().map(|e| e.cache.mem_bytes()).sum();
        crate::telemetry::cache_state(&caches.name, caches.live_disagreement(), mem);
        crate::telemetry::cache_trained(&caches.name, active.generation, expected_us, baseline_us);
        if let Some(plan) = &active.plan {
            for (c, (&state, &share)) in plan.state.iter().zip(&plan.exit_share).enumerate() {
                crate::telemetry::cache_cut_state(&caches.name, c, state, share);
            }
        }
        // Saving writes the whole window: at most every 30 s (and when the model goes).
        if last_save.is_none_or(|t: Instant| t.elapsed() >= std::time::Duration::from_secs(30)) {
            caches.persist_with(&active);
            last_save = Some(Instant::now());
        }
        drop(caches);
    }
}
