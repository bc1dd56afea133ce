//! UDP ingress: one request per datagram, the same 64-byte header as the Unix
//! socket. Every socket of the group is bound to `[server] udp` with
//! `SO_REUSEPORT`; with kernel steering each SGS owns one ([`SgsSocket`], read
//! on the SGS's ring) and the `SK_REUSEPORT` program picks it per datagram.
//! The I/O thread's socket ([`serve_default`]) takes everything else: non-DAG
//! kinds, unknown targets, malformed datagrams, and, with userspace steering,
//! every DAG request (routed by `Lb::route`, one hop to the SGS's inbox).
//!
//! A datagram is answered on the socket that read it, to its sender. Shorter
//! than a header or with a bad magic/version: dropped and counted; a payload
//! length that is not the datagram's rest, a payload over `max_frame_bytes`, or
//! an answer that does not fit a datagram: an error reply (never a truncated request).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use super::layout::Counter;
use crate::api::wire::{Dtype, Kind, RequestHeader, ResponseHeader, Status, HEADER_LEN};
use crate::sched::{DagReply, DagRequest, DagResult, DagService, Deployment, Ingress};
use crate::telemetry;

/// Largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Datagrams one SGS reads per readiness before it schedules again.
const BATCH: usize = 32;

/// Counts of what the daemon's own UDP code saw (the kernel's are in its map).
#[derive(Debug, Default)]
pub struct UdpCounters([AtomicU64; 5]);

