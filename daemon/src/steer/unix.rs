//! Unix stream clients steered by the kernel (`[steer] unix = "kernel"`).
//!
//! The I/O thread hands each accepted connection to [`UnixSteer::adopt`] once
//! nothing the client sent is unread ([`unread`] = 0, none unparsed): its
//! socket cookie names it, the socket joins the sockhash the `steer_unix`
//! verdict is attached to, and its sending side is registered here. The
//! verdict redirects a write() that is exactly one well-formed `InvokeDag`
//! frame for a routed DAG, stamped with the connection's cookie, into the
//! receive queue of its SGS's socket (one end of a socketpair per SGS,
//! [`UnixSgsSocket`], read on the SGS's ring); everything else reaches the I/O
//! thread as without steering. The SGS answers on the client's connection
//! through the registered sending side (the same lock as every writer, so
//! frames never interleave). Answers carry the request id: ordering is per
//! request, not per connection.
//!
//! Checks as on the I/O thread's path: draining → `ShuttingDown`, the
//! connection's in-flight limit → `Busy`, the SGS's queue → `Busy`, the DAG
//! id and payload framing. A steered frame is not charged to the node's byte
//! budget (it lives in the SGS's socket buffer until read). A frame whose
//! connection is gone is dropped and counted `dropped`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use super::layout::{Counter, MAX_SGS, OFF_STAMP};
use super::udp::UdpCounters;
use super::{Kernel, SteerError};
use crate::api::conn::{ConnOut, Frame};
use crate::api::wire::{Dtype, Kind, RequestHeader, Status, HEADER_LEN};
use crate::api::NodeState;
use crate::sched::{DagReply, DagRequest, DagResult, Deployment, Ingress};
use crate::telemetry;

/// Frames one SGS reads per readiness before it schedules again.
const BATCH: usize = 32;

/// How an answering thread reaches a connection: its sending side, and a
/// wake-up of its I/O thread (to flush what did not fit, or to close).
#[derive(Clone)]
pub struct Peer {
    pub out: Arc<ConnOut>,
    pub notify: Arc<dyn Fn() + Send + Sync>,
}

/// What the SGS sockets need from the node (set once the API server exists).
pub struct UnixLimits {
    pub state: Arc<NodeState>,
    pub max_inflight_per_conn: u32,
}

/// An SGS's Unix socket: the end the kernel redirects into and the SGS reads,
/// its peer (kept open), and the bytes read but not yet a whole frame (shared
/// by every reader of the socket, so a new scheduler's SGS goes on where the
/// old one stopped).
struct SgsPair {
    rx: Arc<UnixStream>,
    _tx: UnixStream,
    partial: Arc<Mutex<Vec<u8>>>,
}

/// The registry of adopted connections and the SGSs' Unix sockets.
pub struct UnixSteer {
    kernel: Arc<Mutex<Kernel>>,
    peers: RwLock<HashMap<u64, Peer>>,
    /// Per SGS, its socket pair.
    sgs: Mutex<Vec<Option<SgsPair>>>,
    limits: OnceLock<UnixLimits>,
    max_frame: usize,
    /// What the SGS side saw: `steered` frames read, `dropped` (connection gone).
    pub counters: Arc<UdpCounters>,
}

impl UnixSteer {
    pub fn new(kernel: Arc<Mutex<Kernel>>, max_frame: usize) -> Arc<Self> {
        Arc::new(Self {
            kernel,
            peers: RwLock::default(),
            sgs: Mutex::default(),
            limits: OnceLock::new(),
            max_frame,
            counters: Arc::default(),
        })
    }

    /// Sets the node's state and limits (the first call wins).
    pub fn set_limits(&self, limits: UnixLimits) {
        let _ = self.limits.set(limits);
    }

