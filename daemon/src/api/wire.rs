//! The wire format: fixed 64-byte little-endian headers followed by a payload.
//!
//! Owns the byte layout of every frame on the Unix socket (see `docs/protocol.md`).
//! Parsing never panics: every malformed header maps to a [`FrameError`] or a
//! [`Status`] the server sends back.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"GATI"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"GATI");
/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Size of both header kinds in bytes.
pub const HEADER_LEN: usize = 64;
/// Most dimensions a tensor may carry in a header.
pub const MAX_DIMS: usize = 6;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Run a model on the payload tensor.
    Infer = 1,
    /// Empty round trip; answers from the I/O thread.
    Ping = 2,
    /// JSON list of loaded models.
    ListModels = 3,
    /// JSON metadata of one model (target id, or name as payload).
    ModelInfo = 4,
    /// Prometheus text of the daemon's metrics.
    Stats = 5,
    /// JSON liveness report.
    Health = 6,
    /// JSON readiness report: models loaded and not draining.
    Ready = 7,
    /// Run a DAG (target id = the DAG's id) on the payload bytes (u8, `[len]`);
    /// answers with the sink function's output bytes.
    InvokeDag = 8,
    /// Retrain a model's caches now (target id = the model); answers JSON with
    /// the generation to wait for (see `gati_cache_generation`).
    CacheTrain = 9,
    /// Submit a cluster app (JSON payload; `[cluster]` nodes): answers its id.
    AppSubmit = 10,
    /// JSON list of the cluster's apps, their leases and ρ as this node sees them.
    Apps = 11,
}

impl Kind {
    /// Maps a header value to a kind; `None` for unknown values.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Infer,
            2 => Self::Ping,
            3 => Self::ListModels,
            4 => Self::ModelInfo,
            5 => Self::Stats,
            6 => Self::Health,
            7 => Self::Ready,
            8 => Self::InvokeDag,
            9 => Self::CacheTrain,
            10 => Self::AppSubmit,
            11 => Self::Apps,
            _ => return None,
        })
    }
}

/// Element type of a payload tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Dtype {
    /// No tensor (control payloads: UTF-8 / JSON bytes).
    Bytes = 0,
    /// 32-bit IEEE float, little-endian.
    F32 = 1,
    /// Unsigned byte (image pixels, HWC).
    U8 = 2,
}

impl Dtype {
    /// Maps a header value to a dtype; `None` for unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Bytes,
            1 => Self::F32,
            2 => Self::U8,
            _ => return None,
        })
    }

    /// Bytes per element (1 for raw bytes).
    pub fn size(self) -> usize {
        match self {
            Self::Bytes | Self::U8 => 1,
            Self::F32 => 4,
        }
    }
}

/// Outcome of a request, carried in every response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// The request kind is not known.
    UnknownKind = 1,
    /// No model with that target id / name.
    UnknownModel = 2,
    /// The dtype is unknown or not accepted for this model.
    BadDtype = 3,
    /// The shape does not fit the model's input.
    BadShape = 4,
    /// payload length ≠ dtype size × product of the shape.
    PayloadMismatch = 5,
    /// The frame is larger than the configured limit (connection is closed after).
    TooLarge = 6,
    /// Too many requests in flight on this connection.
    Busy = 7,
    /// The deadline cannot be met given queue and measured stage costs.
    DeadlineUnmeetable = 8,
    /// The deadline passed while the request waited in the queue.
    DeadlineExpired = 9,
    /// The daemon is draining and takes no new work.
    ShuttingDown = 10,
    /// The model failed to run.
    Internal = 11,
    /// The peer's uid/gid is not allowed (connection is closed after).
    Unauthorized = 12,
    /// Too many connections (connection is closed after).
    TooManyConnections = 13,
    /// The payload is malformed for this request kind.
    BadPayload = 14,
    /// More rows than the model's `max_batch` (send them as several requests).
    TooManyRows = 15,
}

impl Status {
    /// Maps a header value to a status; `None` for values this build doesn't know.
    pub fn from_u16(v: u16) -> Option<Self> {
        use Status::*;
        const ALL: [Status; 16] = [
            Ok,
            UnknownKind,
            UnknownModel,
            BadDtype,
            BadShape,
            PayloadMismatch,
            TooLarge,
            Busy,
            DeadlineUnmeetable,
            DeadlineExpired,
            ShuttingDown,
            Internal,
            Unauthorized,
            TooManyConnections,
            BadPayload,
            TooManyRows,
        ];
        ALL.get(usize::from(v)).copied()
    }

    /// Short stable name, used in metrics labels and CLI output.
    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            UnknownKind => "unknown_kind",
            UnknownModel => "unknown_model",
            BadDtype => "bad_dtype",
            BadShape => "bad_shape",
            PayloadMismatch => "payload_mismatch",
            TooLarge => "too_large",
            Busy => "busy",
            DeadlineUnmeetable => "deadline_unmeetable",
            DeadlineExpired => "deadline_expired",
            ShuttingDown => "shutting_down",
            Internal => "internal",
            Unauthorized => "unauthorized",
            TooManyConnections => "too_many_connections",
            BadPayload => "bad_payload",
            TooManyRows => "too_many_rows",
        }
    }
}

