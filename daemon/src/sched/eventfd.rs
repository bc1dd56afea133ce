//! A non-blocking eventfd: the wake-up every SGS source uses (inbox, model
//! replies, test workers), polled on the SGS's ring.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A counter fd that becomes readable when signalled.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd; a full counter
        // (EAGAIN) still leaves it readable, which is all a signal needs.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the counter; true if it had been signalled.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: non-blocking 8-byte read into a live u64.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut v).cast(), 8) };
        n == 8
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
