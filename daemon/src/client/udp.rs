//! A blocking UDP client for `[server] udp`: one request per datagram, the
//! answer matched by request id (stale answers of timed-out requests are skipped).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use zerocopy::IntoBytes;

use super::{Client, ClientError, Response};
use crate::api::wire::{Dtype, Kind, RequestHeader, ResponseHeader, Status, HEADER_LEN};

pub struct UdpClient {
    sock: UdpSocket,
    next_id: u64,
    buf: Vec<u8>,
}

impl UdpClient {
    /// A client of the daemon's UDP address; `timeout` bounds each wait for an answer.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let sock = UdpSocket::bind(bind)?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(timeout))?;
        Ok(Self { sock, next_id: 1, buf: vec![0; 65_536] })
    }

    /// The next request id this client will use.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Sets the next request id (the kernel's weighted choice is keyed by it).
    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }

    /// Sends `header` (its request id replaced by the next one) + `payload`; returns the id.
    pub fn send(&mut self, mut header: RequestHeader, payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        header.request_id.set(id);
        let mut d = Vec::with_capacity(HEADER_LEN + payload.len());
        d.extend_from_slice(header.as_bytes());
        d.extend_from_slice(payload);
        self.sock.send(&d)?;
        Ok(id)
    }

    /// Sends raw bytes (malformed datagrams in tests).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.sock.send(bytes)?;
        Ok(())
    }

    /// The answer to request `id` (a timeout is an `Io` error of kind WouldBlock/TimedOut).
    pub fn recv(&mut self, id: u64) -> Result<Response, ClientError> {
        loop {
            let n = self.sock.recv(&mut self.buf)?;
            let Some(head) = self.buf.get(..HEADER_LEN).filter(|_| n >= HEADER_LEN) else { continue };
            let Ok(head) = <&[u8; HEADER_LEN]>::try_from(head) else { continue };
            let h = ResponseHeader::parse(head)?;
            if h.request_id.get() != id {
                continue;
            }
            let len = (h.payload_len.get() as usize).min(n - HEADER_LEN);
            let status = Status::from_u16(h.status.get()).ok_or(ClientError::UnknownStatus(h.status.get()))?;
            return Ok(Response {
                kind: h.kind.get(),
                request_id: id,
                status,
                exit_stage: h.exit_stage.get(),
                server_us: h.server_us.get(),
                dtype: h.dtype,
                shape: h.dims(),
                payload: self.buf[HEADER_LEN..HEADER_LEN + len].to_vec(),
            });
        }
    }

    /// One request, one answer.
    pub fn call(&mut self, header: RequestHeader, payload: &[u8]) -> Result<Response, ClientError> {
        let id = self.send(header, payload)?;
        self.recv(id)
    }

    pub fn ping(&mut self) -> Result<Response, ClientError> {
        self.call(RequestHeader::new(Kind::Ping, 0, 0, Dtype::Bytes, &[], 0), &[])
    }

    /// Runs DAG `dag` on `input`; the raw response (check its status).
    pub fn invoke_dag(&mut self, dag: &str, input: &[u8], deadline_us: u32) -> Result<Response, ClientError> {
        self.call(Client::dag_header(dag, input.len(), deadline_us), input)
    }
}

/// True when `e` is a wait that ended without an answer.
pub fn timed_out(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}
