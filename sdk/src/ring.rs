//! One single-producer single-consumer byte ring inside the shared region.
//!
//! Frames (a [`FrameHeader`] then the payload) are copied in and out, wrapping
//! around the end of the data area. The producer publishes a frame by storing
//! `head` with release ordering; the consumer frees it by storing `tail`. The
//! other side may be hostile (a crashed or malicious guest), so every index and
//! length read from shared memory is checked before use: a bad one is
//! [`RingError::Corrupt`], never a panic or an out-of-bounds copy.

use std::sync::atomic::Ordering;

use zerocopy::{FromBytes, IntoBytes};

use crate::layout::{FrameHeader, RingHeader, FRAME_HEADER_BYTES};

/// Why a frame could not be pushed or popped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("message of {len} bytes exceeds the ring's limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("ring is full ({free} bytes free, {need} needed)")]
    Full { free: usize, need: usize },
    #[error("ring indices or frame header are inconsistent: {0}")]
    Corrupt(&'static str),
}

/// A view of one ring: its header and data area.
pub struct Ring<'a> {
    header: &'a RingHeader,
    data: &'a mut [u8],
}

impl<'a> Ring<'a> {
    pub(crate) fn new(header: &'a RingHeader, data: &'a mut [u8]) -> Ring<'a> {
        Ring { header, data }
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Largest payload a single frame can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity().saturating_sub(FRAME_HEADER_BYTES).min(u32::MAX as usize)
    }

    /// Producer: appends one frame. Never overwrites unconsumed bytes.
    pub fn push(&mut self, seq: u64, status: u32, payload: &[u8]) -> Result<(), RingError> {
        let max = self.max_payload();
        if payload.len() > max {
            return Err(RingError::TooLarge { len: payload.len(), max });
        }
        let cap = self.capacity() as u64;
        let head = self.header.head.load(Ordering::Relaxed);
        let tail = self.header.tail.load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used > cap {
            return Err(RingError::Corrupt("tail is ahead of head or too far behind"));
        }
        let need = (FRAME_HEADER_BYTES + payload.len()) as u64;
        if need > cap - used {
            return Err(RingError::Full { free: (cap - used) as usize, need: need as usize });
        }
        let frame = FrameHeader { seq, len: payload.len() as u32, status };
        self.copy_in(head, frame.as_bytes());
        self.copy_in(head.wrapping_add(FRAME_HEADER_BYTES as u64), payload);
        self.header.head.store(head.wrapping_add(need), Ordering::Release);
        Ok(())
    }

    /// Consumer: takes the oldest frame, its payload into `out` (replacing its
    /// contents). `Ok(None)` when the ring is empty.
    pub fn pop_into(&mut self, out: &mut Vec<u8>) -> Result<Option<FrameHeader>, RingError> {
        let cap = self.capacity() as u64;
        let tail = self.header.tail.load(Ordering::Relaxed);
        let head = self.header.head.load(Ordering::Acquire);
        let avail = head.wrapping_sub(tail);
        if avail == 0 {
            return Ok(None);
        }
        if avail > cap || avail < FRAME_HEADER_BYTES as u64 {
            return Err(RingError::Corrupt("head is behind tail or too far ahead"));
        }
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        self.copy_out(tail, &mut raw);
        let frame = FrameHeader::read_from_bytes(&raw).map_err(|_| RingError::Corrupt("frame header"))?;
        let len = frame.len as u64;
        if FRAME_HEADER_BYTES as u64 + len > avail {
            return Err(RingError::Corrupt("frame length exceeds the published bytes"));
        }
        out.clear();
        out.resize(frame.len as usize, 0);
        self.copy_out(tail.wrapping_add(FRAME_HEADER_BYTES as u64), out);
        self.header.tail.store(tail.wrapping_add(FRAME_HEADER_BYTES as u64 + len), Ordering::Release);
        Ok(Some(frame))
    }

    /// True when no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.header.head.load(Ordering::Acquire) == self.header.tail.load(Ordering::Relaxed)
    }

    fn copy_in(&mut self, pos: u64, bytes: &[u8]) {
        let start = (pos % self.capacity() as u64) as usize;
        let first = bytes.len().min(self.capacity() - start);
        self.data[start..start + first].copy_from_slice(&bytes[..first]);
        self.data[..bytes.len() - first].copy_from_slice(&bytes[first..]);
    }

    fn copy_out(&self, pos: u64, out: &mut [u8]) {
        let start = (pos % self.capacity() as u64) as usize;
        let first = out.len().min(self.capacity() - start);
        out[..first].copy_from_slice(&self.data[start..start + first]);
        let rest = out.len() - first;
        out[first..].copy_from_slice(&self.data[..rest]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{test_region as region, Layout};

    #[test]
    fn frames_round_trip_in_order_with_sequence_and_status() {
        let layout = Layout::for_max_message(200);
        let mut buf = region(&layout);
        let mut shared = layout.split(buf.as_mut_bytes()).unwrap();
        shared.request.push(7, 0, b"hello").unwrap();
        shared.request.push(8, 1, b"").unwrap();
        let mut out = Vec::new();
        let f = shared.request.pop_into(&mut out).unwrap().unwrap();
        assert_eq!((f.seq, f.status, out.as_slice()), (7, 0, &b"hello"[..]));
        let f = shared.request.pop_into(&mut out).unwrap().unwrap();
        assert_eq!((f.seq, f.status, out.len()), (8, 1, 0));
        assert_eq!(shared.request.pop_into(&mut out).unwrap(), None);
        assert!(shared.response.is_empty());
    }

    #[test]
    fn frames_wrap_around_the_end_many_times() {
        let layout = Layout::for_max_message(100);
        let mut buf = region(&layout);
        let mut shared = layout.split(buf.as_mut_bytes()).unwrap();
        let cap = shared.request.capacity();
        let mut out = Vec::new();
        // Odd sizes so that headers and payloads straddle the end at varying offsets.
        for i in 0..1000u64 {
            let len = (i as usize * 37) % (layout.max_message + 1);
            let payload: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            shared.request.push(i, 0, &payload).unwrap();
            let f = shared.request.pop_into(&mut out).unwrap().unwrap();
            assert_eq!(f.seq, i);
            assert_eq!(out, payload);
        }
        let head = shared.request.header.head.load(Ordering::Relaxed);
        assert!(head > 10 * cap as u64, "indices kept growing past the capacity");
    }

    #[test]
    fn oversize_and_full_are_refused_without_writing() {
        let layout = Layout::for_max_message(100);
        let mut buf = region(&layout);
        let mut shared = layout.split(buf.as_mut_bytes()).unwrap();
        let max = shared.request.max_payload();
        assert_eq!(shared.request.push(1, 0, &vec![0; max + 1]), Err(RingError::TooLarge { len: max + 1, max }));
        shared.request.push(1, 0, &vec![1; max]).unwrap();
        assert!(matches!(shared.request.push(2, 0, b"x"), Err(RingError::Full { .. })));
        let mut out = Vec::new();
        assert_eq!(shared.request.pop_into(&mut out).unwrap().unwrap().seq, 1);
        assert_eq!(out.len(), max);
    }

    #[test]
    fn hostile_indices_and_lengths_are_corrupt_not_panics() {
        let layout = Layout::for_max_message(100);
        let mut buf = region(&layout);
        let mut shared = layout.split(buf.as_mut_bytes()).unwrap();
        let mut out = Vec::new();
        shared.response.header.head.store(u64::MAX, Ordering::Relaxed);
        assert!(matches!(shared.response.pop_into(&mut out), Err(RingError::Corrupt(_))));
        // A header that claims more payload than was published.
        shared.response.header.head.store(0, Ordering::Relaxed);
        shared.response.push(1, 0, b"abc").unwrap();
        shared.response.data[8..12].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(shared.response.pop_into(&mut out), Err(RingError::Corrupt(_))));
        // A consumer that ran ahead of the producer.
        shared.request.header.tail.store(50, Ordering::Relaxed);
        assert!(matches!(shared.request.push(1, 0, b"x"), Err(RingError::Corrupt(_))));
    }

    /// Found by fuzzing (fuzz/ `ring`): indices a hostile peer set near
    /// `u64::MAX` overflowed `head + need` / `tail + len` (a panic with
    /// overflow checks on); the indices wrap, as `wrapping_sub` already assumed.
    #[test]
    fn indices_near_u64_max_wrap_instead_of_overflowing() {
        let layout = Layout::for_max_message(100);
        let mut buf = region(&layout);
        let mut shared = layout.split(buf.as_mut_bytes()).unwrap();
        let mut out = Vec::new();
        for ring in [&mut shared.request, &mut shared.response] {
            ring.header.head.store(u64::MAX - 7, Ordering::Relaxed);
            ring.header.tail.store(u64::MAX - 7, Ordering::Relaxed);
            ring.push(9, 0, b"wraps").unwrap();
            assert_eq!(ring.header.head.load(Ordering::Relaxed), (u64::MAX - 7).wrapping_add(16 + 5));
            let f = ring.pop_into(&mut out).unwrap().unwrap();
            assert_eq!((f.seq, out.as_slice()), (9, &b"wraps"[..]));
            assert!(ring.is_empty());
        }
    }
}
