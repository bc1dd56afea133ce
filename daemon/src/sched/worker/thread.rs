//! A worker that runs a closure on its own thread: real threads and real
//! eventfds, for tests and benchmarks of the SGS without programs.
//!
//! The closure's `Err` is a failed invocation; a panic (or [`Behaviour::Exit`])
//! ends the thread like a crashed process: the exit eventfd fires and the
//! running invocation is lost.

use std::os::fd::RawFd;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Worker, WorkerError};
use crate::eventfd::EventFd;

/// What the closure asks the worker to do with one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer with these bytes.
    Answer(Vec<u8>),
    /// Fail this invocation (the worker survives).
    Fail(String),
    /// Die mid-request, like a killed process.
    Exit,
}

type Slot = Arc<Mutex<Option<Result<Vec<u8>, WorkerError>>>>;

/// A closure-backed worker.
pub struct ThreadWorker {
    tx: Option<Sender<Vec<u8>>>,
    ready: Arc<EventFd>,
    exited: Arc<EventFd>,
    slot: Slot,
    started: Option<Instant>,
    time_limit: Duration,
    dead: Arc<std::sync::atomic::AtomicBool>,
}

impl ThreadWorker {
    /// Starts the thread; `f` runs once per input.
    pub fn spawn(time_limit: Duration, f: impl Fn(Vec<u8>) -> Behaviour + Send + 'static) -> Result<Self, WorkerError> {
        let ev = || EventFd::new().map(Arc::new).map_err(|e| WorkerError::Start(format!("eventfd: {e}")));
        let (ready, exited) = (ev()?, ev()?);
        let slot: Slot = Arc::default();
        let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let (r, x, s, d) = (Arc::clone(&ready), Arc::clone(&exited), Arc::clone(&slot), Arc::clone(&dead));
        std::thread::Builder::new()
            .name("fn-thread".into())
            .spawn(move || {
                /// Signals the exit fd however the thread ends (return or panic).
                struct OnExit(Arc<EventFd>, Arc<std::sync::atomic::AtomicBool>);
                impl Drop for OnExit {
                    fn drop(&mut self) {
                        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
                        self.0.signal();
                    }
                }
                let _guard = OnExit(x, d);
                while let Ok(input) = rx.recv() {
                    let out = match f(input) {
                        Behaviour::Answer(b) => Ok(b),
                        Behaviour::Fail(m) => Err(WorkerError::Failed(m)),
                        Behaviour::Exit => return,
                    };
                    *s.lock().unwrap_or_else(|p| p.into_inner()) = Some(out);
                    r.signal();
                }
            })
            .map_err(|e| WorkerError::Start(format!("thread: {e}")))?;
        Ok(Self { tx: Some(tx), ready, exited, slot, started: None, time_limit, dead })
    }
}

impl Worker for ThreadWorker {
    fn submit(&mut self, input: Vec<u8>) -> Result<(), WorkerError> {
        if self.started.is_some() {
            return Err(WorkerError::Busy);
        }
        let tx = self.tx.as_ref().ok_or_else(|| WorkerError::Crashed("killed".into()))?;
        tx.send(input).map_err(|_| WorkerError::Crashed("thread gone".into()))?;
        self.started = Some(Instant::now());
        Ok(())
    }

    fn fds(&self) -> [Option<RawFd>; 2] {
        [Some(self.ready.fd()), Some(self.exited.fd())]
    }

    fn try_take(&mut self) -> Option<Result<Vec<u8>, WorkerError>> {
        self.ready.drain();
        if let Some(out) = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.started = None;
            return Some(out);
        }
        if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
            self.started = None;
            return Some(Err(WorkerError::Crashed("thread exited".into())));
        }
        None
    }

    fn overdue(&self) -> bool {
        self.started.is_some_and(|s| s.elapsed() > self.time_limit)
    }

    fn kill(&mut self) {
        // Closing the channel ends the thread after its current input; its
        // answer, if any, goes to a slot nobody reads.
        self.tx = None;
        self.started = None;
    }
}
