//! Sandboxes: warm worker processes that run user functions of a DAG.
//!
//! Owns each worker process from `clone3` to reaping, its cgroup and its
//! shared-memory rings. Promises: a started [`Sandbox`] runs its program inside
//! the isolation reported by [`Sandbox::isolation`] (never more claimed than
//! applied); one request at a time; every request ends in a response, a
//! handler error, or `Crashed`/`TimedOut` — a crash or a hang is noticed
//! through the pidfd or the time limit, never waited on forever; a timed-out
//! or killed worker is gone (the pool replaces it). See `docs/sandbox.md`.
//!
//! The ring layout itself lives in the `gati-sdk` crate, shared with functions.

pub mod cgroup;
mod child;
pub mod jail;
pub mod rootfs;
pub mod seccomp;
pub mod shm;
pub mod stderr;
mod worker;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use cgroup::{CgroupError, CgroupVersion};
pub use worker::{Exit, Sandbox};

/// Resource limits of one sandbox.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// CPU quota in cores (cgroup CFS quota / `cpu.max`).
    pub cpu_cores: f32,
    /// Memory limit (cgroup; `RLIMIT_AS` as a fallback without one).
    pub memory_bytes: u64,
    /// Longest a single request may run before the worker is killed.
    pub time_limit: Duration,
    /// Largest request and response payload.
    pub max_message_bytes: usize,
    /// Most processes/threads (cgroup `pids.max`; `RLIMIT_NPROC` as root).
    pub pids: u32,
    /// Runs as `SCHED_BATCH`: a worker woken by its SGS does not preempt it
    /// (see [`Sched`]).
    pub sched: Sched,
}

/// The CPU scheduling policy a worker runs under (`[[functions]] sched`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sched {
    /// `SCHED_BATCH` (nice 0, the same CPU share): the kernel does not let a
    /// woken worker preempt the thread that woke it, so an SGS hands out a
    /// whole batch of work before its workers run, instead of a context
    /// switch per request. Needs no privilege.
    #[default]
    Batch,
    /// `SCHED_OTHER`, as the daemon's own threads.
    Normal,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            cpu_cores: 1.0,
            memory_bytes: 256 << 20,
            time_limit: Duration::from_secs(5),
            max_message_bytes: 4 << 20,
            pids: 16,
            sched: Sched::Batch,
        }
    }
}

/// What to run in a sandbox.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionSpec {
    pub name: String,
    /// The function's program (an executable that calls `gati_sdk::serve`).
    pub program: PathBuf,
    pub args: Vec<String>,
    pub limits: Limits,
}

/// What isolation was actually applied to a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    /// New namespaces, e.g. `["pid", "mount", "net", "ipc", "uts"]` (+ `"user"` unprivileged).
    pub namespaces: Vec<&'static str>,
    /// Pivoted into a read-only tmpfs holding only the program and its libraries.
    pub private_root: bool,
    /// The uid the function sees itself as.
    pub uid: u32,
    /// The uid it runs as on the host.
    pub host_uid: u32,
    /// Resource limits set with `setrlimit`.
    pub rlimits: Vec<&'static str>,
    pub no_new_privs: bool,
    /// Effective, permitted, inheritable and ambient sets emptied.
    pub capabilities_dropped: bool,
    /// Bounding set emptied (needs privilege in the process's namespace).
    pub bounding_set_dropped: bool,
    /// Seccomp filters installed (forbidden syscalls and namespace flags kill
    /// with SIGSYS, `clone3` fails with ENOSYS; see `seccomp`).
    pub seccomp: bool,
    /// The CPU scheduling policy it runs under.
    pub sched: Sched,
    /// The cgroup holding the CPU, memory and pids limits, if any.
    pub cgroup: Option<CgroupVersion>,
    /// Why there is no cgroup, when there is none.
    pub cgroup_note: Option<String>,
}

/// Errors of the sandbox module.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A jailer step in the new process failed (names the system call).
    #[error("sandbox start failed at {step}")]
    Spawn {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// A system call in the daemon failed.
    #[error("{call} failed")]
    Sys {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// The program cannot be used (missing, unresolvable libraries, bad args).
    #[error("function program: {0}")]
    Program(String),
    #[error("sandbox cgroup")]
    Cgroup(#[from] CgroupError),
    /// The seccomp filters did not compile (a bug in the rules).
    #[error("sandbox seccomp filter")]
    Seccomp(#[from] seccomp::SeccompError),
    /// The worker did not become ready.
    #[error("sandbox did not become ready: {0}")]
    NotReady(String),
    /// The worker process died (crash, signal, OOM kill, seccomp kill).
    #[error("sandbox crashed: {detail}")]
    Crashed { detail: String },
    /// A request ran past its time limit or the caller's timeout; the worker was killed.
    #[error("sandbox request timed out (worker killed)")]
    TimedOut,
    /// A request or response exceeds `max_message_bytes`.
    #[error("message of {len} bytes exceeds the sandbox limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// The function's handler returned `Err` (or panicked) with this message.
    #[error("function failed: {0}")]
    Function(String),
    /// `submit` while a request is already in flight.
    #[error("sandbox is busy with another request")]
    Busy,
    /// The worker broke the shared-memory protocol; it has been killed.
    #[error("sandbox protocol error: {0}")]
    Protocol(String),
}

impl SandboxError {
    pub(crate) fn sys(call: &'static str, source: io::Error) -> SandboxError {
        SandboxError::Sys { call, source }
    }
}

// The scheduler moves warm sandboxes between threads.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Sandbox>();
};
