//! The data plane: I/O threads, each with its own io_uring ring.
//!
//! Every thread arms an accept on the shared listening socket, reads frames
//! from its connections, answers pings and control requests inline, and hands
//! inference jobs to the model batchers. Batchers write answers straight to
//! the socket (see `conn.rs`); only when bytes are left over do they ask the
//! thread to flush them, through its mailbox and an eventfd the ring polls.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

mod adopt;
mod dag;
mod frames;
mod mailbox;
mod supervise;

use frames::refuse;
use mailbox::Mailbox;
use supervise::supervise;

use super::budget::Charge;
use super::conn::{ConnOut, Frame};
use super::listener::peer_cred;
use super::wire::Status;
use super::ServeContext;
use crate::telemetry;

pub use super::wire::{FLAG_BEST_EFFORT, FLAG_CALIBRATE};

const RECV_BUF: usize = 64 * 1024;
/// Unsent answer bytes above which a connection is no longer read.
const OUT_HIGH_WATER: usize = 4 << 20;
const RING_ENTRIES: u32 = 1024;

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_WAKE: u64 = 4;
const OP_CANCEL: u64 = 5;

fn user_data(op: u64, slot: u32, gen: u32) -> u64 {
    (op << 56) | (u64::from(slot & 0x00ff_ffff) << 32) | u64::from(gen)
}

fn split(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) & 0x00ff_ffff) as u32, ud as u32)
}

/// A ring for one I/O thread: completions are processed only when the thread
/// asks for them (DEFER_TASKRUN), which saves interrupts and context switches;
/// kernels without those flags get a plain ring.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// A running I/O thread.
struct WorkerHandle {
    mailbox: Arc<Mailbox>,
    thread: JoinHandle<()>,
}

/// All I/O threads of the daemon.
pub struct Server {
    workers: Vec<WorkerHandle>,
}

