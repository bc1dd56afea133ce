//! The peer protocol between gatid nodes of a cluster (`docs/peer-protocol.md`):
//! length-delimited frames over TCP, each a versioned, authenticated envelope
//! around one serde message.
//!
//! - [`message`]: what nodes, agents and the arbiter say to each other;
//! - [`frame`]: the envelope (magic, version, sender, counter, HMAC-SHA256
//!   tag over all of it with the cluster key), sealing and opening, and the
//!   per-sender counter that refuses a replayed frame;
//! - [`io`]: reading and writing frames on a tokio stream, bounded;
//! - [`service`]: the node's peer service (listener, links, the arbiter's rounds).

pub mod frame;
pub mod io;
pub mod message;
pub mod service;

/// Why a frame was refused (each is counted by the receiver).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("authentication failed (wrong or no cluster key)")]
    Unauthenticated,
    #[error("replayed frame from node {sender}: counter {counter} <= {last}")]
    Replayed { sender: u32, counter: u64, last: u64 },
    #[error("peer connection: {0}")]
    Io(String),
}

impl PeerError {
    /// The label a refusal is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::TooLong(_) | PeerError::Malformed(_) => "malformed",
            PeerError::Version(_) => "version",
            PeerError::Unauthenticated => "unauthenticated",
            PeerError::Replayed { .. } => "replayed",
            PeerError::Io(_) => "io",
        }
    }
}
