//! An SGS's workers: slots polled on the ring, completions, crashes and
//! time limits, and warm-pool maintenance through the spawner.

use std::io;
use std::time::{Duration, Instant};

use super::core::{user_data, Core, OP_WORKER};
use super::slots::Key;
use crate::sched::function::FnId;
use crate::sched::signals::bump;
use crate::sched::worker::{Worker, WorkerError};

/// New starts of a function wait this long after a failed one.
const START_BACKOFF: Duration = Duration::from_millis(500);

/// Requests waiting for a function with no worker are failed only after this
/// many starts failed in a row: one transient failure (a fork under memory
/// pressure, a busy cgroup) costs them the back-off, not their answer.
pub(super) const START_ATTEMPTS: u32 = 3;

/// An invocation running on a worker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Running {
    pub req: Key,
    pub node: usize,
    pub started: Instant,
    pub queued: Duration,
    /// It holds one of the node's core leases.
    pub leased: bool,
}

/// One worker of this SGS (its slot is what the function's pool holds).
pub(super) struct WSlot {
    pub func: FnId,
    pub worker: Box<dyn Worker>,
    pub job: Option<Running>,
    armed: [bool; 2],
}

impl Core {
    /// The spawner finished a start.
    pub(super) fn add_worker(
        &mut self,
        func: FnId,
        res: Result<Box<dyn Worker>, WorkerError>,
        now: Instant,
    ) -> io::Result<()> {
        let worker = match res {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(sgs = self.index, function = %self.dep.functions[func].name, error = %e, "worker start failed");
                let failed = self.pools[func].start_failed(now, START_BACKOFF);
                if self.pools[func].total() == 0 && failed >= START_ATTEMPTS {
                    self.fail_waiting(func, &e);
                }
                return Ok(());
            }
        };
        let (k, _) = self.workers.insert(WSlot { func, worker, job: None, armed: [false; 2] });
        bump(&self.stats.workers, 1);
        if let Some(g) = self.stats.fn_workers.get(func) {
            bump(g, 1);
        }
        self.pools[func].started(k, now);
        self.arm_worker(k)
    }

    /// Answers every ready invocation of `func`: it has no worker and cannot get one.
    fn fail_waiting(&mut self, func: FnId, e: &WorkerError) {
        let mut keys = Vec::new();
        while let Some((_, item)) = self.ready.pop_runnable(|f| f == func) {
            keys.push(item.req);
        }
        let msg = format!("function `{}`: {e}", self.dep.functions[func].name);
        for k in keys {
            self.finish(k, crate::sched::request::DagResult::Failed(msg.clone()));
        }
    }

    fn arm_worker(&mut self, k: u32) -> io::Result<()> {
        let Some((gen, w)) = self.workers.at_mut(k) else { return Ok(()) };
        let fds = w.worker.fds();
        let mut todo = Vec::new();
        for (idx, fd) in fds.iter().enumerate() {
            if let (Some(fd), false) = (fd, w.armed[idx]) {
                w.armed[idx] = true;
                todo.push((*fd, user_data(OP_WORKER, idx, k, gen)));
            }
        }
        for (fd, ud) in todo {
            self.poll_fd(fd, ud)?;
        }
        Ok(())
    }

    /// Takes a worker out: its polls are cancelled, the caller kills or drops it.
    pub(super) fn remove_worker(&mut self, k: u32) -> Option<WSlot> {
        let (gen, w) = self.workers.remove_at(k)?;
        for (idx, armed) in w.armed.iter().enumerate() {
            if *armed {
                if let Err(e) = self.cancel_poll(user_data(OP_WORKER, idx, k, gen)) {
                    tracing::error!(sgs = self.index, error = %e, "cannot cancel a worker poll");
                }
            }
        }
        self.stats.workers.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(g) = self.stats.fn_workers.get(w.func) {
            g.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        Some(w)
    }

    /// A worker's fd `idx` fired (0 = output ready, 1 = exited).
    pub(super) fn on_worker_event(&mut self, k: u32, gen: u32, idx: usize, res: i32, now: Instant) -> io::Result<()> {
        let Some(w) = self.workers.get_mut((k, gen)) else { return Ok(()) };
        w.armed[idx] = false;
        if res == -libc::ECANCELED {
            return Ok(());
        }
        let func = w.func;
        if w.job.is_none() {
            // Idle: a stale wake-up, or the worker died between requests.
            let died = idx == 1 || matches!(w.worker.try_take(), Some(Err(e)) if e.is_fatal());
            if died {
                self.pools[func].remove(k, false);
                bump(&self.stats.crashes, 1);
                if let Some(mut w) = self.remove_worker(k) {
                    w.worker.kill();
                }
                return Ok(());
            }
            return self.arm_worker(k);
        }
        match w.worker.try_take() {
            Some(Ok(out)) => {
                let job = w.job.take();
                self.pools[func].release(k, now);
                if let Some(job) = job {
                    self.complete(job, out, now);
                }
            }
            Some(Err(e)) if e.is_fatal() => return self.crash(k, e, now),
            Some(Err(e)) => {
                let job = w.job.take();
                self.pools[func].release(k, now);
                if let Some(job) = job {
                    let msg = format!("function `{}`: {e}", self.dep.functions[func].name);
                    self.finish(job.req, crate::sched::request::DagResult::Failed(msg));
                }
            }
            None if idx == 1 => return self.crash(k, WorkerError::Crashed("exited".into()), now),
            None => {}
        }
        self.arm_worker(k)
    }

    /// A busy worker crashed or overran: it is killed and removed (the pool
    /// replaces it), and its invocation is retried or answered.
    pub(super) fn crash(&mut self, k: u32, err: WorkerError, now: Instant) -> io::Result<()> {
        let Some(mut w) = self.remove_worker(k) else { return Ok(()) };
        w.worker.kill();
        bump(&self.stats.crashes, 1);
        self.pools[w.func].remove(k, true);
        tracing::warn!(sgs = self.index, function = %self.dep.functions[w.func].name, error = %err, "worker lost mid-request");
        if let Some(job) = w.job.take() {
            self.retry_or_fail(job, &err, now);
        }
        Ok(())
    }

    /// Kills workers running past their function's time limit.
    pub(super) fn reap_overdue(&mut self, now: Instant) -> io::Result<()> {
        let overdue: Vec<u32> =
            self.workers.iter().filter(|(_, w)| w.job.is_some() && w.worker.overdue()).map(|((k, _), _)| k).collect();
        for k in overdue {
            self.crash(k, WorkerError::TimedOut, now)?;
        }
        Ok(())
    }

    /// Sizes every function's pool: starts (cold or proactive) go to the
    /// spawner; idle workers above target past keep-alive are retired.
    pub(super) fn maintain(&mut self, now: Instant) -> io::Result<()> {
        for f in 0..self.pools.len() {
            let exec = self.est[f].expected();
            // While stopping, work still waiting gets its workers; in-flight requests finish.
            let mut waiting = self.ready.waiting_for(f);
            if let Some(total) = self.leases.budget().filter(|_| self.leased(f)) {
                // Under a core budget no more than `cores` invocations run at
                // once: more workers for the queue would be cold starts that
                // wait for a lease anyway (and take CPU from those running).
                waiting = waiting.min(total);
            }
            let (cold0, pre0) = (self.pools[f].cold_starts, self.pools[f].prestarts);
            let n = self.pools[f].starts_needed(now, exec, waiting);
            bump(&self.stats.cold_starts, self.pools[f].cold_starts - cold0);
            bump(&self.stats.prestarts, self.pools[f].prestarts - pre0);
            for _ in 0..n {
                if self.spawn.send(f).is_err() {
                    let _ = self.pools[f].start_failed(now, START_BACKOFF);
                }
            }
            for k in self.pools[f].retire(now, exec) {
                if let Some(mut w) = self.remove_worker(k) {
                    w.worker.kill();
                }
            }
        }
        Ok(())
    }
}