impl Server {
    /// Starts `threads` I/O threads accepting on `listen_fd` (which must outlive them).
    pub fn start(listen_fd: RawFd, threads: usize, ctx: Arc<ServeContext>) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let wake = crate::eventfd::EventFd::new()?;
            let mailbox = Arc::new(Mailbox { flush: Mutex::new(Vec::new()), wake });
            let (mb, cx) = (Arc::clone(&mailbox), Arc::clone(&ctx));
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new().name(format!("io-{i}")).spawn(move || {
                let beat = crate::liveness::node().register(format!("io-{i}"), crate::liveness::Role::Io);
                // The ring is made on the thread that submits to it (SINGLE_ISSUER).
                let ring = match new_ring() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                supervise(Worker::new(ring, listen_fd, mb, cx, beat));
            })?;
            started_rx.recv().map_err(|_| io::Error::other("I/O thread died during start"))??;
            workers.push(WorkerHandle { mailbox, thread });
        }
        Ok(Self { workers })
    }

    /// Wakes every thread so it notices a state change (draining).
    pub fn wake_all(&self) {
        for w in &self.workers {
            w.mailbox.ring();
        }
    }

    /// Waits for every thread to finish, up to `timeout`; true if all did.
    pub fn join(self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        for w in self.workers {
            while !w.thread.is_finished() {
                if Instant::now() >= until {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = w.thread.join();
        }
        true
    }
}

/// One client connection on an I/O thread.
struct Conn {
    /// The sending side, shared with in-flight answers.
    out: Arc<ConnOut>,
    gen: u32,
    rbuf: Box<[u8]>,
    /// Received bytes not yet parsed, from `in_pos`.
    inbuf: Vec<u8>,
    in_pos: usize,
    /// Payload bytes still to drop: a frame refused for the byte budget.
    discard: usize,
    /// The budget's share for the frame being received (charged at its header).
    frame_charge: Option<Charge>,
    /// Bytes the ring is sending (untouched while a send is in flight).
    sending: Vec<u8>,
    sent: usize,
    /// `sending`'s share of the byte budget.
    sending_charge: Option<Charge>,
    recv_armed: bool,
    send_armed: bool,
    /// No more reading: close once answers are flushed.
    closing: bool,
    /// The drain shut the socket's read side (what was sent before is still read).
    read_shut: bool,
    /// Gone: free as soon as no ring operation refers to it.
    dead: bool,
    /// Handed to the kernel's Unix steering under this socket cookie.
    steer_cookie: Option<u64>,
    /// The hand-off was tried and refused (stays on this thread's path).
    steer_refused: bool,
}

impl Conn {
    /// Sends or queues a frame; the caller's slot is marked dirty, so the I/O
    /// thread flushes whatever could not be sent at once.
    fn respond(&self, frame: Frame<'_>, body: &[u8]) {
        self.out.write(&frame.encode(body));
    }
}

struct Worker {
    ring: IoUring,
    listen_fd: RawFd,
    mailbox: Arc<Mailbox>,
    ctx: Arc<ServeContext>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<u32>,
    next_gen: u32,
    accept_armed: bool,
    accept_cancelled: bool,
    dirty: Vec<u32>,
    models: HashMap<u32, Arc<str>>,
    beat: crate::liveness::Heartbeat,
}

impl Worker {
    fn new(
        ring: IoUring,
        listen_fd: RawFd,
        mailbox: Arc<Mailbox>,
        ctx: Arc<ServeContext>,
        beat: crate::liveness::Heartbeat,
    ) -> Self {
        Self {
            ring,
            listen_fd,
            mailbox,
            ctx,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            accept_armed: false,
            accept_cancelled: false,
            dirty: Vec::new(),
            models: HashMap::new(),
            beat,
        }
    }

    /// The same thread's worker on a new ring, with no connections (after
    /// `close_all`); the old ring is dropped only after the old buffers were
    /// leaked by `close_all`, so the kernel never writes into freed memory.
    fn renew(self, ring: IoUring) -> Self {
        let Self { listen_fd, mailbox, ctx, beat, .. } = self;
        Self::new(ring, listen_fd, mailbox, ctx, beat)
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to is owned by a boxed Conn or by
        // the worker and outlives the operation: conns are freed only when no
        // operation is armed on them, and the worker outlives its ring.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                    // The completion queue is full: make room before pushing more.
                    self.ring.submit_and_wait(0).ok();
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_wake()?;
        self.arm_accept()?;
        loop {
            self.beat.beat();
            self.poll_briefly()?;
            if let Err(e) = self.ring.submit_and_wait(1) {
                // Interrupted or the completion queue is full: reap and go on.
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)) {
                    return Err(e);
                }
            }
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                let (op, slot, gen) = split(ud);
                match op {
                    OP_ACCEPT => self.on_accept(res)?,
                    OP_RECV => self.on_recv(slot, gen, res),
                    OP_SEND => self.on_send(slot, gen, res),
                    OP_WAKE => self.on_wake()?,
                    _ => {}
                }
            }
            self.flush()?;
            if self.ctx.state.is_draining() {
                if self.accept_armed && !self.accept_cancelled {
                    self.push(
                        opcode::AsyncCancel::new(user_data(OP_ACCEPT, 0, 0))
                            .build()
                            .user_data(user_data(OP_CANCEL, 0, 0)),
                    )?;
                    self.accept_cancelled = true;
                }
                // Stop the clients' writes, but read what they already sent:
                // every frame in a socket is answered (ShuttingDown) before it
                // closes. A write after this fails with EPIPE at the client.
                for slot in 0..self.conns.len() {
                    if let Some(c) = self.conns[slot].as_deref_mut().filter(|c| !c.read_shut) {
                        c.read_shut = true;
                        // SAFETY: shutdown of the read side of a socket this connection owns.
                        unsafe { libc::shutdown(c.out.raw_fd(), libc::SHUT_RD) };
                        self.dirty.push(slot as u32);
                    }
                }
                if !self.dirty.is_empty() {
                    self.flush()?;
                }
                if self.drained() {
                    self.close_all();
                    return Ok(());
                }
            }
        }
    }

    /// With `busy_poll` set, reaps completions without sleeping for up to that
    /// long, so a client's next request finds the thread awake.
    fn poll_briefly(&mut self) -> io::Result<()> {
        let budget = self.ctx.limits.busy_poll;
        if budget.is_zero() {
            return Ok(());
        }
        const IORING_ENTER_GETEVENTS: u32 = 1;
        let until = Instant::now() + budget;
        while self.ring.completion().is_empty() && Instant::now() < until {
            let pending = self.ring.submission().len() as u32;
            // SAFETY: a plain io_uring_enter on our own ring with no extra argument;
            // the submission entries it may submit point to live buffers (see `push`).
            unsafe { self.ring.submitter().enter::<libc::sigset_t>(pending, 0, IORING_ENTER_GETEVENTS, None)? };
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Draining, every connection read to its end, and nothing left to answer or send.
    fn drained(&self) -> bool {
        self.conns.iter().flatten().all(|c| c.closing && !c.send_armed && c.sending.is_empty() && c.out.idle())
    }

    fn close_all(&mut self) {
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns[slot].take() {
                // Armed ops (recv) complete with 0, but the ring is dropped right
                // after, so nothing reads the buffers again.
                c.out.close();
                telemetry::connections(-1.0);
                self.ctx.state.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                // Keep the buffers alive until the ring is gone.
                std::mem::forget(c);
            }
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        // Poll, then read without blocking: a plain read of an eventfd would be
        // handed to an io-wq worker, one more thread to wake per answer.
        let sqe = opcode::PollAdd::new(types::Fd(self.mailbox.wake.fd()), libc::POLLIN as u32)
            .build()
            .user_data(user_data(OP_WAKE, 0, 0));
        self.push(sqe)
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        if self.accept_armed || self.ctx.state.is_draining() {
            return Ok(());
        }
        let sqe = opcode::Accept::new(types::Fd(self.listen_fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(OP_ACCEPT, 0, 0));
        self.accept_armed = true;
        self.push(sqe)
    }

    fn on_accept(&mut self, res: i32) -> io::Result<()> {
        self.accept_armed = false;
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if res != -libc::ECANCELED && !self.ctx.state.is_draining() {
                tracing::warn!(error = %err, "accept failed");
                if matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            return self.arm_accept();
        }
        // SAFETY: the kernel just gave us this fd.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        self.arm_accept()?;
        let state = &self.ctx.state;
        let open = state.connections.load(std::sync::atomic::Ordering::Relaxed);
        if open >= self.ctx.limits.max_connections {
            telemetry::refused("too_many_connections");
            refuse(&fd, Status::TooManyConnections);
            return Ok(());
        }
        match peer_cred(fd.as_raw_fd()) {
            Ok(cred) if self.ctx.limits.allow.permits(&cred) => {}
            Ok(cred) => {
                telemetry::refused("unauthorized");
                tracing::debug!(uid = cred.uid, gid = cred.gid, pid = cred.pid, "peer not in allowlist");
                refuse(&fd, Status::Unauthorized);
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(error = %e, "SO_PEERCRED failed");
                return Ok(());
            }
        }
        state.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        telemetry::connections(1.0);
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let conn = Box::new(Conn {
            out: Arc::new(ConnOut::new(fd, Arc::clone(&self.ctx.budget))),
            gen,
            rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
            inbuf: Vec::new(),
            in_pos: 0,
            discard: 0,
            frame_charge: None,
            sending: Vec::new(),
            sent: 0,
            sending_charge: None,
            recv_armed: false,
            send_armed: false,
            closing: false,
            read_shut: false,
            dead: false,
            steer_cookie: None,
            steer_refused: false,
        });
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.try_adopt(slot);
        self.arm_recv(slot)
    }

    fn conn(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize)?.as_deref_mut().filter(|c| c.gen == gen)
    }

    fn arm_recv(&mut self, slot: u32) -> io::Result<()> {
        let Some(c) = self.conns[slot as usize].as_deref_mut() else {
            return Ok(());
        };
        if c.recv_armed || c.closing || c.dead {
            return Ok(());
        }
        c.recv_armed = true;
        let sqe = opcode::Recv::new(types::Fd(c.out.raw_fd()), c.rbuf.as_mut_ptr(), c.rbuf.len() as u32)
            .build()
            .user_data(user_data(OP_RECV, slot, c.gen));
        self.push(sqe)
    }

    fn on_recv(&mut self, slot: u32, gen: u32, res: i32) {
        let Some(c) = self.conn(slot, gen) else {
            return;
        };
        c.recv_armed = false;
        if res == 0 && c.read_shut {
            // The end of what the client sent before the drain: answer, flush, close.
            c.closing = true;
            c.out.wake_when_idle.store(true, std::sync::atomic::Ordering::Release);
            self.dirty.push(slot);
            return;
        }
        if res == -libc::EAGAIN {
            // The ring gave up after repeated wake-ups with nothing to read
            // (the kernel's Unix steering takes the bytes that woke it): read again.
            self.dirty.push(slot);
            return;
        }
        if res <= 0 {
            tracing::debug!(slot, res, "connection closed: recv ended");
            c.dead = true;
            self.dirty.push(slot);
            return;
        }
        let n = res as usize;
        c.inbuf.extend_from_slice(&c.rbuf[..n]);
        self.parse_frames(slot);
        self.try_adopt(slot);
        self.dirty.push(slot);
    }

    fn on_wake(&mut self) -> io::Result<()> {
        self.mailbox.wake.drain();
        let flush = std::mem::take(&mut *self.mailbox.flush.lock().unwrap_or_else(|p| p.into_inner()));
        for (slot, gen) in flush {
            if self.conn(slot, gen).is_some() {
                self.dirty.push(slot);
            }
        }
        self.arm_wake()
    }

    fn on_send(&mut self, slot: u32, gen: u32, res: i32) {
        let Some(c) = self.conn(slot, gen) else {
            return;
        };
        c.send_armed = false;
        if res < 0 {
            tracing::debug!(slot, res, "connection closed: send failed");
            c.dead = true;
        } else {
            c.sent += res as usize;
            if c.sent >= c.sending.len() {
                c.sending.clear();
                c.sent = 0;
                c.sending_charge = None;
            }
        }
        self.dirty.push(slot);
    }

    /// Arms sends and receives, and frees finished connections.
    fn flush(&mut self) -> io::Result<()> {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for slot in dirty.iter().copied() {
            let Some(c) = self.conns[slot as usize].as_deref_mut() else {
                continue;
            };
            if c.dead {
                if c.recv_armed || c.send_armed {
                    // Shutting the socket down makes armed ops complete.
                    c.out.close();
                    continue;
                }
                self.release(slot);
                continue;
            }
            if !c.send_armed {
                if c.sending.is_empty() {
                    // Take what writers queued; the ring owns the stream's tail until
                    // it is sent, so nobody writes around it.
                    let mut q = c.out.lock();
                    if q.pending.is_empty() {
                        q.ring_owned = false;
                    } else {
                        std::mem::swap(&mut c.sending, &mut q.pending);
                        c.sending_charge = q.charge.take();
                        q.ring_owned = true;
                        c.sent = 0;
                    }
                }
                if c.sent < c.sending.len() {
                    // Try the socket first; the ring takes what does not fit.
                    match c.out.send_now(&c.sending[c.sent..]) {
                        Ok(n) => c.sent += n,
                        Err(e) => {
                            tracing::debug!(slot, error = %e, "connection closed: send failed");
                            c.dead = true;
                            self.dirty.push(slot);
                            continue;
                        }
                    }
                    if c.sent >= c.sending.len() {
                        c.sending.clear();
                        c.sent = 0;
                        c.sending_charge = None;
                        // Look again: more may have been queued meanwhile.
                        self.dirty.push(slot);
                        continue;
                    }
                    c.send_armed = true;
                    let buf = &c.sending[c.sent..];
                    let sqe = opcode::Send::new(types::Fd(c.out.raw_fd()), buf.as_ptr(), buf.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(user_data(OP_SEND, slot, c.gen));
                    self.push(sqe)?;
                    // Keep reading while the ring sends, up to the high-water mark below.
                }
            }
            let Some(c) = self.conns[slot as usize].as_deref_mut() else {
                continue;
            };
            if c.closing && !c.send_armed && c.sending.is_empty() && c.out.idle() {
                c.dead = true;
                self.dirty.push(slot);
                continue;
            }
            // Backpressure: a client that does not read its answers stops being
            // read until they drain (each completed send marks the slot dirty).
            let unsent = c.sending.len() - c.sent + c.out.lock().pending.len();
            if unsent > OUT_HIGH_WATER {
                continue;
            }
            self.arm_recv(slot)?;
        }
        if !self.dirty.is_empty() {
            return self.flush();
        }
        Ok(())
    }

    fn release(&mut self, slot: u32) {
        if let Some(c) = self.conns[slot as usize].take() {
            if let (Some(us), Some(cookie)) = (self.ctx.steering.as_ref().and_then(|s| s.unix()), c.steer_cookie) {
                us.release(cookie);
            }
            c.out.close();
            self.free.push(slot);
            telemetry::connections(-1.0);
            self.ctx.state.connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
