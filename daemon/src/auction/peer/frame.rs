//! The frame envelope: every peer message is sealed as
//!
//! ```text
//! magic "GATP" | version u16 | sender u32 | counter u64 | tag [32] | payload
//! ```
//!
//! (big-endian) where `tag` = HMAC-SHA256(cluster key, everything but the tag)
//! and `payload` is the JSON of a [`Message`]. A receiver checks, in order:
//! size, magic, version, the tag (constant-time), then that `counter` is
//! above the last one accepted from `sender` ([`ReplayGuard`]), and only then
//! parses the payload. A sender's counter starts at its start time in
//! microseconds, so a restarted node is not mistaken for a replay.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::message::Message;
use super::PeerError;

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"GATP";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 4 + 2 + 4 + 8 + 32;
/// Largest frame accepted (header + payload).
pub const MAX_FRAME: usize = 1 << 20;

type HmacSha256 = Hmac<Sha256>;

/// The cluster key every node shares (at least 16 bytes).
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    pub fn new(bytes: &[u8]) -> Result<ClusterKey, PeerError> {
        if bytes.len() < 16 {
            return Err(PeerError::Malformed("cluster key shorter than 16 bytes".into()));
        }
        Ok(ClusterKey(bytes.to_vec()))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// A node's sending side: its id and next counter.
#[derive(Debug)]
pub struct Sealer {
    key: ClusterKey,
    sender: u32,
    counter: u64,
}

impl Sealer {
    /// A sealer whose counter starts at `start` (use the start time in µs).
    pub fn new(key: ClusterKey, sender: u32, start: u64) -> Sealer {
        Sealer { key, sender, counter: start }
    }

    /// The frame of `msg` (without the length prefix).
    pub fn seal(&mut self, msg: &Message) -> Vec<u8> {
        self.counter += 1;
        let payload = serde_json::to_vec(msg).unwrap_or_default();
        seal_raw(&self.key, VERSION, self.sender, self.counter, &payload)
    }
}

/// A frame with any header fields (tests build hostile ones with this).
pub fn seal_raw(key: &ClusterKey, version: u16, sender: u32, counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len());
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(&sender.to_be_bytes());
    f.extend_from_slice(&counter.to_be_bytes());
    let mut mac = key.mac();
    mac.update(&f);
    mac.update(payload);
    f.extend_from_slice(&mac.finalize().into_bytes());
    f.extend_from_slice(payload);
    f
}

/// An opened frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Opened {
    pub sender: u32,
    pub counter: u64,
    pub message: Message,
}

/// The receiving side: the last counter accepted per sender.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    last: HashMap<u32, u64>,
}

impl ReplayGuard {
    /// Accepts `counter` from `sender` if above the last one accepted.
    pub fn check(&mut self, sender: u32, counter: u64) -> Result<(), PeerError> {
        let last = self.last.get(&sender).copied().unwrap_or(0);
        if counter <= last {
            return Err(PeerError::Replayed { sender, counter, last });
        }
        self.last.insert(sender, counter);
        Ok(())
    }
}

/// Opens `frame`: checks size, magic, version, tag, counter, then parses.
pub fn open(key: &ClusterKey, guard: &mut ReplayGuard, frame: &[u8]) -> Result<Opened, PeerError> {
    if frame.len() > MAX_FRAME {
        return Err(PeerError::TooLong(frame.len()));
    }
    if frame.len() < HEADER_LEN {
        return Err(PeerError::Malformed(format!("{} bytes, header is {HEADER_LEN}", frame.len())));
    }
    if &frame[..4] != MAGIC {
        return Err(PeerError::Malformed("bad magic".into()));
    }
    let be = |r: std::ops::Range<usize>| frame[r].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let version = be(4..6) as u16;
    if version != VERSION {
        return Err(PeerError::Version(version));
    }
    let sender = be(6..10) as u32;
    let counter = be(10..18);
    let (tag, payload) = (&frame[18..HEADER_LEN], &frame[HEADER_LEN..]);
    let mut mac = key.mac();
    mac.update(&frame[..18]);
    mac.update(payload);
    mac.verify_slice(tag).map_err(|_| PeerError::Unauthenticated)?;
    guard.check(sender, counter)?;
    let message = serde_json::from_slice(payload).map_err(|e| PeerError::Malformed(format!("payload: {e}")))?;
    Ok(Opened { sender, counter, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let mut s = Sealer::new(key(1), 3, 1000);
        let mut g = ReplayGuard::default();
        let m = Message::Heartbeat { node: 3 };
        let f = s.seal(&m);
        let o = open(&key(1), &mut g, &f).unwrap();
        assert_eq!((o.sender, o.counter, o.message), (3, 1001, m.clone()));
        // Replayed.
        assert!(matches!(open(&key(1), &mut g, &f), Err(PeerError::Replayed { .. })));
        // Wrong key: refused before the counter is touched.
        let f2 = s.seal(&m);
        assert_eq!(open(&key(2), &mut g, &f2), Err(PeerError::Unauthenticated));
        assert!(open(&key(1), &mut g, &f2).is_ok());
        // Tampered payload, header, truncation, version, magic.
        let mut t = s.seal(&m);
        let last = t.len() - 2;
        t[last] ^= 1;
        assert_eq!(open(&key(1), &mut g, &t), Err(PeerError::Unauthenticated));
        let mut t = s.seal(&m);
        t[9] ^= 1; // sender
        assert_eq!(open(&key(1), &mut g, &t), Err(PeerError::Unauthenticated));
        assert!(matches!(open(&key(1), &mut g, &f[..10]), Err(PeerError::Malformed(_))));
        let v2 = seal_raw(&key(1), 2, 3, u64::MAX, b"{}");
        assert_eq!(open(&key(1), &mut g, &v2), Err(PeerError::Version(2)));
        let mut bad = s.seal(&m);
        bad[0] = b'X';
        assert!(matches!(open(&key(1), &mut g, &bad), Err(PeerError::Malformed(_))));
        // Authenticated garbage is malformed (and still consumes its counter).
        let junk = seal_raw(&key(1), VERSION, 9, 5, b"not json");
        assert!(matches!(open(&key(1), &mut g, &junk), Err(PeerError::Malformed(_))));
        assert!(ClusterKey::new(b"short").is_err());
    }
}
