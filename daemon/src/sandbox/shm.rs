//! The daemon side of a sandbox's shared memory and wake-ups: a sealed memfd
//! mapped with `memmap2` and laid out by `gati_sdk::layout`, and the two
//! eventfds (request: daemon → function, response: function → daemon).
//!
//! The function maps the whole region read-write and may write any byte of it
//! at any time, so the daemon holds it as a raw mapping ([`MmapRaw`]) and never
//! as `&[u8]`/`&mut [u8]`: every access goes through the `gati_sdk` ring API,
//! which reads the control words and indices atomically, copies data with
//! volatile accesses into daemon-owned buffers and checks what it read.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use gati_sdk::layout::{Layout, Shared};
use memmap2::{MmapOptions, MmapRaw};

use super::SandboxError;

/// A sandbox's shared region. The memfd is sealed against shrinking and
/// growing, so the function cannot truncate it under the daemon (SIGBUS).
pub struct SharedRegion {
    memfd: File,
    map: MmapRaw,
    layout: Layout,
}

impl SharedRegion {
    /// Creates a region whose rings each carry one message of `max_message` bytes.
    pub fn create(max_message: usize) -> Result<SharedRegion, SandboxError> {
        let layout = Layout::for_max_message(max_message);
        let name: &CStr = c"gati-sandbox";
        // SAFETY: `name` is a valid C string; the flags are constants.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(SandboxError::sys("memfd_create", io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(layout.total_len() as u64).map_err(|e| SandboxError::sys("ftruncate(memfd)", e))?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd with constant seal flags.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(SandboxError::sys("fcntl(F_ADD_SEALS)", io::Error::last_os_error()));
        }
        let map = MmapOptions::new()
            .len(layout.total_len())
            .map_raw(&memfd)
            .map_err(|e| SandboxError::sys("mmap(memfd)", e))?;
        // SAFETY: `map` is `total_len` bytes of a memfd sealed against size
        // changes (no SIGBUS), alive as long as `self`, and reached only
        // through the layout's view; no function has it yet.
        unsafe { layout.init_raw(map.as_mut_ptr(), map.len()) }.map_err(|e| SandboxError::Protocol(e.to_string()))?;
        Ok(SharedRegion { memfd, map, layout })
    }

    pub fn fd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The control block and both rings. `&mut self`: one view at a time.
    pub fn shared(&mut self) -> Result<Shared<'_>, SandboxError> {
        // SAFETY: the mapping stays fully backed while `self` lives (sealed
        // memfd, see `create`), the view borrows `self` exclusively so it is
        // the only way this process reaches the bytes meanwhile, and the
        // function's concurrent writes are what `split_raw` is built for:
        // atomics for control words and indices, checked volatile copies for data.
        unsafe { self.layout.split_raw(self.map.as_mut_ptr(), self.map.len()) }
            .map_err(|e| SandboxError::Protocol(e.to_string()))
    }
}

/// The daemon's eventfd, used as a doorbell.
pub use crate::eventfd::EventFd;