impl UdpCounters {
    pub fn bump(&self, c: Counter) {
        self.0[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// In [`Counter::ALL`] order.
    pub fn get(&self) -> [u64; 5] {
        std::array::from_fn(|k| self.0[k].load(Ordering::Relaxed))
    }
}

/// A UDP socket with `SO_REUSEPORT` set before `bind`, non-blocking.
pub fn reuseport_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a sockaddr of `len` bytes for the socket's family.
    if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UdpSocket::from(owned))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin) };
            (s, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut s as *mut libc::sockaddr_storage).cast(), sin6) };
            (s, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Writes one answer datagram; an answer too big for one becomes `Internal`.
#[expect(clippy::too_many_arguments, reason = "one response header's fields")]
pub fn respond(
    sock: &UdpSocket,
    peer: SocketAddr,
    kind: u16,
    rid: u64,
    status: Status,
    dtype: Dtype,
    body: &[u8],
    received: Instant,
) {
    let (status, dtype, body) = if HEADER_LEN + body.len() > MAX_DATAGRAM {
        (Status::Internal, Dtype::Bytes, &b"the answer does not fit in a datagram"[..])
    } else {
        (status, dtype, body)
    };
    let shape = [body.len() as u32];
    let shape: &[u32] = if dtype == Dtype::U8 { &shape } else { &[] };
    let mut h = ResponseHeader::new(kind, rid, status, dtype, shape, body.len() as u32);
    h.server_us.set(received.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(body);
    // A full socket buffer loses the answer, as the network could: UDP clients retry.
    let _ = sock.send_to(&out, peer);
}

/// A datagram's header, checked for one-request-per-datagram framing.
enum Parsed {
    Request(RequestHeader),
    /// Answered with this status and message.
    Refuse(RequestHeader, Status, &'static str),
    Malformed,
}

fn parse(buf: &[u8], len: usize, max_frame: usize) -> Parsed {
    let Some(head) = buf.get(..HEADER_LEN).filter(|_| len >= HEADER_LEN) else { return Parsed::Malformed };
    let Ok(bytes) = <&[u8; HEADER_LEN]>::try_from(head) else { return Parsed::Malformed };
    let Ok(h) = RequestHeader::parse(bytes) else { return Parsed::Malformed };
    let want = h.payload_len.get() as usize;
    if want > max_frame || len > buf.len() {
        return Parsed::Refuse(h, Status::TooLarge, "over max_frame_bytes or the datagram limit");
    }
    if want != len - HEADER_LEN {
        return Parsed::Refuse(h, Status::PayloadMismatch, "payload_len must be the rest of the datagram");
    }
    Parsed::Request(h)
}

/// A DAG request from a datagram, answered on `sock` to `peer`; `Err` = answered already.
fn dag_request(
    dep: &Deployment,
    h: &RequestHeader,
    payload: &[u8],
    sock: &Arc<UdpSocket>,
    peer: SocketAddr,
    received: Instant,
) -> Result<DagRequest, ()> {
    let (kind, rid) = (Kind::InvokeDag as u16, h.request_id.get());
    let refuse =
        |status: Status, why: &str| respond(sock, peer, kind, rid, status, Dtype::Bytes, why.as_bytes(), received);
    let Some(dag) = dep.dag_by_id(h.target_id.get()).cloned() else {
        refuse(Status::UnknownModel, "");
        return Err(());
    };
    if Dtype::from_u8(h.dtype) != Some(Dtype::U8) {
        refuse(Status::BadDtype, "");
        return Err(());
    }
    match h.dims() {
        Some(d) if d.len() == 1 && d[0] == payload.len() => {}
        Some(d) if d.len() == 1 => {
            refuse(Status::PayloadMismatch, "");
            return Err(());
        }
        _ => {
            refuse(Status::BadShape, "");
            return Err(());
        }
    }
    let deadline = match h.deadline_us.get() {
        0 => None,
        us => Some(received + Duration::from_micros(u64::from(us))),
    };
    let (sock, name) = (Arc::clone(sock), dag.name.clone());
    telemetry::inflight(1.0);
    let reply = DagReply::new(move |r| {
        let (status, dtype, body) = match r {
            DagResult::Ok { output, .. } => (Status::Ok, Dtype::U8, output),
            DagResult::DeadlineMissed => (Status::DeadlineExpired, Dtype::Bytes, Vec::new()),
            DagResult::Failed(m) => (Status::Internal, Dtype::Bytes, m.into_bytes()),
        };
        telemetry::dag_request_done(&name, status.name(), received.elapsed());
        telemetry::inflight(-1.0);
        respond(&sock, peer, kind, rid, status, dtype, &body, received);
    });
    Ok(DagRequest { dag, input: payload.to_vec(), deadline, reply })
}

/// Receives one datagram without blocking: `(length as sent, sender)`; the
/// length may exceed `buf` (MSG_TRUNC), which [`parse`] refuses.
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut flen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and from are valid for the lengths given.
    let n = unsafe {
        libc::recvfrom(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut flen,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = peer_addr(&from).ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    Ok((n as usize, peer))
}

fn peer_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
        }
        _ => None,
    }
}

/// An SGS's own socket: the kernel steers its DAG's datagrams here.
pub struct SgsSocket {
    pub sock: Arc<UdpSocket>,
    pub max_frame: usize,
    pub counters: Arc<UdpCounters>,
    /// The node drains: DAG requests are answered `ShuttingDown`.
    pub draining: Arc<AtomicBool>,
    buf: Vec<u8>,
}

impl SgsSocket {
    pub fn new(sock: Arc<UdpSocket>, max_frame: usize, counters: Arc<UdpCounters>, draining: Arc<AtomicBool>) -> Self {
        Self { sock, max_frame, counters, draining, buf: vec![0; MAX_DATAGRAM + 1] }
    }
}

impl Ingress for SgsSocket {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn read(&mut self, dep: &Deployment, held: usize, out: &mut Vec<DagRequest>) {
        for _ in 0..BATCH {
            let Ok((len, peer)) = recv(&self.sock, &mut self.buf) else { return };
            let received = Instant::now();
            let h = match parse(&self.buf, len, self.max_frame) {
                Parsed::Request(h) => h,
                Parsed::Refuse(h, status, why) => {
                    let (k, rid) = (h.kind.get(), h.request_id.get());
                    respond(&self.sock, peer, k, rid, status, Dtype::Bytes, why.as_bytes(), received);
                    continue;
                }
                Parsed::Malformed => {
                    self.counters.bump(Counter::Malformed);
                    continue;
                }
            };
            let (k, rid) = (h.kind.get(), h.request_id.get());
            if k != Kind::InvokeDag as u16 {
                let why = b"an SGS socket takes InvokeDag only";
                respond(&self.sock, peer, k, rid, Status::UnknownKind, Dtype::Bytes, why, received);
                continue;
            }
            if self.draining.load(Ordering::Acquire) {
                respond(&self.sock, peer, k, rid, Status::ShuttingDown, Dtype::Bytes, &[], received);
                continue;
            }
            if held + out.len() >= crate::sched::sgs::MAX_QUEUED {
                telemetry::request_refused("sgs_queue");
                let why = b"sgs_queue: the DAG's scheduler holds its most queued requests";
                respond(&self.sock, peer, k, rid, Status::Busy, Dtype::Bytes, why, received);
                continue;
            }
            let payload = &self.buf[HEADER_LEN..len];
            if let Ok(req) = dag_request(dep, &h, payload, &self.sock, peer, received) {
                out.push(req);
            }
        }
    }
}

/// The I/O thread's socket: until `stop`, answers Ping, routes InvokeDag
/// through the userspace table (`Scheduler::submit`) or, once `draining`,
/// answers it `ShuttingDown`, refuses other kinds.
pub fn serve_default(
    sock: Arc<UdpSocket>,
    dags: Arc<DagService>,
    max_frame: usize,
    counters: Arc<UdpCounters>,
    stop: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::Acquire) {
        // SAFETY: one valid pollfd; a bounded wait so `stop` is seen.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        while let Ok((len, peer)) = recv(&sock, &mut buf) {
            let received = Instant::now();
            let h = match parse(&buf, len, max_frame) {
                Parsed::Request(h) => h,
                Parsed::Refuse(h, status, why) => {
                    let (k, rid) = (h.kind.get(), h.request_id.get());
                    respond(&sock, peer, k, rid, status, Dtype::Bytes, why.as_bytes(), received);
                    continue;
                }
                Parsed::Malformed => {
                    counters.bump(Counter::Malformed);
                    continue;
                }
            };
            let (k, rid) = (h.kind.get(), h.request_id.get());
            match Kind::from_u16(k) {
                Some(Kind::Ping) => {
                    counters.bump(Counter::Other);
                    respond(&sock, peer, k, rid, Status::Ok, Dtype::Bytes, &[], received);
                }
                Some(Kind::InvokeDag) if draining.load(Ordering::Acquire) => {
                    counters.bump(Counter::Fallback);
                    respond(&sock, peer, k, rid, Status::ShuttingDown, Dtype::Bytes, &[], received);
                }
                Some(Kind::InvokeDag) => {
                    let Some(sched) = dags.get() else {
                        counters.bump(Counter::Fallback);
                        respond(&sock, peer, k, rid, Status::UnknownModel, Dtype::Bytes, &[], received);
                        continue;
                    };
                    let Ok(req) = dag_request(&sched.deployment, &h, &buf[HEADER_LEN..len], &sock, peer, received)
                    else {
                        counters.bump(Counter::Fallback);
                        continue;
                    };
                    counters.bump(Counter::Steered);
                    if let Err(req) = sched.submit(req) {
                        req.reply.send(DagResult::Failed("sgs_queue: the DAG's scheduler is full".into()));
                    }
                }
                _ => {
                    counters.bump(Counter::Other);
                    let why = b"only Ping and InvokeDag are served over UDP; use the Unix socket";
                    respond(&sock, peer, k, rid, Status::UnknownKind, Dtype::Bytes, why, received);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_per_datagram() {
        let mut d = RequestHeader::new(Kind::InvokeDag, 9, 1, Dtype::U8, &[3], 3).as_bytes().to_vec();
        d.extend_from_slice(b"abc");
        assert!(matches!(parse(&d, d.len(), 1024), Parsed::Request(_)));
        assert!(matches!(parse(&d, 10, 1024), Parsed::Malformed), "shorter than a header");
        assert!(matches!(parse(&d, d.len() - 1, 1024), Parsed::Refuse(_, Status::PayloadMismatch, _)));
        assert!(matches!(parse(&d, d.len(), 2), Parsed::Refuse(_, Status::TooLarge, _)));
        assert!(matches!(parse(&d[..d.len()], d.len() + 5, 1024), Parsed::Refuse(_, Status::TooLarge, _)), "truncated");
        d[0] = b'X';
        assert!(matches!(parse(&d, d.len(), 1024), Parsed::Malformed), "bad magic");
    }

    #[test]
    fn reuseport_sockets_share_a_port() {
        let a = reuseport_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_socket(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }
}