    /// Hands an accepted connection to the kernel; its cookie, which the I/O
    /// thread passes to [`release`](Self::release) when it closes. `None`: it
    /// stays on the userspace path (logged).
    pub fn adopt(&self, peer: Peer) -> Option<u64> {
        let fd = peer.out.raw_fd();
        let cookie = match socket_cookie(fd) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "SO_COOKIE failed: connection steered in userspace");
                return None;
            }
        };
        self.peers.write().unwrap_or_else(|p| p.into_inner()).insert(cookie, peer);
        let added = self.kernel.lock().unwrap_or_else(|p| p.into_inner()).unix_adopt(cookie, &Fd(fd));
        if let Err(e) = added {
            tracing::debug!(error = %super::chain(&e), "connection not added to the sockhash: steered in userspace");
            self.peers.write().unwrap_or_else(|p| p.into_inner()).remove(&cookie);
            return None;
        }
        // Bytes that arrived between the caller's check and the insert met no
        // verdict. Whole frames keep the verdict's view at a frame boundary
        // (whichever reads them, the I/O thread or a later verdict); anything
        // else leaves its boundaries unknown, so it passes everything.
        if unread(fd) != 0 && !queued_whole_frames(fd) {
            self.kernel.lock().unwrap_or_else(|p| p.into_inner()).unix_mark_lost(cookie);
        }
        Some(cookie)
    }

    /// Forgets a connection the I/O thread closes.
    pub fn release(&self, cookie: u64) {
        self.peers.write().unwrap_or_else(|p| p.into_inner()).remove(&cookie);
        self.kernel.lock().unwrap_or_else(|p| p.into_inner()).unix_forget(cookie);
    }

    /// Connections adopted and still open.
    pub fn adopted(&self) -> usize {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn peer(&self, cookie: u64) -> Option<Peer> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).get(&cookie).cloned()
    }

    /// SGS `k`'s ingress (its socket made and put in the map when missing).
    pub fn sgs_ingress(self: &Arc<Self>, k: usize) -> Result<Option<UnixSgsSocket>, SteerError> {
        if k >= MAX_SGS {
            return Ok(None);
        }
        let mut socks = self.sgs.lock().unwrap_or_else(|p| p.into_inner());
        if socks.len() <= k {
            socks.resize_with(k + 1, || None);
        }
        if socks[k].is_none() {
            let (rx, tx) = UnixStream::pair().map_err(|e| SteerError::Io { what: "socketpair", source: e })?;
            rx.set_nonblocking(true).map_err(|e| SteerError::Io { what: "socketpair non-blocking", source: e })?;
            self.kernel.lock().unwrap_or_else(|p| p.into_inner()).unix_set_sgs(k as u32, &rx)?;
            socks[k] = Some(SgsPair { rx: Arc::new(rx), _tx: tx, partial: Arc::default() });
        }
        let pair = socks[k].as_ref().expect("made above");
        let (sock, buf) = (Arc::clone(&pair.rx), Arc::clone(&pair.partial));
        Ok(Some(UnixSgsSocket { sock, steer: Arc::clone(self), buf }))
    }

    /// Empties the slots from `n` on (SGSs a new scheduler does not have).
    pub fn truncate(&self, n: usize) {
        let mut socks = self.sgs.lock().unwrap_or_else(|p| p.into_inner());
        let mut kernel = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        for slot in n..socks.len() {
            if socks[slot].take().is_some() {
                kernel.unix_clear_sgs(slot as u32);
            }
        }
    }
}

/// Bytes queued on a socket and not read yet (`FIONREAD`; an error counts as some).
pub fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; the fd is the caller's live socket.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 1;
    }
    n.max(0) as usize
}

/// The most queued bytes [`queued_whole_frames`] looks at.
const PEEK_MAX: usize = 64 * 1024;

/// Whether the bytes queued on `fd` (peeked, not read; at most [`PEEK_MAX`])
/// are a whole number of well-formed frames. A client that connects and
/// writes at once races the hand-off (its first frame arrives between the
/// I/O thread's last check and the sockhash insert); that frame is whole and
/// the connection stays steerable.
pub fn queued_whole_frames(fd: RawFd) -> bool {
    let mut buf = vec![0u8; PEEK_MAX + 1];
    // SAFETY: recv into a live buffer of its length; MSG_PEEK leaves the bytes queued.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n > 0 && (n as usize) <= PEEK_MAX && whole_frames(&buf[..n as usize])
}

