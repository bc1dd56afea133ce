//! Dynamic batching and deadlines, one thread per model.
//!
//! The I/O threads call [`ModelHandle::submit`]; admission control rejects a
//! job at once when its deadline cannot be met given the queue and the
//! measured stage costs. The batcher thread gathers jobs up to `max_batch`
//! rows, waiting at most `max_queue_delay` for more and never past the latest
//! start time of a queued job; jobs whose deadline passed in the queue are
//! answered [`JobResult::Expired`] instead of run. Dropping every handle of a
//! model drains its queue and ends the thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cost::ModelCost;
use super::model::{LoadedModel, ModelMeta};
use super::pipeline::Pipeline;
use super::InferError;
use crate::cache::model_caches::ModelCaches;
use crate::config::{InputConfig, ModelConfig};
use crate::telemetry;

/// What happened to a job.
#[derive(Debug)]
pub enum JobResult {
    /// The model's output rows for this job.
    Answer { data: Vec<f32>, shape: Vec<usize>, exit_stage: u16 },
    /// The deadline passed before the job could run.
    Expired,
    /// The model failed, or the job was dropped unanswered.
    Failed(String),
}

/// Where a job's answer goes (answered `Failed` if dropped unanswered: a
/// batcher died).
pub type Reply = crate::reply::Reply<JobResult>;

impl crate::reply::Unanswered for JobResult {
    fn unanswered() -> Self {
        JobResult::Failed("request dropped before it ran".into())
    }
}

/// One request's rows, already in the model's input layout.
pub struct Job {
    pub rows: usize,
    /// Which stream (connection) the job came on: the caches' stream prior.
    pub stream: u64,
    /// Calibration rows: run the whole model and feed the caches' window.
    pub calibrate: bool,
    pub data: Vec<f32>,
    pub deadline: Option<Instant>,
    pub reply: Reply,
}

/// Identifies the model bytes, cuts and cache settings saved cache state belongs to.
fn cache_fingerprint(config: &ModelConfig, meta: &ModelMeta, c: &crate::config::CacheConfig) -> u64 {
    let bytes = std::fs::read(&config.path).unwrap_or_default();
    let settings = format!("{:?}|{:?}|{}|{}|{}", c.kind, c.selector, c.hidden, c.stream_prior, meta.classes);
    let cuts = meta.stages.iter().map(|s| s.output.as_bytes());
    crate::cache::store::fingerprint(
        [bytes.as_slice(), settings.as_bytes(), super::exits::FEATURES_VERSION.as_bytes()].into_iter().chain(cuts),
    )
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The deadline cannot be met; the estimate is attached.
    Unmeetable { estimate: Duration },
    /// The batcher is gone.
    Closed,
    /// The queue holds `max_queue_rows` rows already.
    QueueFull,
}

/// The serving side of a loaded model, shared by the I/O threads.
pub struct ModelHandle {
    pub meta: ModelMeta,
    /// How client images become input rows.
    pub input: InputConfig,
    /// The config the model was loaded from (reload compares it).
    pub config: ModelConfig,
    /// The model's caches, if it has any.
    pub caches: Option<Arc<ModelCaches>>,
    pub cost: Arc<ModelCost>,
    tx: Sender<Job>,
    state: Arc<QueueState>,
    max_batch: usize,
    max_queue_rows: usize,
}

/// Queue facts the batcher publishes for admission control.
struct QueueState {
    base: Instant,
    queued_rows: AtomicUsize,
    /// Predicted end of the running batch, ns since `base`; 0 when idle.
    busy_until_ns: AtomicU64,
}