/// Request flag: skip admission control; queue even if the deadline looks unmeetable
/// (the request is answered `DeadlineExpired` if it passes in the queue).
pub const FLAG_BEST_EFFORT: u16 = 1;
/// Request flag: a calibration row for the model's caches (runs the whole
/// model, never answered from a cache, always added to the training window).
pub const FLAG_CALIBRATE: u16 = 2;

/// Request header (client → daemon), 64 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: U32,
    pub version: U16,
    pub kind: U16,
    pub request_id: U64,
    /// Model id (see `ListModels`); 0 with a name payload for `ModelInfo`.
    pub target_id: U32,
    /// Relative deadline in microseconds from receipt; 0 = none.
    pub deadline_us: U32,
    pub payload_len: U32,
    pub dtype: u8,
    pub ndim: u8,
    pub flags: U16,
    pub shape: [U32; MAX_DIMS],
    pub reserved: [u8; 8],
}

/// Response header (daemon → client), 64 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ResponseHeader {
    pub magic: U32,
    pub version: U16,
    pub kind: U16,
    pub request_id: U64,
    pub status: U16,
    /// Index (1-based) of the stage whose output answered; 0 = no stage ran.
    pub exit_stage: U16,
    /// Time from receipt to response in the daemon, microseconds.
    pub server_us: U32,
    pub payload_len: U32,
    pub dtype: u8,
    pub ndim: u8,
    pub flags: U16,
    pub shape: [U32; MAX_DIMS],
    pub reserved: [u8; 8],
}

const _: () = assert!(size_of::<RequestHeader>() == HEADER_LEN);
const _: () = assert!(size_of::<ResponseHeader>() == HEADER_LEN);

/// Framing errors after which the stream cannot be resynchronised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0}")]
    BadVersion(u16),
}

impl RequestHeader {
    /// Builds a request header with the given fields and a tensor shape.
    pub fn new(kind: Kind, request_id: u64, target_id: u32, dtype: Dtype, shape: &[u32], payload_len: u32) -> Self {
        let mut h = Self::new_zeroed();
        h.magic.set(MAGIC);
        h.version.set(VERSION);
        h.kind.set(kind as u16);
        h.request_id.set(request_id);
        h.target_id.set(target_id);
        h.payload_len.set(payload_len);
        h.dtype = dtype as u8;
        h.ndim = shape.len().min(MAX_DIMS) as u8;
        for (slot, &d) in h.shape.iter_mut().zip(shape) {
            slot.set(d);
        }
        h
    }

    /// Reads a header from the first 64 bytes and checks magic and version.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let h = Self::read_from_bytes(bytes).expect("64-byte array always fits the header");
        if h.magic.get() != MAGIC {
            return Err(FrameError::BadMagic(h.magic.get()));
        }
        if h.version.get() != VERSION {
            return Err(FrameError::BadVersion(h.version.get()));
        }
        Ok(h)
    }

    /// The shape as a vector, or `None` when `ndim` exceeds [`MAX_DIMS`].
    pub fn dims(&self) -> Option<Vec<usize>> {
        let n = usize::from(self.ndim);
        (n <= MAX_DIMS).then(|| self.shape[..n].iter().map(|d| d.get() as usize).collect())
    }
}

impl ResponseHeader {
    /// Builds a response header; `shape` is empty for byte payloads.
    pub fn new(kind: u16, request_id: u64, status: Status, dtype: Dtype, shape: &[u32], payload_len: u32) -> Self {
        let mut h = Self::new_zeroed();
        h.magic.set(MAGIC);
        h.version.set(VERSION);
        h.kind.set(kind);
        h.request_id.set(request_id);
        h.status.set(status as u16);
        h.payload_len.set(payload_len);
        h.dtype = dtype as u8;
        h.ndim = shape.len().min(MAX_DIMS) as u8;
        for (slot, &d) in h.shape.iter_mut().zip(shape) {
            slot.set(d);
        }
        h
    }

    /// Reads a response header and checks magic and version.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let h = Self::read_from_bytes(bytes).expect("64-byte array always fits the header");
        if h.magic.get() != MAGIC {
            return Err(FrameError::BadMagic(h.magic.get()));
        }
        if h.version.get() != VERSION {
            return Err(FrameError::BadVersion(h.version.get()));
        }
        Ok(h)
    }

    /// The shape as a vector (clamped to [`MAX_DIMS`]).
    pub fn dims(&self) -> Vec<usize> {
        let n = usize::from(self.ndim).min(MAX_DIMS);
        self.shape[..n].iter().map(|d| d.get() as usize).collect()
    }
}

/// The header's target id of a model or DAG name.
pub use crate::id::model_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_rejects_bad_magic() {
        let h = RequestHeader::new(Kind::Infer, 7, 42, Dtype::U8, &[32, 32, 3], 3072);
        let mut bytes = [0u8; HEADER_LEN];
        bytes.copy_from_slice(h.as_bytes());
        let back = RequestHeader::parse(&bytes).unwrap();
        assert_eq!(back.request_id.get(), 7);
        assert_eq!(back.dims().unwrap(), vec![32, 32, 3]);
        bytes[0] = b'X';
        assert!(matches!(RequestHeader::parse(&bytes), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn status_codes_roundtrip() {
        for v in 0..16u16 {
            assert_eq!(Status::from_u16(v).unwrap() as u16, v);
        }
        assert!(Status::from_u16(16).is_none());
    }
}
