//! A blocking client for the gatid socket, used by `gatictl`, the tests and
//! the benchmark. Requests may be pipelined: `send` several, then `recv`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use zerocopy::IntoBytes;

use crate::api::wire::{Dtype, FrameError, Kind, RequestHeader, ResponseHeader, Status, HEADER_LEN};

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("bad response frame: {0}")]
    Frame(#[from] FrameError),
    #[error("unknown status code {0} in response")]
    UnknownStatus(u16),
    #[error("daemon answered {status:?}: {message}")]
    Status { status: Status, message: String },
    #[error("no model named `{0}`")]
    UnknownModel(String),
    #[error("bad JSON from daemon: {0}")]
    Json(#[from] serde_json::Error),
}

/// A decoded response.
#[derive(Debug, Clone)]
pub struct Response {
    pub kind: u16,
    pub request_id: u64,
    pub status: Status,
    pub exit_stage: u16,
    pub server_us: u32,
    pub dtype: u8,
    pub shape: Vec<usize>,
    pub payload: Vec<u8>,
}

impl Response {
    /// The payload as f32 values (for `Infer` answers).
    pub fn floats(&self) -> Vec<f32> {
        self.payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    /// Errors unless the status is `Ok`.
    pub fn ok(self) -> Result<Self, ClientError> {
        if self.status == Status::Ok {
            Ok(self)
        } else {
            let message = String::from_utf8_lossy(&self.payload).into_owned();
            Err(ClientError::Status { status: self.status, message })
        }
    }
}

/// One connection to gatid.
pub struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        Ok(Self { stream, next_id: 1 })
    }

    /// The underlying stream (for tests that misbehave on purpose).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Sends one request; returns its id.
    pub fn send(&mut self, mut header: RequestHeader, payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        header.request_id.set(id);
        header.payload_len.set(payload.len() as u32);
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(header.as_bytes());
        buf.extend_from_slice(payload);
        self.stream.write_all(&buf)?;
        Ok(id)
    }

    /// Reads the next response.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let mut hb = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut hb)?;
        let h = ResponseHeader::parse(&hb)?;
        let mut payload = vec![0u8; h.payload_len.get() as usize];
        self.stream.read_exact(&mut payload)?;
        let status = Status::from_u16(h.status.get()).ok_or(ClientError::UnknownStatus(h.status.get()))?;
        Ok(Response {
            kind: h.kind.get(),
            request_id: h.request_id.get(),
            status,
            exit_stage: h.exit_stage.get(),
            server_us: h.server_us.get(),
            dtype: h.dtype,
            shape: h.dims(),
            payload,
        })
    }

    /// One request, one response. If the daemon refused the connection (it
    /// answers a status and closes, possibly before our request is sent), that
    /// answer is returned rather than the broken pipe.
    pub fn call(&mut self, header: RequestHeader, payload: &[u8]) -> Result<Response, ClientError> {
        if let Err(e) = self.send(header, payload) {
            return self.recv().map_err(|_| e);
        }
        self.recv()
    }

    /// Empty round trip.
    pub fn ping(&mut self) -> Result<Response, ClientError> {
        self.call(RequestHeader::new(Kind::Ping, 0, 0, Dtype::Bytes, &[], 0), &[])?.ok()
    }

    /// A control request answered with JSON.
    pub fn control_json(&mut self, kind: Kind, target: u32, payload: &[u8]) -> Result<serde_json::Value, ClientError> {
        let r = self.call(RequestHeader::new(kind, 0, target, Dtype::Bytes, &[], 0), payload)?.ok()?;
        Ok(serde_json::from_slice(&r.payload)?)
    }

    /// Prometheus text of the daemon's metrics.
    pub fn stats_text(&mut self) -> Result<String, ClientError> {
        let r = self.call(RequestHeader::new(Kind::Stats, 0, 0, Dtype::Bytes, &[], 0), &[])?.ok()?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
    }

    /// Metadata of the model called `name`.
    pub fn model_info(&mut self, name: &str) -> Result<serde_json::Value, ClientError> {
        match self.control_json(Kind::ModelInfo, 0, name.as_bytes()) {
            Err(ClientError::Status { status: Status::UnknownModel, .. }) => {
                Err(ClientError::UnknownModel(name.into()))
            }
            other => other,
        }
    }

    /// Builds an inference request header.
    pub fn infer_header(model: &str, dtype: Dtype, shape: &[u32], deadline_us: u32) -> RequestHeader {
        let mut h = RequestHeader::new(Kind::Infer, 0, crate::api::wire::model_id(model), dtype, shape, 0);
        h.deadline_us.set(deadline_us);
        h
    }

    /// Runs `model` on a tensor; returns the raw response (check its status).
    pub fn infer(
        &mut self,
        model: &str,
        dtype: Dtype,
        shape: &[u32],
        payload: &[u8],
        deadline_us: u32,
    ) -> Result<Response, ClientError> {
        self.call(Self::infer_header(model, dtype, shape, deadline_us), payload)
    }

    /// Builds an `InvokeDag` request header for `len` input bytes.
    pub fn dag_header(dag: &str, len: usize, deadline_us: u32) -> RequestHeader {
        let id = crate::api::wire::model_id(dag);
        let mut h = RequestHeader::new(Kind::InvokeDag, 0, id, Dtype::U8, &[len as u32], len as u32);
        h.deadline_us.set(deadline_us);
        h
    }

    /// Runs DAG `dag` on `input` (`deadline_us` 0 = the DAG's own deadline);
    /// returns the raw response (check its status; the payload is the sink's output).
    pub fn invoke_dag(&mut self, dag: &str, input: &[u8], deadline_us: u32) -> Result<Response, ClientError> {
        self.call(Self::dag_header(dag, input.len(), deadline_us), input)
    }
}

pub mod calibrate;
pub mod npy;
pub mod udp;