impl ModelHandle {
    /// Starts the batcher thread of a loaded model. With `busy_poll` > 0 the
    /// thread polls its queue that long after a batch before sleeping.
    pub fn start(model: LoadedModel, busy_poll: Duration) -> Result<Self, InferError> {
        let (tx, rx) = mpsc::channel();
        let cost = Arc::new(model.cost);
        let caches = match &model.config.cache {
            Some(c) => {
                let costs = Arc::clone(&cost);
                let stage_costs = Box::new(move || {
                    costs.stages.iter().map(|s| s.predict(1).as_secs_f64() * 1e6).collect::<Vec<f64>>()
                });
                Some(
                    ModelCaches::start(
                        c.clone(),
                        model.pipeline.len(),
                        model.meta.classes,
                        &model.meta.name,
                        stage_costs,
                        cache_fingerprint(&model.config, &model.meta, c),
                    )
                    .map_err(InferError::Thread)?,
                )
            }
            None => None,
        };
        let state = Arc::new(QueueState {
            base: Instant::now(),
            queued_rows: AtomicUsize::new(0),
            busy_until_ns: AtomicU64::new(0),
        });
        let batcher = Batcher {
            name: model.meta.name.clone(),
            rx,
            pipeline: model.pipeline,
            cost: Arc::clone(&cost),
            state: Arc::clone(&state),
            max_batch: model.config.max_batch,
            max_delay: Duration::from_micros(model.config.max_queue_delay_us),
            row_len: model.meta.row_shape.iter().product(),
            row_shape: model.meta.row_shape.clone(),
            carry: VecDeque::new(),
            busy_poll,
            caches: caches.clone(),
            logits: model.config.output == crate::config::OutputKind::Logits,
            rng: 0x9e37_79b9_7f4a_7c15,
            beat: None,
        };
        std::thread::Builder::new()
            .name(format!("batch-{}", model.meta.name))
            .spawn(move || batcher.run())
            .map_err(InferError::Thread)?;
        Ok(Self {
            meta: model.meta,
            input: model.config.input.clone(),
            max_batch: model.config.max_batch,
            max_queue_rows: model.config.max_queue_rows.unwrap_or(64 * model.config.max_batch),
            config: model.config,
            cost,
            tx,
            state,
            caches,
        })
    }

    /// Predicted time until a job of `rows` submitted now would be answered.
    pub fn estimate(&self, rows: usize) -> Duration {
        let now_ns = self.state.base.elapsed().as_nanos() as u64;
        let busy = self.state.busy_until_ns.load(Ordering::Relaxed);
        let running = Duration::from_nanos(busy.saturating_sub(now_ns));
        let queued = self.state.queued_rows.load(Ordering::Relaxed);
        let full = (queued / self.max_batch) as u32;
        running + self.cost.predict(self.max_batch) * full + self.cost.predict(queued % self.max_batch + rows)
    }

    /// Queues a job. With `admission`, a job whose deadline cannot be met is
    /// refused at once; without it, it is queued and may expire there.
    pub fn submit(&self, job: Job, admission: bool) -> Result<(), (Rejected, Job)> {
        if let (true, Some(deadline)) = (admission, job.deadline) {
            let estimate = self.estimate(job.rows);
            if Instant::now() + estimate > deadline {
                return Err((Rejected::Unmeetable { estimate }, job));
            }
        }
        let rows = job.rows;
        // Bounded whatever the deadline (no deadline skips admission, not this).
        let queued = self.state.queued_rows.fetch_add(rows, Ordering::Relaxed);
        if queued + rows > self.max_queue_rows {
            self.state.queued_rows.fetch_sub(rows, Ordering::Relaxed);
            return Err((Rejected::QueueFull, job));
        }
        telemetry::queue_depth(&self.meta.name, self.state.queued_rows.load(Ordering::Relaxed));
        self.tx.send(job).map_err(|e| {
            self.state.queued_rows.fetch_sub(rows, Ordering::Relaxed);
            (Rejected::Closed, e.0)
        })
    }

    /// What an Infer request for this model must fit (api::request checks it).
    pub fn target(&self) -> crate::api::request::InferTarget<'_> {
        crate::api::request::InferTarget {
            input: &self.input,
            row_shape: &self.meta.row_shape,
            max_batch: self.max_batch,
        }
    }

    /// Rows waiting in the queue.
    pub fn queued_rows(&self) -> usize {
        self.state.queued_rows.load(Ordering::Relaxed)
    }
}

