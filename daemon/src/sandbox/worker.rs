//! [`Sandbox`]: one started, warm worker process and its request cycle.
//!
//! States: idle → (submit) busy → (response | crash | timeout) idle or dead.
//! The daemon sleeps on two fds ([`Sandbox::wake_fd`], [`Sandbox::pid_fd`]);
//! it never spins. A dead sandbox stays dead: the pool replaces it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gati_sdk::layout::{GUEST_READY, STATUS_HANDLER_ERROR, STATUS_OK, STATUS_PANIC, STATUS_TOO_LARGE};

use super::cgroup::Cgroup;
use super::jail::{self, JailRequest};
use super::shm::{EventFd, SharedRegion};
use super::{FunctionSpec, Isolation, Limits, SandboxError};

/// How long `start` waits for the worker to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Headroom over `memory_bytes` for the address-space fallback limit.
const AS_HEADROOM: u64 = 256 << 20;

/// How a worker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

enum State {
    Idle,
    Busy { seq: u64, since: Instant },
    Dead,
}

/// One started, warm worker process.
pub struct Sandbox {
    name: String,
    limits: Limits,
    region: SharedRegion,
    request: EventFd,
    response: EventFd,
    pid: libc::pid_t,
    pidfd: OwnedFd,
    cgroup: Option<Cgroup>,
    isolation: Isolation,
    state: State,
    seq: u64,
    exit: Option<Exit>,
    /// The cgroup's OOM killer fired before the worker died.
    oom_killed: bool,
    start_time: Duration,
    buf: Vec<u8>,
}

