//! A client connection's sending side, shared by its I/O thread and the
//! batcher threads that answer its requests.
//!
//! Whoever has an answer writes it straight to the socket when nothing is
//! queued ahead of it (the common case: one wake-up less per answer); otherwise
//! the bytes queue behind the ones already waiting and the I/O thread sends
//! them through its ring. All writes take one lock, so frames never interleave.
//! The socket closes when the last holder (the connection or an in-flight
//! answer) drops it, so a batcher can never write to a reused descriptor.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use zerocopy::IntoBytes;

use super::budget::{ByteBudget, Charge};
use super::wire::{Dtype, ResponseHeader, Status};

/// Bytes waiting to be sent and who is sending them.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Frames not yet handed to the socket or the ring.
    pub pending: Vec<u8>,
    /// The I/O thread's ring owns the stream's tail: writers must queue.
    pub ring_owned: bool,
    /// The connection is gone: writes are dropped.
    pub closed: bool,
    /// `pending`'s share of the node's byte budget.
    pub charge: Option<Charge>,
}

impl OutQueue {
    /// Queues bytes behind the pending ones, charging them to the budget.
    fn queue(&mut self, budget: &Arc<ByteBudget>, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        match &mut self.charge {
            Some(c) => c.grow(bytes.len()),
            None => self.charge = Some(budget.force(bytes.len())),
        }
    }
}

/// The shared sending side of one connection.
#[derive(Debug)]
pub struct ConnOut {
    fd: OwnedFd,
    budget: Arc<ByteBudget>,
    queue: Mutex<OutQueue>,
    /// Inference requests submitted on this connection and not yet answered.
    pub inflight: AtomicU32,
    /// The I/O thread waits for this connection to go idle (it is closing): the
    /// last answer must wake it.
    pub wake_when_idle: AtomicBool,
}

/// A response frame's fields beyond the payload.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub kind: u16,
    pub request_id: u64,
    pub status: Status,
    pub dtype: Dtype,
    pub shape: &'a [u32],
    pub exit_stage: u16,
    pub server_us: u32,
}

impl Frame<'_> {
    /// A frame with no tensor (errors, control answers).
    pub fn plain(kind: u16, request_id: u64, status: Status, server_us: u32) -> Frame<'static> {
        Frame { kind, request_id, status, dtype: Dtype::Bytes, shape: &[], exit_stage: 0, server_us }
    }

    /// Header + payload bytes.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut h =
            ResponseHeader::new(self.kind, self.request_id, self.status, self.dtype, self.shape, body.len() as u32);
        h.exit_stage.set(self.exit_stage);
        h.server_us.set(self.server_us);
        let mut out = Vec::with_capacity(h.as_bytes().len() + body.len());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(body);
        out
    }
}

impl ConnOut {
    pub fn new(fd: OwnedFd, budget: Arc<ByteBudget>) -> Self {
        Self {
            fd,
            budget,
            queue: Mutex::new(OutQueue::default()),
            inflight: AtomicU32::new(0),
            wake_when_idle: AtomicBool::new(false),
        }
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// The queue, for the I/O thread's flushing.
    pub fn lock(&self) -> MutexGuard<'_, OutQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `bytes` now if nothing is ahead of them, else queues them. Returns
    /// true when the I/O thread must flush the queue (it holds unsent bytes and
    /// the ring is not already on it).
    pub fn write(&self, bytes: &[u8]) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        if q.ring_owned || !q.pending.is_empty() {
            q.queue(&self.budget, bytes);
            return !q.ring_owned;
        }
        match self.send_now(bytes) {
            Ok(n) if n == bytes.len() => false,
            Ok(n) => {
                q.queue(&self.budget, &bytes[n..]);
                true
            }
            Err(_) => {
                q.closed = true;
                false
            }
        }
    }

    /// One non-blocking send; `Ok(0)` when the socket buffer is full.
    pub fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: non-blocking send from a live buffer on the socket this struct owns.
        let n = unsafe {
            libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(0),
            _ => Err(err),
        }
    }

    /// Marks the connection gone and tells the peer; the descriptor itself closes
    /// when the last holder drops.
    pub fn close(&self) {
        self.lock().closed = true;
        // SAFETY: shutdown on the socket this struct owns.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Nothing queued and nothing in flight.
    pub fn idle(&self) -> bool {
        self.inflight.load(Ordering::Acquire) == 0 && {
            let q = self.lock();
            q.pending.is_empty() && !q.ring_owned
        }
    }
}