struct Batcher {
    name: String,
    rx: Receiver<Job>,
    pipeline: Pipeline,
    cost: Arc<ModelCost>,
    state: Arc<QueueState>,
    max_batch: usize,
    max_delay: Duration,
    row_len: usize,
    row_shape: Vec<usize>,
    /// A job that did not fit the previous batch.
    carry: VecDeque<Job>,
    busy_poll: Duration,
    caches: Option<Arc<ModelCaches>>,
    logits: bool,
    rng: u64,
    beat: Option<crate::liveness::Heartbeat>,
}

impl Batcher {
    fn run(mut self) {
        tracing::debug!(model = %self.name, "batcher started");
        self.beat =
            Some(crate::liveness::node().register(format!("batch-{}", self.name), crate::liveness::Role::Batcher));
        while let Some(batch) = self.gather() {
            self.beat();
            // A panic in one batch answers that batch's jobs `Failed` (their
            // replies are dropped while unwinding); the sessions stay and the
            // batcher goes on with the next batch.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(batch)));
            if let Err(p) = ran {
                let why = crate::liveness::panic_message(&*p);
                tracing::error!(model = %self.name, error = %why, "batch panicked; its requests were answered Failed");
                telemetry::thread_restarted("batcher");
                if let Some(b) = &self.beat {
                    b.restarted(why);
                }
            }
        }
        tracing::debug!(model = %self.name, "batcher drained and stopped");
    }

    fn beat(&self) {
        if let Some(b) = &self.beat {
            b.beat();
        }
    }

