//! The daemon's one eventfd type: the doorbell of I/O-thread mailboxes, SGS
//! inboxes, model replies, core leases and the daemon ↔ sandbox rings.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A counter fd that becomes readable when signalled.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A non-blocking eventfd (polled on a ring, drained without waiting).
    pub fn new() -> io::Result<Self> {
        Self::with_flags(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
    }

    /// A blocking one: for an fd another process waits on with a plain read
    /// (O_NONBLOCK lives on the open file description, which it shares).
    pub fn blocking() -> io::Result<Self> {
        Self::with_flags(libc::EFD_CLOEXEC)
    }

    fn with_flags(flags: i32) -> io::Result<Self> {
        // SAFETY: plain eventfd(2) with constant flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable. Interrupted writes are retried; the only other
    /// failure of a write to a live eventfd is a full counter (EAGAIN), which
    /// leaves it readable, all a signal needs.
    pub fn signal(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            let n = unsafe { libc::write(self.fd(), (&raw const one).cast(), 8) };
            if n == 8 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }

    /// Resets the counter without blocking (on a non-blocking fd); true if it
    /// had been signalled.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        loop {
            // SAFETY: an 8-byte read into a live, exclusively borrowed u64.
            let n = unsafe { libc::read(self.fd(), (&raw mut v).cast(), 8) };
            if n == 8 {
                return v > 0;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_drained_once() {
        let e = EventFd::new().unwrap();
        assert!(!e.drain());
        e.signal();
        e.signal();
        assert!(e.drain());
        assert!(!e.drain());
    }
}