/// Whether `bytes` are a whole number of frames with valid headers.
fn whole_frames(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let Some(head) = bytes.first_chunk::<HEADER_LEN>() else { return false };
        let Ok(h) = RequestHeader::parse(head) else { return false };
        let Some(rest) = bytes.get(HEADER_LEN + h.payload_len.get() as usize..) else { return false };
        bytes = rest;
    }
    true
}

/// A raw fd borrowed for a map insert.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The socket's cookie (`SO_COOKIE`), which also makes the kernel assign it:
/// the verdict reads it from the receiving socket.
pub fn socket_cookie(fd: RawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 out-value of the size given, on a caller-owned fd.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// An SGS's Unix socket: the frames the kernel steered to it, whole and in
/// the order they were redirected (a byte stream of complete frames).
pub struct UnixSgsSocket {
    sock: Arc<UnixStream>,
    steer: Arc<UnixSteer>,
    buf: Arc<Mutex<Vec<u8>>>,
}

impl Ingress for UnixSgsSocket {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn read(&mut self, dep: &Deployment, held: usize, out: &mut Vec<DagRequest>) {
        let mut chunk = [0u8; 16 * 1024];
        let mut frames = 0;
        let buf = Arc::clone(&self.buf);
        let mut buf = buf.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Whole frames first; then read more.
            while let Some(len) = whole_frame(&buf) {
                let frame: Vec<u8> = buf.drain(..len).collect();
                self.handle(dep, held, &frame, out);
                frames += 1;
            }
            if frames >= BATCH {
                return;
            }
            // SAFETY: recv into a live stack buffer of its length, non-blocking.
            let n = unsafe {
                libc::recv(self.sock.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), libc::MSG_DONTWAIT)
            };
            if n <= 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n as usize]);
        }
    }
}

/// Length of the complete frame at the start of `buf`, if it is there.
fn whole_frame(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..HEADER_LEN)?;
    let plen = u32::from_le_bytes(head[24..28].try_into().ok()?) as usize;
    (buf.len() >= HEADER_LEN + plen).then_some(HEADER_LEN + plen)
}

