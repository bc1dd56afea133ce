//! The SGS's state and its ring loop.

use std::io;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::exec::Inflight;
use super::leases::Leases;
use super::slots::Slots;
use super::workers::WSlot;
use crate::config::{DispatchOrder, PoolMode};
use crate::eventfd::EventFd;
use crate::sched::cores::Cores;
use crate::sched::estimate::Estimator;
use crate::sched::function::{Deployment, FnId};
use crate::sched::pool::FunctionPool;
use crate::sched::request::DagRequest;
use crate::sched::signals::SgsStats;
use crate::sched::slack::ReadyQueue;
use crate::sched::worker::{Worker, WorkerError};

const RING_ENTRIES: u32 = 256;
/// Longest sleep between turns (pool maintenance, rate windows).
pub(super) const MAINTENANCE: Duration = Duration::from_millis(50);

pub(super) const OP_INBOX: u64 = 1;
pub(super) const OP_WORKER: u64 = 2;
pub(super) const OP_CANCEL: u64 = 3;

/// `op` (4 bits) | fd index (4) | slot (24) | generation (32).
pub(super) fn user_data(op: u64, idx: usize, slot: u32, gen: u32) -> u64 {
    (op << 60) | ((idx as u64 & 0xf) << 56) | (u64::from(slot & 0x00ff_ffff) << 32) | u64::from(gen)
}

fn split(ud: u64) -> (u64, usize, u32, u32) {
    (ud >> 60, ((ud >> 56) & 0xf) as usize, ((ud >> 32) & 0x00ff_ffff) as u32, ud as u32)
}

/// What reaches the SGS through its inbox.
pub(crate) enum Msg {
    Request(DagRequest),
    /// The spawner finished a cold start.
    Started {
        func: FnId,
        worker: Result<Box<dyn Worker>, WorkerError>,
    },
    Stop,
    /// A test hook: panic on the SGS thread (only sent with `GATI_TEST_HOOKS=1`).
    Panic,
}

/// An SGS: its ring, inbox, workers, requests in flight and ready queue.
/// The four files of this module share it through these fields; the slot
/// arenas, the lease count and the ready queue carry their own invariants.
pub(super) struct Core {
    pub(super) index: usize,
    pub(super) dep: Arc<Deployment>,
    pub(super) stats: Arc<SgsStats>,
    ring: IoUring,
    inbox: Receiver<Msg>,
    wake: Arc<EventFd>,
    inbox_armed: bool,
    /// Cold and proactive starts go to the spawner thread.
    pub(super) spawn: Sender<FnId>,
    /// Per function: execution-time estimates and the warm pool (of worker slots).
    pub(super) est: Vec<Estimator>,
    pub(super) pools: Vec<FunctionPool<u32>>,
    pub(super) workers: Slots<WSlot>,
    pub(super) reqs: Slots<Inflight>,
    pub(super) ready: ReadyQueue,
    pub(super) stopping: bool,
    /// The node's core budget and the leases this SGS holds (one per running invocation).
    pub(super) leases: Leases,
}

impl Core {
    pub(super) fn new(
        index: usize,
        dep: Arc<Deployment>,
        stats: Arc<SgsStats>,
        inbox: Receiver<Msg>,
        wake: Arc<EventFd>,
        spawn: Sender<FnId>,
        cores: Arc<Cores>,
    ) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        let now = Instant::now();
        let est = dep.functions.iter().map(|f| Estimator::new(f.expected)).collect();
        let on_demand = dep.policy.pool == PoolMode::OnDemand;
        let pools = dep
            .functions
            .iter()
            .map(|f| {
                let p = FunctionPool::new(f.warm, now);
                if on_demand {
                    p.on_demand()
                } else {
                    p
                }
            })
            .collect();
        Ok(Self {
            index,
            dep,
            stats,
            ring,
            inbox,
            wake,
            inbox_armed: false,
            spawn,
            est,
            pools,
            workers: Slots::default(),
            reqs: Slots::default(),
            ready: ReadyQueue::default(),
            stopping: false,
            leases: Leases::new(cores),
        })
    }

    pub(super) fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: SGS entries are polls and poll removals: they point at no
        // memory, only at fds (and user_data), so nothing must outlive them.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    pub(super) fn poll_fd(&mut self, fd: i32, ud: u64) -> io::Result<()> {
        self.push(opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(ud))
    }

    pub(super) fn cancel_poll(&mut self, ud: u64) -> io::Result<()> {
        self.push(opcode::PollRemove::new(ud).build().user_data(user_data(OP_CANCEL, 0, 0, 0)))
    }

    pub(super) fn run(&mut self, beat: &crate::liveness::Beat) -> io::Result<()> {
        loop {
            // The wait below ends at least every MAINTENANCE, so an idle SGS beats too.
            beat.beat();
            if !self.inbox_armed {
                self.poll_fd(self.wake.fd(), user_data(OP_INBOX, 0, 0, 0))?;
                self.inbox_armed = true;
            }
            let now = Instant::now();
            let wait = self.next_wake(now).saturating_duration_since(now);
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                let (op, idx, slot, gen) = split(ud);
                match op {
                    OP_INBOX => {
                        self.inbox_armed = false;
                        self.on_inbox();
                    }
                    OP_WORKER => self.on_worker_event(slot, gen, idx, res, Instant::now())?,
                    _ => {}
                }
            }
            self.turn(Instant::now())?;
            if self.stopping && self.reqs.is_empty() {
                self.shutdown();
                return Ok(());
            }
        }
    }

    fn on_inbox(&mut self) {
        self.wake.drain();
        loop {
            match self.inbox.try_recv() {
                Ok(Msg::Request(r)) => self.arrive(r, Instant::now()),
                Ok(Msg::Started { func, worker }) => {
                    if let Err(e) = self.add_worker(func, worker, Instant::now()) {
                        tracing::error!(sgs = self.index, error = %e, "cannot poll a new worker");
                    }
                }
                // Requests queued behind the stop are still drained (answered `Failed`).
                Ok(Msg::Stop) => self.stopping = true,
                Ok(Msg::Panic) => panic!("SGS {} asked to panic by a test hook", self.index),
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// One scheduling turn after events.
    fn turn(&mut self, now: Instant) -> io::Result<()> {
        self.expire(now);
        self.reap_overdue(now)?;
        self.dispatch(now)?;
        self.maintain(now)
    }

    /// The earliest deadline, worker time limit or maintenance tick.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut t = now + MAINTENANCE;
        if self.deadline_aware() {
            for (_, r) in self.reqs.iter() {
                t = t.min(r.deadline);
            }
        }
        for (_, w) in self.workers.iter() {
            if let Some(j) = &w.job {
                t = t.min(j.started + self.dep.functions[w.func].limits.time_limit);
            }
        }
        t.max(now)
    }

    /// Least-slack order answers hopeless requests early; FIFO (the baseline)
    /// knows no deadlines and runs every request to completion.
    pub(super) fn deadline_aware(&self) -> bool {
        self.dep.policy.order == DispatchOrder::LeastSlack
    }

    fn shutdown(&mut self) {
        for k in self.workers.slots() {
            if let Some(mut w) = self.remove_worker(k) {
                w.worker.kill();
            }
        }
        self.leases.release_all();
        let _ = self.ring.submit();
        tracing::debug!(sgs = self.index, "SGS stopped");
    }
}
