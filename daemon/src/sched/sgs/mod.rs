//! A semi-global scheduler (SGS): one thread with its own io_uring ring,
//! owning a pool of workers per function.
//!
//! Requests arrive through a channel + eventfd the ring polls; workers'
//! fds are polled on the same ring; the wait carries a timeout for the next
//! deadline, time limit or pool maintenance. Each turn the SGS answers
//! requests whose deadline passed, kills overdue workers, dispatches ready
//! invocations least slack first to idle workers, and sizes the warm pools.
//! Cold starts happen on the SGS's spawner thread, never on its ring. A
//! request is answered exactly once; a crashed worker's invocation is retried
//! while slack allows, else answered `Failed` at once.

mod core;
mod exec;
mod leases;
mod shed;
mod slots;
mod workers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::core::{Core, Msg};
use super::cores::Cores;
use super::function::{Deployment, FnId};
use super::request::{DagReply, DagRequest};
use super::signals::SgsStats;
use super::worker::WorkerFactory;
use super::SchedError;
use crate::eventfd::EventFd;

/// Requests one SGS holds (queued or running, not yet answered) before new
/// ones are refused `Busy`.
pub const MAX_QUEUED: usize = 4096;

/// One request counted against an SGS's [`MAX_QUEUED`].
struct QueuedSlot(Arc<AtomicUsize>);

impl Drop for QueuedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle of a running SGS.
pub struct Sgs {
    index: usize,
    queued: Arc<AtomicUsize>,
    tx: Sender<Msg>,
    wake: Arc<EventFd>,
    stats: Arc<SgsStats>,
    thread: Option<JoinHandle<()>>,
}

impl Sgs {
    /// Starts SGS number `index` (thread `sgs-<index>`) and its spawner.
    pub fn start(
        index: usize,
        dep: Arc<Deployment>,
        factory: Arc<dyn WorkerFactory>,
        cores: Arc<Cores>,
    ) -> Result<Self, SchedError> {
        let wake = Arc::new(EventFd::new().map_err(|e| SchedError::Io { what: "eventfd", source: e })?);
        cores.register(index, Arc::clone(&wake));
        let stats = Arc::new(SgsStats::with_functions(dep.dags.len(), dep.functions.len()));
        let (tx, rx) = mpsc::channel::<Msg>();
        let (spawn_tx, spawn_rx) = mpsc::channel::<FnId>();

        let (stx, swake, sdep) = (tx.clone(), Arc::clone(&wake), Arc::clone(&dep));
        std::thread::Builder::new()
            .name(format!("sgs-{index}-spawn"))
            .spawn(move || {
                // Ends when the SGS drops its order sender.
                while let Ok(func) = spawn_rx.recv() {
                    let worker = factory.start(&sdep.functions[func]);
                    if stx.send(Msg::Started { func, worker }).is_err() {
                        return;
                    }
                    swake.signal();
                }
            })
            .map_err(|e| SchedError::Io { what: "spawn thread", source: e })?;

        let (cwake, cstats) = (Arc::clone(&wake), Arc::clone(&stats));
        let (started_tx, started_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("sgs-{index}"))
            .spawn(move || {
                // The ring is made on the thread that submits to it (SINGLE_ISSUER).
                let mut core = match Core::new(index, dep, cstats, rx, cwake, spawn_tx, cores) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                // An SGS that fails is not restarted in place (its requests,
                // workers and leases would have to be rebuilt consistently):
                // its replies answer `Failed` as the core unwinds, the thread
                // is marked dead, and the node exits for systemd to restart it.
                let beat = crate::liveness::node().register(format!("sgs-{index}"), crate::liveness::Role::Sgs);
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.run(&beat))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(sgs = index, error = %e, "SGS ring failed");
                        beat.died(format!("ring error: {e}"));
                    }
                    Err(p) => {
                        let why = crate::liveness::panic_message(&*p);
                        tracing::error!(sgs = index, error = %why, "SGS panicked");
                        beat.died(format!("panicked: {why}"));
                    }
                }
            })
            .map_err(|e| SchedError::Io { what: "SGS thread", source: e })?;
        started_rx
            .recv()
            .map_err(|_| SchedError::Io { what: "SGS start", source: std::io::Error::other("thread died") })?
            .map_err(|e| SchedError::Io { what: "io_uring setup", source: e })?;
        Ok(Self { index, queued: Arc::new(AtomicUsize::new(0)), tx, wake, stats, thread: Some(thread) })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Queues a request, or gives it back when the SGS already holds
    /// [`MAX_QUEUED`] unanswered ones. Never blocks; if the SGS is gone the
    /// reply answers `Failed`.
    pub fn submit(&self, mut req: DagRequest) -> Result<(), DagRequest> {
        let held = &self.queued;
        if held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_QUEUED).then_some(n + 1)).is_err() {
            return Err(req);
        }
        // The count drops when the request is answered, however that happens.
        let slot = QueuedSlot(Arc::clone(held));
        let inner = std::mem::replace(&mut req.reply, DagReply::new(|_| {}));
        req.reply = DagReply::new(move |r| {
            drop(slot);
            inner.send(r);
        });
        if self.tx.send(Msg::Request(req)).is_ok() {
            self.wake.signal();
        }
        Ok(())
    }

    /// Test hook: makes the SGS thread panic.
    pub fn inject_panic(&self) {
        let _ = self.tx.send(Msg::Panic);
        self.wake.signal();
    }

    /// The counters this SGS publishes.
    pub fn stats(&self) -> &Arc<SgsStats> {
        &self.stats
    }

    /// Stops taking requests; in-flight ones finish, then the thread ends.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        self.wake.signal();
    }

    /// Stops and waits up to `timeout` for the thread; true if it ended.
    pub fn join(mut self, timeout: Duration) -> bool {
        self.stop();
        let until = Instant::now() + timeout;
        let Some(t) = self.thread.take() else { return true };
        while !t.is_finished() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
        true
    }
}

impl Drop for Sgs {
    fn drop(&mut self) {
        self.stop();
    }
}