    /// Next batch, or `None` once every sender is gone and the queue is empty.
    fn gather(&mut self) -> Option<Vec<Job>> {
        let first = match self.carry.pop_front() {
            Some(j) => j,
            None => self.next_job()?,
        };
        let mut rows = first.rows;
        let mut latest_start = self.latest_start(&first);
        let gather_until = Instant::now() + self.max_delay;
        let mut batch = vec![first];
        while rows < self.max_batch {
            let next = match self.carry.pop_front() {
                Some(j) => Some(j),
                None => match self.rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => {
                        let until = latest_start.map_or(gather_until, |l| l.min(gather_until));
                        let now = Instant::now();
                        if until <= now {
                            None
                        } else {
                            // Timeout or disconnect: run what we have.
                            self.rx.recv_timeout(until - now).ok()
                        }
                    }
                },
            };
            let Some(job) = next else { break };
            if rows + job.rows > self.max_batch {
                self.carry.push_back(job);
                break;
            }
            rows += job.rows;
            if let Some(l) = self.latest_start(&job) {
                latest_start = Some(latest_start.map_or(l, |x| x.min(l)));
            }
            batch.push(job);
        }
        Some(batch)
    }

    /// The next job: polled for `busy_poll` (yielding the core to anyone runnable),
    /// then waited for; `None` once every sender is gone.
    fn next_job(&mut self) -> Option<Job> {
        if !self.busy_poll.is_zero() {
            let until = Instant::now() + self.busy_poll;
            while Instant::now() < until {
                match self.rx.try_recv() {
                    Ok(j) => return Some(j),
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) => std::thread::yield_now(),
                }
            }
        }
        // Idle, it still beats: a silent batcher is a stuck one.
        loop {
            match self.rx.recv_timeout(crate::liveness::IDLE_BEAT) {
                Ok(j) => return Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => self.beat(),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Latest moment the job can start and still meet its deadline.
    fn latest_start(&self, job: &Job) -> Option<Instant> {
        job.deadline.map(|d| d.checked_sub(self.cost.predict(job.rows)).unwrap_or(d))
    }

    fn execute(&mut self, batch: Vec<Job>) {
        let now = Instant::now();
        let total: usize = batch.iter().map(|j| j.rows).sum();
        self.state.queued_rows.fetch_sub(total, Ordering::Relaxed);
        let (live, expired): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| j.deadline.is_none_or(|d| d > now));
        for job in expired {
            job.reply.send(JobResult::Expired);
        }
        if live.is_empty() {
            return;
        }
        let rows: usize = live.iter().map(|j| j.rows).sum();
        let predicted = self.cost.predict(rows);
        let end = self.state.base.elapsed() + predicted;
        self.state.busy_until_ns.store(end.as_nanos() as u64, Ordering::Relaxed);
        telemetry::batch_size(&self.name, rows);
        let calibrating = live.iter().any(|j| j.calibrate);
        let idle =
            self.caches.as_ref().filter(|c| c.idle_skip(calibrating, super::exits::unit(&mut self.rng))).cloned();
        if let Some(caches) = self.caches.clone().filter(|_| idle.is_none()) {
            let result = super::exits::run(
                &mut self.pipeline,
                &caches,
                live,
                &self.row_shape,
                self.logits,
                &self.name,
                &mut self.rng,
            );
            self.state.busy_until_ns.store(0, Ordering::Relaxed);
            telemetry::queue_depth(&self.name, self.state.queued_rows.load(Ordering::Relaxed));
            match result {
                Ok(stages) => {
                    for (i, (c, (n, t))) in self.cost.stages.iter().zip(stages).enumerate() {
                        c.observe(n, t);
                        telemetry::stage_time(&self.name, i + 1, t);
                    }
                }
                Err(e) => tracing::error!(model = %self.name, error = %e, rows, "model run failed"),
            }
            return;
        }

        let mut shape = vec![rows];
        shape.extend(&self.row_shape);
        let result = if live.len() == 1 {
            self.pipeline.run(&shape, &live[0].data)
        } else {
            let mut data = Vec::with_capacity(rows * self.row_len);
            for j in &live {
                data.extend_from_slice(&j.data);
            }
            self.pipeline.run(&shape, &data)
        };
        self.state.busy_until_ns.store(0, Ordering::Relaxed);
        telemetry::queue_depth(&self.name, self.state.queued_rows.load(Ordering::Relaxed));
        match result {
            Ok(out) => {
                for (i, (c, t)) in self.cost.stages.iter().zip(&out.stage_times).enumerate() {
                    c.observe(rows, *t);
                    telemetry::stage_time(&self.name, i + 1, *t);
                }
                let row_out = out.data.len() / rows.max(1);
                let exit_stage = u16::try_from(out.stage_times.len()).unwrap_or(u16::MAX);
                if let Some(caches) = &idle {
                    // Caches that answer nothing: the full model answered every row.
                    // Each stream's prior: its job's last row.
                    let mut end = 0;
                    let answers: Vec<(u64, u32)> = live
                        .iter()
                        .map(|j| {
                            end += j.rows * row_out;
                            (j.stream, out.data.get(end.saturating_sub(row_out)..end).map_or(0, super::exits::argmax))
                        })
                        .collect();
                    caches.idle_served(rows as u64, answers);
                    for _ in 0..rows {
                        telemetry::cache_exit(&self.name, exit_stage as usize);
                        telemetry::cache_oracle_exit(&self.name, exit_stage as usize);
                    }
                }
                let mut offset = 0;
                for job in live {
                    let n = job.rows * row_out;
                    let mut shape = out.shape.clone();
                    shape[0] = job.rows;
                    let data = out.data[offset..offset + n].to_vec();
                    offset += n;
                    job.reply.send(JobResult::Answer { data, shape, exit_stage });
                }
            }
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, rows, "model run failed");
                for job in live {
                    job.reply.send(JobResult::Failed(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::{JobResult, Reply};

    #[test]
    fn reply_answers_once_fails_when_dropped_and_frees_on_disarm() {
        let calls = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let make = || {
            let (c, f) = (Arc::clone(&calls), Arc::clone(&failed));
            Reply::new(move |r| {
                c.fetch_add(1, Ordering::SeqCst);
                if matches!(r, JobResult::Failed(_)) {
                    f.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        make().send(JobResult::Expired);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(make());
        assert_eq!(
            (calls.load(Ordering::SeqCst), failed.load(Ordering::SeqCst)),
            (2, 1),
            "dropped reply answers Failed"
        );
        make().disarm();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "disarmed reply is not called");
        assert_eq!(Arc::strong_count(&calls), 1, "disarm frees what the reply held");
    }
}
