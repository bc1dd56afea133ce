//! An exec function as a plain child process: long-lived, one request at a
//! time over its stdin/stdout.
//!
//! Framing both ways: a u32 little-endian length, then that many bytes. The
//! request is written whole with one non-blocking write (the pipe is sized to
//! hold the largest message), the response is read as it arrives. The pidfd
//! tells the SGS when the process exits. No isolation beyond a separate
//! process: the sandbox module supersedes this for untrusted programs.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Worker, WorkerError};
use crate::sched::function::Limits;

/// A child process serving one function.
pub struct ProcessWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    pidfd: OwnedFd,
    buf: Vec<u8>,
    started: Option<Instant>,
    time_limit: Duration,
    max_message: usize,
    exited: bool,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; flags are read, then OR-ed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ProcessWorker {
    /// Spawns `program args` (blocking: this is the cold start).
    pub fn start(program: &Path, args: &[String], limits: &Limits) -> Result<Self, WorkerError> {
        let start = |what: &str, e: io::Error| WorkerError::Start(format!("{what} {}: {e}", program.display()));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| start("spawn", e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WorkerError::Start("no pipes".into()));
        };
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        // SAFETY: pidfd_open(2) on our own child's pid; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if fd < 0 {
            let e = io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            return Err(start("pidfd_open for", e));
        }
        // SAFETY: fresh descriptor owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let max_message = limits.max_message_bytes;
        let want = i32::try_from(max_message + 4).unwrap_or(i32::MAX);
        // SAFETY: F_SETPIPE_SZ on our pipe; failure (above pipe-max-size) only means
        // large messages are refused with TooLarge.
        unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        for fd in [stdin.as_raw_fd(), stdout.as_raw_fd()] {
            if let Err(e) = set_nonblocking(fd) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(start("fcntl for", e));
            }
        }
        Ok(Self {
            child,
            stdin,
            stdout,
            pidfd,
            buf: Vec::new(),
            started: None,
            time_limit: limits.time_limit,
            max_message,
            exited: false,
        })
    }

    /// The child's pid (tests kill it to simulate a crash).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn crashed(&mut self) -> WorkerError {
        self.exited = true;
        self.started = None;
        let status = self.child.try_wait().ok().flatten();
        WorkerError::Crashed(status.map_or_else(|| "closed its output".into(), |s| s.to_string()))
    }
}

impl Worker for ProcessWorker {
    fn submit(&mut self, input: Vec<u8>) -> Result<(), WorkerError> {
        if self.started.is_some() {
            return Err(WorkerError::Busy);
        }
        if input.len() > self.max_message {
            return Err(WorkerError::TooLarge { got: input.len(), limit: self.max_message });
        }
        let len = u32::try_from(input.len())
            .map_err(|_| WorkerError::TooLarge { got: input.len(), limit: self.max_message })?;
        let mut frame = Vec::with_capacity(4 + input.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&input);
        match self.stdin.write(&frame) {
            Ok(n) if n == frame.len() => {}
            Ok(_) | Err(_) if self.child.try_wait().ok().flatten().is_some() => return Err(self.crashed()),
            Ok(n) => {
                // The worker's stream is now out of frame: it cannot be reused.
                self.kill();
                return Err(WorkerError::Crashed(format!("pipe took {n} of {} bytes", frame.len())));
            }
            Err(e) => {
                self.kill();
                return Err(WorkerError::Crashed(format!("write: {e}")));
            }
        }
        self.buf.clear();
        self.started = Some(Instant::now());
        Ok(())
    }

    fn fds(&self) -> [Option<RawFd>; 2] {
        [Some(self.stdout.as_raw_fd()), Some(self.pidfd.as_raw_fd())]
    }

    fn try_take(&mut self) -> Option<Result<Vec<u8>, WorkerError>> {
        if self.exited {
            return None;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stdout.read(&mut chunk) {
                Ok(0) => return Some(Err(self.crashed())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Some(Err(self.crashed())),
            }
        }
        if self.buf.len() >= 4 {
            let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > self.max_message {
                self.kill();
                return Some(Err(WorkerError::TooLarge { got: len, limit: self.max_message }));
            }
            if self.buf.len() >= 4 + len {
                if self.started.take().is_none() || self.buf.len() > 4 + len {
                    // Output nobody asked for: the stream cannot be trusted any more.
                    self.kill();
                    return Some(Err(WorkerError::Crashed("wrote unrequested output".into())));
                }
                let out = self.buf[4..4 + len].to_vec();
                self.buf.clear();
                return Some(Ok(out));
            }
        }
        None
    }

    fn overdue(&self) -> bool {
        self.started.is_some_and(|s| s.elapsed() > self.time_limit)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
        self.started = None;
    }
}

impl Drop for ProcessWorker {
    fn drop(&mut self) {
        if !self.exited {
            self.kill();
        } else {
            let _ = self.child.wait();
        }
    }
}
