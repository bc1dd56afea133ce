//! Executing requests on an SGS: arrival, least-slack dispatch, completion,
//! retries after crashes, and deadline answers.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::Core;
use super::slots::Key;
use super::workers::Running;
use crate::sched::dag::Dag;
use crate::sched::request::{DagReply, DagRequest, DagResult, FnTiming};
use crate::sched::signals::bump;
use crate::sched::slack::{latest_start, slack_ns, Ready};
use crate::sched::worker::WorkerError;

/// Exec functions quicker than this run without a core lease.
pub const LEASE_MIN: Duration = Duration::from_micros(500);

/// Attempts per function invocation (the first run plus retries).
pub const MAX_ATTEMPTS: u8 = 3;

/// A request in flight on this SGS.
pub(super) struct Inflight {
    pub dag: Arc<Dag>,
    pub deadline: Instant,
    input: Vec<u8>,
    outputs: Vec<Option<Vec<u8>>>,
    /// Predecessors not yet finished, per node.
    missing: Vec<usize>,
    /// Expected remaining critical path from each node (estimates at arrival):
    /// orders the ready queue.
    remaining: Vec<Duration>,
    /// The same path at the quickest recent execution times: a request is
    /// answered `DeadlineMissed` early only when even this cannot fit.
    floor: Vec<Duration>,
    ready_at: Vec<Option<Instant>>,
    attempts: Vec<u8>,
    timings: Vec<FnTiming>,
    reply: Option<DagReply>,
}

impl Inflight {
    /// Time from the start of `node` to the end of the request at the
    /// quickest recent execution times.
    pub fn floor_from(&self, node: usize) -> Duration {
        self.floor[node]
    }

    /// A node's input: the request's for a source, the predecessor's output for
    /// one predecessor, else each predecessor's output as u32-LE length + bytes
    /// in edge order.
    fn input_for(&self, node: usize) -> Vec<u8> {
        let preds = &self.dag.graph.preds[node];
        match preds[..] {
            [] => self.input.clone(),
            [p] => self.outputs[p].clone().unwrap_or_default(),
            _ => {
                let mut v = Vec::new();
                for &p in preds {
                    let o = self.outputs[p].as_deref().unwrap_or_default();
                    v.extend_from_slice(&u32::try_from(o.len()).unwrap_or(u32::MAX).to_le_bytes());
                    v.extend_from_slice(o);
                }
                v
            }
        }
    }
}

impl Core {
    pub(super) fn arrive(&mut self, req: DagRequest, now: Instant) {
        let dag = req.dag;
        let counters = &self.stats.dags[dag.index];
        bump(&counters.arrived, 1);
        if self.stopping {
            bump(&counters.failed, 1);
            req.reply.send(DagResult::Failed("scheduler is stopping".into()));
            return;
        }
        for &f in &dag.nodes {
            self.pools[f].rate.record(now);
        }
        let deadline = req.deadline.unwrap_or(now + dag.deadline);
        let remaining = dag.remaining(|f| self.est[f].expected());
        let floor = dag.remaining(|f| self.est[f].best());
        let need = dag.sources.iter().map(|&s| floor[s]).max().unwrap_or_default();
        if self.deadline_aware() && now + need > deadline {
            bump(&counters.missed, 1);
            req.reply.send(DagResult::DeadlineMissed);
            return;
        }
        let n = dag.nodes.len();
        let r = Inflight {
            deadline,
            input: req.input,
            outputs: vec![None; n],
            missing: dag.graph.preds.iter().map(Vec::len).collect(),
            remaining,
            floor,
            ready_at: vec![None; n],
            attempts: vec![0; n],
            timings: Vec::with_capacity(n),
            reply: Some(req.reply),
            dag,
        };
        let sources = r.dag.sources.clone();
        let key = self.reqs.insert(r);
        for s in sources {
            self.make_ready(key, s, now);
        }
        self.shed(now);
    }

    pub(super) fn req_mut(&mut self, key: Key) -> Option<&mut Inflight> {
        self.reqs.get_mut(key)
    }

    /// Queues a node whose inputs are complete: keyed by its latest start
    /// (least slack first), or by now (FIFO).
    fn make_ready(&mut self, key: Key, node: usize, now: Instant) {
        let aware = self.deadline_aware();
        let Some(r) = self.req_mut(key) else { return };
        r.ready_at[node] = Some(now);
        let ls = if aware { latest_start(r.deadline, r.remaining[node]) } else { now };
        let func = r.dag.nodes[node];
        self.ready.push(ls, Ready { req: key, node, func });
    }

    /// Ready invocations to idle workers, least slack first, while the node's
    /// core budget grants leases.
    pub(super) fn dispatch(&mut self, now: Instant) -> io::Result<()> {
        self.return_leases();
        let r = self.dispatch_leased(now);
        self.return_leases();
        r
    }

    /// Gives back the leases of invocations that ended (completed, failed,
    /// crashed or killed): a lease is held exactly while an exec worker has a job.
    fn return_leases(&mut self) {
        if self.leases.held() == 0 {
            return;
        }
        let running = self.workers.iter().filter(|(_, w)| w.job.is_some_and(|j| j.leased)).count();
        self.leases.settle(running);
    }