impl Sandbox {
    /// Starts a worker for `spec`; returns once it has signalled that it is ready.
    pub fn start(spec: &FunctionSpec) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let region = SharedRegion::create(spec.limits.max_message_bytes)?;
        let request = EventFd::blocking().map_err(|e| SandboxError::sys("eventfd", e))?; // the function blocks reading it
        let response = EventFd::new().map_err(|e| SandboxError::sys("eventfd", e))?; // the daemon polls it
        let group_name = format!("{}-{}-{}", sanitize(&spec.name), std::process::id(), next_serial());
        let (cgroup, cgroup_note) = match Cgroup::create(&group_name, &spec.limits) {
            Ok(group) => (Some(group), None),
            Err(e) => (None, Some(error_chain(&e))),
        };
        let address_space_limit = cgroup
            .is_none()
            .then(|| spec.limits.memory_bytes.saturating_add(region.layout().total_len() as u64 + AS_HEADROOM));
        let log = super::stderr::pipe();
        let jailed = jail::spawn(&JailRequest {
            spec,
            fds: [region.fd(), request.fd(), response.fd()],
            cgroup: cgroup.as_ref(),
            address_space_limit,
            stderr: log.as_ref().map(|(_, w)| w.as_raw_fd()),
        })?;
        if let Some((read, _write)) = log {
            super::stderr::watch(read, &spec.name, jailed.pid);
        }
        let mut isolation = jailed.isolation;
        isolation.cgroup_note = cgroup_note;
        let mut sandbox = Sandbox {
            name: spec.name.clone(),
            limits: spec.limits.clone(),
            region,
            request,
            response,
            pid: jailed.pid,
            pidfd: jailed.pidfd,
            cgroup,
            isolation,
            state: State::Idle,
            seq: 0,
            exit: None,
            oom_killed: false,
            start_time: Duration::ZERO,
            buf: Vec::new(),
        };
        sandbox.wait_ready(started + READY_TIMEOUT)?;
        sandbox.start_time = started.elapsed();
        Ok(sandbox)
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), SandboxError> {
        loop {
            if self.response.drain() {
                let state = self.region.shared()?.control.guest_state.load(Ordering::Acquire);
                if state == GUEST_READY {
                    return Ok(());
                }
                self.kill();
                return Err(SandboxError::NotReady(format!("bad guest state {state} after the ready signal")));
            }
            if self.poll_exited() {
                return Err(SandboxError::NotReady(format!("worker {}", self.exit_detail())));
            }
            let now = Instant::now();
            if now >= deadline {
                self.kill();
                return Err(SandboxError::NotReady(format!("no ready signal within {READY_TIMEOUT:?}")));
            }
            self.wait(deadline - now)?;
        }
    }

    /// Time from `start` being called to the worker being ready (cold start).
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The worker's pid (in the daemon's pid namespace).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Hands `input` to the worker without waiting. One request at a time.
    pub fn submit(&mut self, input: &[u8]) -> Result<(), SandboxError> {
        match self.state {
            State::Busy { .. } => return Err(SandboxError::Busy),
            State::Dead => return Err(SandboxError::Crashed { detail: format!("worker {}", self.exit_detail()) }),
            State::Idle => {}
        }
        let max = self.limits.max_message_bytes;
        if input.len() > max {
            return Err(SandboxError::TooLarge { len: input.len(), max });
        }
        self.seq += 1;
        let seq = self.seq;
        if let Err(e) = self.region.shared()?.request.push(seq, STATUS_OK, input) {
            // Our own ring refused: the worker tampered with its indices.
            self.kill();
            return Err(SandboxError::Protocol(format!("request ring: {e}")));
        }
        self.request.signal();
        self.state = State::Busy { seq, since: Instant::now() };
        Ok(())
    }

    /// Readable (an eventfd) when a response may be ready.
    pub fn wake_fd(&self) -> RawFd {
        self.response.fd()
    }

    /// Readable (a pidfd) once the worker process has exited.
    pub fn pid_fd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// A finished request's outcome, or `Crashed`/`TimedOut` once known (each
    /// reported once); `None` while the request runs or when there is none.
    pub fn try_take(&mut self) -> Option<Result<Vec<u8>, SandboxError>> {
        let State::Busy { seq, .. } = self.state else {
            if matches!(self.state, State::Idle) && self.poll_exited() {
                return Some(Err(SandboxError::Crashed { detail: format!("idle worker {}", self.exit_detail()) }));
            }
            return None;
        };
        self.response.drain();
        match self.take_response(seq) {
            Ok(Some(outcome)) => {
                self.state = State::Idle;
                return Some(outcome);
            }
            Ok(None) => {}
            Err(e) => {
                self.kill();
                return Some(Err(e));
            }
        }
        if self.poll_exited() {
            return Some(Err(SandboxError::Crashed { detail: format!("worker {} mid-request", self.exit_detail()) }));
        }
        if self.deadline_passed() {
            self.kill();
            return Some(Err(SandboxError::TimedOut));
        }
        None
    }

    fn take_response(&mut self, seq: u64) -> Result<Option<Result<Vec<u8>, SandboxError>>, SandboxError> {
        let mut buf = std::mem::take(&mut self.buf);
        let popped = self.region.shared()?.response.pop_into(&mut buf);
        let frame = match popped {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                self.buf = buf;
                return Ok(None);
            }
            Err(e) => return Err(SandboxError::Protocol(format!("response ring: {e}"))),
        };
        if frame.seq != seq {
            return Err(SandboxError::Protocol(format!("response for request {} while {seq} was pending", frame.seq)));
        }
        let max = self.limits.max_message_bytes;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let outcome = match frame.status {
            STATUS_OK if buf.len() > max => Err(SandboxError::TooLarge { len: buf.len(), max }),
            STATUS_OK => return Ok(Some(Ok(buf))),
            STATUS_HANDLER_ERROR | STATUS_PANIC => Err(SandboxError::Function(text(&buf))),
            STATUS_TOO_LARGE => Err(SandboxError::Function(text(&buf))),
            other => return Err(SandboxError::Protocol(format!("unknown response status {other}"))),
        };
        self.buf = buf;
        Ok(Some(outcome))
    }

    /// Blocking convenience: submit, then sleep on both fds until the
    /// outcome, `timeout` or the time limit (which kills the worker).
    pub fn call(&mut self, input: &[u8], timeout: Duration) -> Result<Vec<u8>, SandboxError> {
        self.submit(input)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(outcome) = self.try_take() {
                return outcome;
            }
            let State::Busy { since, .. } = self.state else {
                return Err(SandboxError::Protocol("request vanished".into()));
            };
            let until = deadline.min(since + self.limits.time_limit);
            let now = Instant::now();
            if now >= until {
                self.kill();
                return Err(SandboxError::TimedOut);
            }
            self.wait(until - now)?;
        }
    }

    /// Whether the request in flight has run longer than `limits.time_limit`.
    pub fn deadline_passed(&self) -> bool {
        matches!(self.state, State::Busy { since, .. } if since.elapsed() >= self.limits.time_limit)
    }

    /// Whether the worker can take requests.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, State::Dead)
    }

    /// How the worker ended, once it has.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    /// SIGKILL, reap and remove the cgroup. Idempotent; `Drop` does the same.
    pub fn kill(&mut self) {
        if self.exit.is_none() {
            // SAFETY: signalling our own child through its pidfd (no pid reuse race).
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, 0, 0) };
            self.reap(0);
        }
        self.state = State::Dead;
        if let Some(mut cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }

    /// What was actually applied to this worker.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// Reaps the worker if its pidfd says it exited. True once it is gone.
    fn poll_exited(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        let mut pfd = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one live pollfd without blocking.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) } > 0;
        if ready {
            self.reap(0);
            // Read OOM evidence before the cgroup goes away.
            self.oom_killed = self.cgroup.as_ref().is_some_and(Cgroup::oom_killed);
            self.kill();
        }
        self.exit.is_some()
    }

    fn reap(&mut self, flags: libc::c_int) {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child, writing its status to a live int.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            if rc == self.pid {
                self.exit = Some(if libc::WIFSIGNALED(status) {
                    Exit::Signal(libc::WTERMSIG(status))
                } else {
                    Exit::Code(libc::WEXITSTATUS(status))
                });
                return;
            }
            if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if rc < 0 {
                // Already reaped elsewhere (ECHILD): record it as killed.
                self.exit = Some(Exit::Signal(libc::SIGKILL));
            }
            return;
        }
    }

    fn exit_detail(&self) -> String {
        let oom = if self.oom_killed { " (cgroup memory limit: OOM kill)" } else { "" };
        match self.exit {
            Some(Exit::Signal(sig)) => format!("killed by signal {sig} ({}){oom}", signal_name(sig)),
            Some(Exit::Code(code)) => format!("exited with status {code}{oom}"),
            None => "is still running".into(),
        }
    }

    /// Sleeps until a response may be ready, the worker exits, or `timeout`.
    fn wait(&self, timeout: Duration) -> Result<(), SandboxError> {
        let mut fds = [
            libc::pollfd { fd: self.response.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: ppoll on two live pollfds with a valid timespec and no sigmask.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(SandboxError::sys("ppoll", err));
            }
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSYS => "SIGSYS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(64).collect()
}

fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
