//! Workers: what runs one function invocation at a time for an SGS.
//!
//! A [`Worker`] is started by a [`WorkerFactory`] (a cold start, done on the
//! SGS's spawner thread, off its ring), takes one input at a time, and exposes
//! fds the SGS polls on its io_uring ring: `fds()[0]` becomes readable when a
//! response may be ready, `fds()[1]` (if any) when the worker has exited.
//! Implementations: [`ModelWorker`] (a served model through its batcher),
//! [`SandboxWorker`] (an exec function in a sandbox), and, for the
//! scheduler's unit tests only (not part of the library), `ProcessWorker` (a
//! plain program over pipes) and `ThreadWorker` (a closure on a thread).

mod model;
#[cfg(test)]
mod process;
mod sandboxed;
#[cfg(test)]
mod thread;

use std::os::fd::RawFd;
use std::sync::Arc;

pub use model::ModelWorker;
#[cfg(test)]
pub use process::ProcessWorker;
pub use sandboxed::SandboxWorker;
#[cfg(test)]
pub use thread::{Behaviour, ThreadWorker};

use super::function::{FunctionBody, FunctionDef};
use crate::infer::Registry;

/// Why an invocation or a worker failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("worker crashed: {0}")]
    Crashed(String),
    #[error("worker ran past its time limit")]
    TimedOut,
    #[error("message of {got} bytes exceeds the limit of {limit}")]
    TooLarge { got: usize, limit: usize },
    #[error("invalid input: {0}")]
    BadInput(String),
    #[error("function failed: {0}")]
    Failed(String),
    #[error("cannot start worker: {0}")]
    Start(String),
    #[error("worker is busy")]
    Busy,
}

impl WorkerError {
    /// Whether the worker is gone after this error (it must be replaced), as
    /// opposed to an error about this one input.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Crashed(_) | Self::TimedOut | Self::Start(_))
    }
}

/// One worker: runs one invocation at a time.
pub trait Worker: Send {
    /// Starts an invocation; never blocks on the function.
    fn submit(&mut self, input: Vec<u8>) -> Result<(), WorkerError>;
    /// `[ready, exited]`: fds the SGS polls (readable = look at the worker).
    fn fds(&self) -> [Option<RawFd>; 2];
    /// The finished invocation's output or error; `None` while it runs.
    fn try_take(&mut self) -> Option<Result<Vec<u8>, WorkerError>>;
    /// The running invocation is past the function's time limit.
    fn overdue(&self) -> bool;
    /// Stops the worker at once (a running invocation is lost).
    fn kill(&mut self);
}

/// Starts workers (blocking: a cold start).
pub trait WorkerFactory: Send + Sync {
    fn start(&self, func: &FunctionDef) -> Result<Box<dyn Worker>, WorkerError>;
}

/// The node's factory: model functions through the served model registry,
/// exec functions in sandboxes (`crate::sandbox`: namespaces, cgroups,
/// seccomp, memfd rings); their programs speak the `gati-sdk` protocol.
pub struct NodeWorkers {
    pub registry: Arc<Registry>,
}

impl WorkerFactory for NodeWorkers {
    fn start(&self, func: &FunctionDef) -> Result<Box<dyn Worker>, WorkerError> {
        match &func.body {
            FunctionBody::Model(name) => {
                let handle = self
                    .registry
                    .by_name(name)
                    .ok_or_else(|| WorkerError::Start(format!("model `{name}` is not served")))?;
                Ok(Box::new(ModelWorker::new(handle, func.limits.time_limit)?))
            }
            FunctionBody::Exec { program, args } => {
                Ok(Box::new(SandboxWorker::start(&func.name, program, args, &func.limits)?))
            }
        }
    }
}

/// Any closure from a function to a worker is a factory (tests, benches, the
/// lead's composition of sandboxes and models).
impl<F> WorkerFactory for F
where
    F: Fn(&FunctionDef) -> Result<Box<dyn Worker>, WorkerError> + Send + Sync,
{
    fn start(&self, func: &FunctionDef) -> Result<Box<dyn Worker>, WorkerError> {
        self(func)
    }
}