    /// Whether invocations of `func` need a core lease: under a core budget,
    /// exec functions that run for at least [`LEASE_MIN`] at their quickest. Model functions run
    /// on their model's executor, which has its own threads and batches
    /// concurrent rows into one run; a lease per row would split those
    /// batches. Short functions (a top-k, a resize) would wait for a lease
    /// longer than they run: they finish a request cheaply, so they run at once.
    pub(super) fn leased(&self, func: usize) -> bool {
        self.leases.budget().is_some()
            && matches!(self.dep.functions[func].body, crate::sched::FunctionBody::Exec { .. })
            && self.est[func].best() >= LEASE_MIN
    }

    fn dispatch_leased(&mut self, now: Instant) -> io::Result<()> {
        loop {
            let pools = &self.pools;
            let Some((ls, item)) = self.ready.pop_runnable(|f| pools[f].idle() > 0) else { return Ok(()) };
            let aware = self.deadline_aware();
            let Some(r) = self.req_mut(item.req) else { continue };
            if aware && slack_ns(latest_start(r.deadline, r.floor[item.node]), now) < 0 {
                self.finish(item.req, DagResult::DeadlineMissed);
                continue;
            }
            let leased = self.leased(item.func);
            if leased && !self.leases.try_take(self.index) {
                // Every core is busy: it waits, in its place, for a release to wake us.
                self.ready.push(ls, item);
                return Ok(());
            }
            let Some(r) = self.req_mut(item.req) else { continue };
            let input = r.input_for(item.node);
            r.attempts[item.node] += 1;
            let queued = r.ready_at[item.node].map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let index = r.dag.index;
            let counters = &self.stats.dags[index];
            bump(&counters.dispatched, 1);
            bump(&counters.queue_ns, queued.as_nanos() as u64);
            let Some(k) = self.pools[item.func].take_idle() else { continue };
            let Some((_, w)) = self.workers.at_mut(k) else { continue };
            match w.worker.submit(input) {
                Ok(()) => w.job = Some(Running { req: item.req, node: item.node, started: now, queued, leased }),
                Err(e) if e.is_fatal() => {
                    w.job = Some(Running { req: item.req, node: item.node, started: now, queued, leased });
                    self.crash(k, e, now)?;
                }
                Err(e) => {
                    self.pools[item.func].release(k, now);
                    let name = &self.dep.functions[item.func].name;
                    let msg = format!("function `{name}`: {e}");
                    self.finish(item.req, DagResult::Failed(msg));
                }
            }
        }
    }

    /// A node's output arrived.
    pub(super) fn complete(&mut self, job: Running, out: Vec<u8>, now: Instant) {
        let ran = now.saturating_duration_since(job.started);
        let Some(func) = self.req_mut(job.req).map(|r| r.dag.nodes[job.node]) else { return };
        self.est[func].observe(ran);
        let function = self.dep.functions[func].name.clone();
        let Some(r) = self.req_mut(job.req) else { return };
        r.timings.push(FnTiming { function, queued: job.queued, ran, attempts: r.attempts[job.node] });
        if job.node == r.dag.sink {
            let timings = std::mem::take(&mut r.timings);
            self.finish(job.req, DagResult::Ok { output: out, timings });
            return;
        }
        r.outputs[job.node] = Some(out);
        let dag = Arc::clone(&r.dag);
        for &s in &dag.graph.succs[job.node] {
            let Some(r) = self.req_mut(job.req) else { return };
            r.missing[s] -= 1;
            if r.missing[s] == 0 {
                self.make_ready(job.req, s, now);
            }
        }
    }

    /// A worker died under `job`: run it again if the deadline still allows,
    /// else answer now (before the deadline).
    pub(super) fn retry_or_fail(&mut self, job: Running, err: &WorkerError, now: Instant) {
        let aware = self.deadline_aware();
        let Some(r) = self.req_mut(job.req) else { return };
        let func = r.dag.nodes[job.node];
        let attempts_left = r.attempts[job.node] < MAX_ATTEMPTS;
        let slack_left = !aware || now + r.floor[job.node] <= r.deadline;
        if attempts_left && slack_left {
            bump(&self.stats.retries, 1);
            self.make_ready(job.req, job.node, now);
        } else {
            let why = if attempts_left { "no slack left to retry" } else { "no attempts left" };
            let msg = format!("function `{}`: {err}; {why}", self.dep.functions[func].name);
            self.finish(job.req, DagResult::Failed(msg));
        }
    }

    /// Answers a request and forgets it; its running invocations finish unheard.
    pub(super) fn finish(&mut self, key: Key, result: DagResult) {
        let Some(r) = self.req_mut(key) else { return };
        let reply = r.reply.take();
        let index = r.dag.index;
        let late = matches!(result, DagResult::Ok { .. }) && Instant::now() > r.deadline;
        let counters = &self.stats.dags[index];
        if late {
            bump(&counters.late, 1);
        }
        bump(
            match result {
                DagResult::Ok { .. } => &counters.answered,
                DagResult::DeadlineMissed => &counters.missed,
                DagResult::Failed(_) => &counters.failed,
            },
            1,
        );
        self.reqs.remove(key);
        self.ready.remove_request(key);
        if let Some(reply) = reply {
            reply.send(result);
        }
    }

    /// Answers requests whose deadline passed (not in FIFO order: the
    /// baseline answers every request with its output).
    pub(super) fn expire(&mut self, now: Instant) {
        if !self.deadline_aware() {
            return;
        }
        let late: Vec<Key> = self.reqs.iter().filter(|(_, r)| r.deadline <= now).map(|(k, _)| k).collect();
        for key in late {
            self.finish(key, DagResult::DeadlineMissed);
        }
    }
}