impl UnixSgsSocket {
    fn handle(&self, dep: &Deployment, held: usize, frame: &[u8], out: &mut Vec<DagRequest>) {
        let received = Instant::now();
        let Ok(bytes) = <&[u8; HEADER_LEN]>::try_from(&frame[..HEADER_LEN]) else { return };
        let cookie = u64::from_le_bytes(frame[OFF_STAMP..OFF_STAMP + 8].try_into().expect("8 bytes"));
        let Some(peer) = self.steer.peer(cookie) else {
            self.steer.counters.bump(Counter::Dropped);
            return;
        };
        self.steer.counters.bump(Counter::Steered);
        let Ok(h) = RequestHeader::parse(bytes) else {
            // As the I/O thread does with a header it cannot parse: close the connection.
            peer.out.close();
            return;
        };
        let (kind, rid) = (Kind::InvokeDag as u16, h.request_id.get());
        let payload = &frame[HEADER_LEN..];
        let limits = self.steer.limits.get();
        let refuse = |status: Status, why: &str| {
            peer_write(&peer, &Frame::plain(kind, rid, status, elapsed_us(received)), why.as_bytes());
        };
        if limits.is_some_and(|l| l.state.is_draining()) {
            return refuse(Status::ShuttingDown, "");
        }
        if limits.is_some_and(|l| peer.out.inflight.load(Ordering::Acquire) >= l.max_inflight_per_conn) {
            telemetry::request_refused("inflight_per_conn");
            return refuse(
                Status::Busy,
                "inflight_per_conn: max_inflight_per_conn requests in flight on this connection",
            );
        }
        if payload.len() > self.steer.max_frame {
            return refuse(Status::TooLarge, "");
        }
        if held + out.len() >= crate::sched::sgs::MAX_QUEUED {
            telemetry::request_refused("sgs_queue");
            return refuse(Status::Busy, "sgs_queue: the DAG's scheduler holds its most queued requests");
        }
        let Some(dag) = dep.dag_by_id(h.target_id.get()).cloned() else {
            return refuse(Status::UnknownModel, "");
        };
        if Dtype::from_u8(h.dtype) != Some(Dtype::U8) {
            return refuse(Status::BadDtype, "");
        }
        match h.dims() {
            Some(d) if d.len() == 1 && d[0] == payload.len() => {}
            Some(d) if d.len() == 1 => return refuse(Status::PayloadMismatch, ""),
            _ => return refuse(Status::BadShape, ""),
        }
        let deadline = match h.deadline_us.get() {
            0 => None,
            us => Some(received + Duration::from_micros(u64::from(us))),
        };
        let name = dag.name.clone();
        peer.out.inflight.fetch_add(1, Ordering::AcqRel);
        telemetry::inflight(1.0);
        let state = limits.map(|l| Arc::clone(&l.state));
        let reply = DagReply::new(move |r| {
            let (status, body) = match r {
                DagResult::Ok { output, .. } => (Status::Ok, output),
                DagResult::DeadlineMissed => (Status::DeadlineExpired, Vec::new()),
                DagResult::Failed(m) => (Status::Internal, m.into_bytes()),
            };
            telemetry::dag_request_done(&name, status.name(), received.elapsed());
            telemetry::inflight(-1.0);
            let shape = [body.len() as u32];
            let ok = status == Status::Ok;
            let frame = Frame {
                kind,
                request_id: rid,
                status,
                dtype: if ok { Dtype::U8 } else { Dtype::Bytes },
                shape: if ok { &shape } else { &[] },
                exit_stage: 0,
                server_us: elapsed_us(received),
            };
            let needs_flush = peer.out.write(&frame.encode(&body));
            let left = peer.out.inflight.fetch_sub(1, Ordering::AcqRel) - 1;
            let watched = left == 0
                && (state.as_ref().is_some_and(|s| s.is_draining()) || peer.out.wake_when_idle.load(Ordering::Acquire));
            if needs_flush || watched {
                (peer.notify)();
            }
        });
        out.push(DagRequest { dag, input: payload.to_vec(), deadline, reply });
    }
}

/// Writes a frame that is not an in-flight request's answer.
fn peer_write(peer: &Peer, frame: &Frame<'_>, body: &[u8]) {
    if peer.out.write(&frame.encode(body)) {
        (peer.notify)();
    }
}

fn elapsed_us(t: Instant) -> u32 {
    t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_only() {
        let mut f = RequestHeader::new(Kind::InvokeDag, 1, 7, Dtype::U8, &[3], 3).as_bytes().to_vec();
        f.extend_from_slice(b"abc");
        assert_eq!(whole_frame(&f), Some(67));
        assert_eq!(whole_frame(&f[..66]), None);
        assert_eq!(whole_frame(&f[..10]), None);
    }

    #[test]
    fn queued_bytes_are_whole_frames_or_not() {
        let mut f = RequestHeader::new(Kind::InvokeDag, 1, 7, Dtype::U8, &[3], 3).as_bytes().to_vec();
        f.extend_from_slice(b"abc");
        let two = [f.clone(), f.clone()].concat();
        assert!(whole_frames(&f) && whole_frames(&two) && whole_frames(&[]));
        assert!(!whole_frames(&two[..70]), "a frame and a header's start");
        assert!(!whole_frames(&f[..66]), "a payload short");
        let mut bad = f.clone();
        bad[0] ^= 0xff;
        assert!(!whole_frames(&bad), "bad magic");
        // Peeked on a real socket, and left queued.
        let (mut a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut a, &two).unwrap();
        assert!(queued_whole_frames(b.as_raw_fd()));
        assert_eq!(unread(b.as_raw_fd()), two.len(), "peeking reads nothing");
        std::io::Write::write_all(&mut a, &f[..10]).unwrap();
        assert!(!queued_whole_frames(b.as_raw_fd()));
        let (_a, empty) = UnixStream::pair().unwrap();
        assert!(!queued_whole_frames(empty.as_raw_fd()), "nothing queued: nothing to vouch for");
    }

    use zerocopy::IntoBytes;
}
