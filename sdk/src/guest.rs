//! The function side of the protocol: map the region, say ready, then for each
//! request sleep on the request eventfd (never spin), run the handler, push the
//! response and ring the response eventfd.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use memmap2::MmapOptions;

use crate::layout::{
    Layout, LayoutError, GUEST_READY, STATUS_HANDLER_ERROR, STATUS_OK, STATUS_PANIC, STATUS_TOO_LARGE,
};
use crate::ring::RingError;
use crate::{DEFAULT_FDS, FDS_ENV};

/// Why [`try_serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{FDS_ENV} is malformed: {0:?}")]
    BadFdsEnv(String),
    #[error("fd {fd} is not open (not started by gatid?)")]
    MissingFd { fd: RawFd, source: io::Error },
    #[error("mmap of the shared memfd failed")]
    Map(#[source] io::Error),
    #[error("shared region: {0}")]
    Layout(#[from] LayoutError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("eventfd {op} on fd {fd} failed")]
    EventFd { op: &'static str, fd: RawFd, source: io::Error },
}

/// Serves requests with `handler` until the process is killed. On a setup
/// error it prints the error to stderr and exits with status 70 (EX_SOFTWARE).
pub fn serve<F>(handler: F) -> !
where
    F: FnMut(&[u8]) -> Result<Vec<u8>, String>,
{
    let Err(e) = try_serve(handler);
    eprintln!("gati-sdk: {e}");
    std::process::exit(70)
}

/// Like [`serve`], but returns the error instead of exiting.
pub fn try_serve<F>(mut handler: F) -> Result<Infallible, ServeError>
where
    F: FnMut(&[u8]) -> Result<Vec<u8>, String>,
{
    let [mem_fd, request_fd, response_fd] = fds_from_env()?;
    for fd in [mem_fd, request_fd, response_fd] {
        // SAFETY: F_GETFD only reads the descriptor flags of `fd`.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ServeError::MissingFd { fd, source: io::Error::last_os_error() });
        }
    }
    // SAFETY: by the fd convention (crate docs) `mem_fd` is the memfd the daemon
    // passed us and nothing else in this process owns it; we take it over once.
    let mem = unsafe { File::from_raw_fd(mem_fd) };
    // A raw mapping: it never hands out references to the bytes, which the
    // daemon writes while we run.
    let map = MmapOptions::new().map_raw(&mem).map_err(ServeError::Map)?;
    // SAFETY: the memfd is sealed against shrinking by the daemon, so the
    // mapping stays fully backed while `map` lives (to the end of this
    // function, which never returns while serving); nothing else in this
    // process reaches it. The daemon may write any byte at any time: the
    // layout and the rings read it only atomically or with volatile copies
    // and check what they read.
    let layout = unsafe { Layout::read_from_raw(map.as_mut_ptr(), map.len()) }?;
    // SAFETY: as above; this is the only view of the region.
    let mut shared = unsafe { layout.split_raw(map.as_mut_ptr(), map.len()) }?;
    shared.control.guest_pid.store(std::process::id(), Ordering::Relaxed);
    shared.control.guest_state.store(GUEST_READY, Ordering::Release);
    signal(response_fd)?;

    let mut input = Vec::new();
    loop {
        wait(request_fd)?;
        while let Some(frame) = shared.request.pop_into(&mut input)? {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler(&input)));
            let max = layout.max_message;
            let pushed = match outcome {
                Ok(Ok(output)) if output.len() <= max => shared.response.push(frame.seq, STATUS_OK, &output),
                Ok(Ok(output)) => {
                    let msg = format!("response of {} bytes exceeds the limit of {max}", output.len());
                    shared.response.push(frame.seq, STATUS_TOO_LARGE, truncate(msg.as_bytes(), max))
                }
                Ok(Err(msg)) => shared.response.push(frame.seq, STATUS_HANDLER_ERROR, truncate(msg.as_bytes(), max)),
                Err(panic) => {
                    let msg = panic_message(&*panic);
                    shared.response.push(frame.seq, STATUS_PANIC, truncate(msg.as_bytes(), max))
                }
            };
            pushed?;
            signal(response_fd)?;
        }
    }
}

fn fds_from_env() -> Result<[RawFd; 3], ServeError> {
    let Ok(value) = std::env::var(FDS_ENV) else { return Ok(DEFAULT_FDS) };
    let parsed: Vec<RawFd> = value.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    match parsed.as_slice() {
        [a, b, c] if *a >= 0 && *b >= 0 && *c >= 0 => Ok([*a, *b, *c]),
        _ => Err(ServeError::BadFdsEnv(value)),
    }
}

fn truncate(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("handler panicked: {}", text.unwrap_or("(non-string payload)"))
}

/// Blocks until the eventfd's counter is non-zero, then resets it.
fn wait(fd: RawFd) -> Result<(), ServeError> {
    let mut value = 0u64;
    loop {
        // SAFETY: reads 8 bytes into a live, exclusively borrowed u64.
        let n = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(ServeError::EventFd { op: "read", fd, source: err });
    }
}

/// Adds 1 to the eventfd's counter, waking the other side.
fn signal(fd: RawFd) -> Result<(), ServeError> {
    let one = 1u64;
    loop {
        // SAFETY: writes 8 bytes from a live u64.
        let n = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(ServeError::EventFd { op: "write", fd, source: err });
    }
}
