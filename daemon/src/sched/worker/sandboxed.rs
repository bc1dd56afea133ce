//! Exec functions in sandboxes: a [`Worker`] over [`crate::sandbox::Sandbox`]
//! (jailed process, memfd ring, eventfd and pidfd wake-ups).

use std::os::fd::RawFd;

use super::{Worker, WorkerError};
use crate::sandbox::{FunctionSpec, Limits, Sandbox, SandboxError};

/// One warm sandboxed worker.
pub struct SandboxWorker {
    sandbox: Sandbox,
}

impl SandboxWorker {
    /// Starts (jails) the function's program; a cold start.
    pub fn start(name: &str, program: &std::path::Path, args: &[String], limits: &Limits) -> Result<Self, WorkerError> {
        let spec = FunctionSpec {
            name: name.to_string(),
            program: program.to_owned(),
            args: args.to_vec(),
            limits: limits.clone(),
        };
        let sandbox = Sandbox::start(&spec).map_err(|e| WorkerError::Start(e.to_string()))?;
        Ok(Self { sandbox })
    }
}

fn convert(e: SandboxError) -> WorkerError {
    match e {
        SandboxError::Crashed { detail } => WorkerError::Crashed(detail),
        SandboxError::TimedOut => WorkerError::TimedOut,
        SandboxError::TooLarge { len, max } => WorkerError::TooLarge { got: len, limit: max },
        SandboxError::Function(m) => WorkerError::Failed(m),
        SandboxError::Busy => WorkerError::Busy,
        other => WorkerError::Crashed(other.to_string()),
    }
}

impl Worker for SandboxWorker {
    fn submit(&mut self, input: Vec<u8>) -> Result<(), WorkerError> {
        self.sandbox.submit(&input).map_err(convert)
    }

    fn fds(&self) -> [Option<RawFd>; 2] {
        [Some(self.sandbox.wake_fd()), Some(self.sandbox.pid_fd())]
    }

    fn try_take(&mut self) -> Option<Result<Vec<u8>, WorkerError>> {
        self.sandbox.try_take().map(|r| r.map_err(convert))
    }

    fn overdue(&self) -> bool {
        self.sandbox.deadline_passed()
    }

    fn kill(&mut self) {
        self.sandbox.kill();
    }
}
