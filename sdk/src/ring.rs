//! One single-producer single-consumer byte ring inside the shared region.
//!
//! Frames (a [`FrameHeader`] then the payload) are copied in and out, wrapping
//! around the end of the data area. The producer publishes a frame by storing
//! `head` with release ordering; the consumer frees it by storing `tail`. The
//! other side may be hostile (a crashed or malicious guest) and can write any
//! byte of the region at any time, its own indices and ours included, so:
//!
//! - the data area is never seen as `&[u8]`/`&mut [u8]`: it is a raw pointer,
//!   read with volatile loads into a buffer this side owns and written with
//!   volatile stores (`read_shared`, `write_shared`); indices are atomics;
//! - every index and the frame header are read once, into locals, and checked
//!   there; what is used afterwards is the checked copy, so a peer that
//!   changes a length after the check changes nothing (no double fetch);
//! - positions are taken modulo the capacity and lengths are bounded by it,
//!   so no value the peer writes can make a copy leave the data area; a bad
//!   one is [`RingError::Corrupt`], never a panic or an out-of-bounds copy.
//!
//! A payload the peer overwrites while it is being copied arrives garbled;
//! that is the peer's own loss, not a memory-safety question.

use std::marker::PhantomData;
use std::ptr::NonNull;
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
    /// `capacity` bytes that the peer may write at any time.
    data: NonNull<u8>,
    capacity: usize,
    _region: PhantomData<&'a mut [u8]>,
}

// SAFETY: a Ring is a unique view of its data area (it stands for the
// `&'a mut [u8]` in its PhantomData) plus a shared reference to atomics, as it
// was before it held a raw pointer: moving it to another thread moves that
// exclusive access along (Send), and its `&self` methods touch only the
// atomics and its own fields (Sync).
unsafe impl Send for Ring<'_> {}
// SAFETY: see above.
unsafe impl Sync for Ring<'_> {}

/// The oldest frame, its header copied out and checked against the bytes
/// the producer had published when it was read.
struct Front {
    tail: u64,
    frame: FrameHeader,
}

impl<'a> Ring<'a> {
    /// # Safety
    /// `data` must be valid for reads and writes of `capacity` bytes for `'a`,
    /// disjoint from `header`, and reached by this process only through this
    /// ring while it lives (another process may write it).
    pub(crate) unsafe fn new(header: &'a RingHeader, data: NonNull<u8>, capacity: usize) -> Ring<'a> {
        Ring { header, data, capacity, _region: PhantomData }
    }

    /// Bytes in the data area.
    pub fn capacity(&self) -> usize {
        self.capacity
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
        // Our own index, but in shared memory: checked like the peer's.
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
        match self.front()? {
            Some(front) => Ok(Some(self.take(front, out))),
            None => Ok(None),
        }
    }

    /// True when no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.header.head.load(Ordering::Acquire) == self.header.tail.load(Ordering::Relaxed)
    }

    /// Reads the indices and the oldest frame's header once and checks them.
    fn front(&self) -> Result<Option<Front>, RingError> {
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
        if FRAME_HEADER_BYTES as u64 + u64::from(frame.len) > avail {
            return Err(RingError::Corrupt("frame length exceeds the published bytes"));
        }
        Ok(Some(Front { tail, frame }))
    }

    /// Copies a checked frame's payload out (by the checked length, whatever
    /// the shared bytes say now) and frees it.
    fn take(&mut self, front: Front, out: &mut Vec<u8>) -> FrameHeader {
        let len = front.frame.len as usize; // ≤ avail − 16 < capacity
        out.clear();
        out.resize(len, 0);
        self.copy_out(front.tail.wrapping_add(FRAME_HEADER_BYTES as u64), out);
        let next = front.tail.wrapping_add((FRAME_HEADER_BYTES + len) as u64);
        self.header.tail.store(next, Ordering::Release);
        front.frame
    }

    /// Where `len` bytes (at most `capacity`) from ring position `pos` lie:
    /// `first` bytes from `start` up to the end of the data area at most, the
    /// rest from its beginning.
    fn spans(&self, pos: u64, len: usize) -> (usize, usize) {
        debug_assert!(len <= self.capacity);
        let start = (pos % self.capacity as u64) as usize;
        (start, len.min(self.capacity - start))
    }

    fn copy_in(&mut self, pos: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let (start, first) = self.spans(pos, bytes.len());
        let base = self.data.as_ptr();
        // SAFETY: start < capacity, start + first ≤ capacity and the rest
        // (bytes.len() − first ≤ capacity) starts at the data area's start:
        // both runs lie in the `capacity` bytes `new` was given.
        unsafe {
            write_shared(base.add(start), &bytes[..first]);
            write_shared(base, &bytes[first..]);
        }
    }

    fn copy_out(&self, pos: u64, out: &mut [u8]) {
        if out.is_empty() {
            return;
        }
        let (start, first) = self.spans(pos, out.len());
        let base = self.data.as_ptr();
        // SAFETY: as in `copy_in`; `out` is ours, not shared memory.
        unsafe {
            read_shared(base.add(start), &mut out[..first]);
            read_shared(base, &mut out[first..]);
        }
    }
}

/// Copies `out.len()` bytes from `src`, memory another process may be writing,
/// into `out`: each byte read exactly once with a volatile load (8-byte words
/// where `src` is aligned), so the compiler neither assumes the bytes stable
/// nor reads them twice. Volatile is the access Rust documents for memory
/// outside any Rust allocation, such as a shared mapping.
///
/// # Safety
/// `src` must be valid for reads of `out.len()` bytes.
unsafe fn read_shared(src: *const u8, out: &mut [u8]) {
    let n = out.len();
    let mut i = 0;
    // SAFETY: every access is at src + i / out + i with i < n (a byte) or
    // i + 8 ≤ n (a word; src + i 8-aligned, out + i written unaligned): within
    // the caller's `n` valid bytes and within `out`.
    unsafe {
        while i < n && !(src.add(i) as usize).is_multiple_of(8) {
            out[i] = src.add(i).read_volatile();
            i += 1;
        }
        let dst = out.as_mut_ptr();
        while i + 8 <= n {
            let word = src.add(i).cast::<u64>().read_volatile();
            dst.add(i).cast::<u64>().write_unaligned(word);
            i += 8;
        }
        while i < n {
            out[i] = src.add(i).read_volatile();
            i += 1;
        }
    }
}

/// Copies `bytes` to `dst`, memory another process may read or write, with
/// volatile stores (8-byte words where `dst` is aligned).
///
/// # Safety
/// `dst` must be valid for writes of `bytes.len()` bytes.
unsafe fn write_shared(dst: *mut u8, bytes: &[u8]) {
    let n = bytes.len();
    let mut i = 0;
    // SAFETY: as in `read_shared`.
    unsafe {
        while i < n && !(dst.add(i) as usize).is_multiple_of(8) {
            dst.add(i).write_volatile(bytes[i]);
            i += 1;
        }
        let src = bytes.as_ptr();
        while i + 8 <= n {
            let word = src.add(i).cast::<u64>().read_unaligned();
            dst.add(i).cast::<u64>().write_volatile(word);
            i += 8;
        }
        while i < n {
            dst.add(i).write_volatile(bytes[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{test_region as region, Block, Layout, DATA_OFFSET, RESPONSE_HEADER_OFFSET};

    /// A region and a view of it through `split_raw`, so that the test can
    /// also write the bytes as the peer process would (through `base`).
    struct Peer {
        _buf: Vec<Block>,
        base: *mut u8,
        layout: Layout,
    }

    impl Peer {
        fn new(max_message: usize) -> Peer {
            let layout = Layout::for_max_message(max_message);
            let mut buf = region(&layout);
            let base = buf.as_mut_bytes().as_mut_ptr();
            Peer { _buf: buf, base, layout }
        }

        fn shared(&self) -> crate::layout::Shared<'_> {
            // SAFETY: the Vec lives as long as `self`; the tests write through
            // `base` only between ring calls, never while one runs.
            unsafe { self.layout.split_raw(self.base, self.layout.total_len()).unwrap() }
        }

        /// The peer writes `bytes` at `offset` of the region.
        fn poke(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= self.layout.total_len());
            // SAFETY: in bounds of the live buffer (checked above).
            unsafe { write_shared(self.base.add(offset), bytes) }
        }

        /// The response ring's header offset `field` (0 head, 64 tail).
        fn poke_response_index(&self, field: usize, value: u64) {
            self.poke(RESPONSE_HEADER_OFFSET + field, &value.to_ne_bytes());
        }

        fn response_data(&self) -> usize {
            self.layout.response_data_offset()
        }
    }

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
        let peer = Peer::new(100);
        let mut shared = peer.shared();
        let mut out = Vec::new();
        peer.poke_response_index(0, u64::MAX);
        assert!(matches!(shared.response.pop_into(&mut out), Err(RingError::Corrupt(_))));
        // A header that claims more payload than was published.
        peer.poke_response_index(0, 0);
        shared.response.push(1, 0, b"abc").unwrap();
        peer.poke(peer.response_data() + 8, &1000u32.to_ne_bytes());
        assert!(matches!(shared.response.pop_into(&mut out), Err(RingError::Corrupt(_))));
        // A consumer that ran ahead of the producer.
        shared.request.header.tail.store(50, Ordering::Relaxed);
        assert!(matches!(shared.request.push(1, 0, b"x"), Err(RingError::Corrupt(_))));
        // Indices about to wrap u64: consistent ones still work, nothing overflows.
        for (head, tail) in [(u64::MAX - 3, u64::MAX - 3), (u64::MAX, u64::MAX - 20), (5, u64::MAX - 2)] {
            peer.poke_response_index(0, head);
            peer.poke_response_index(64, tail);
            let _ = shared.response.push(9, 0, b"wrap");
            let _ = shared.response.pop_into(&mut out);
        }
        peer.poke_response_index(0, u64::MAX - 3);
        peer.poke_response_index(64, u64::MAX - 3);
        shared.response.push(9, 0, b"wrap").unwrap();
        assert_eq!(shared.response.pop_into(&mut out).unwrap().map(|f| f.seq), Some(9));
        assert_eq!(out, b"wrap");
    }

    #[test]
    fn a_length_changed_after_the_check_is_not_read_again() {
        let peer = Peer::new(100);
        let mut shared = peer.shared();
        shared.response.push(3, 0, b"abc").unwrap();
        shared.response.push(4, 0, b"defg").unwrap();
        // The consumer checks the first frame (3 bytes, published) ...
        let front = shared.response.front().unwrap().unwrap();
        assert_eq!(front.frame.len, 3);
        // ... then the peer rewrites its length and publishes garbage.
        peer.poke(peer.response_data() + 8, &u32::MAX.to_ne_bytes());
        peer.poke_response_index(0, u64::MAX / 2);
        let mut out = Vec::new();
        let frame = shared.response.take(front, &mut out);
        // The checked copy was used: 3 bytes, and the tail moved past them only.
        assert_eq!((frame.seq, frame.len, out.as_slice()), (3, 3, &b"abc"[..]));
        assert_eq!(shared.response.header.tail.load(Ordering::Relaxed), 16 + 3);
        // The garbage head is caught at the next read.
        assert!(matches!(shared.response.pop_into(&mut out), Err(RingError::Corrupt(_))));
    }

    #[test]
    fn request_ring_reads_only_its_own_area() {
        // Bytes the peer scribbles over the other ring never show up here.
        let peer = Peer::new(64);
        let mut shared = peer.shared();
        peer.poke(peer.response_data(), &[0xAA; 64]);
        shared.request.push(1, 0, b"mine").unwrap();
        let mut out = Vec::new();
        shared.request.pop_into(&mut out).unwrap().unwrap();
        assert_eq!(out, b"mine");
        assert_eq!(DATA_OFFSET % 64, 0);
    }

    // The views stay Send + Sync, as they were with slices.
    const _: fn() = || {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::layout::Shared<'static>>();
    };

    #[test]
    fn volatile_copies_handle_every_alignment_and_length() {
        let src: Vec<u8> = (0..100u8).collect();
        for offset in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 40, 91 - offset] {
                let mut dst = [0u8; 100];
                // SAFETY: offset + len ≤ 100 for both buffers.
                unsafe { read_shared(src.as_ptr().add(offset), &mut dst[..len]) };
                assert_eq!(&dst[..len], &src[offset..offset + len]);
                let mut area = [0u8; 100];
                // SAFETY: as above.
                unsafe { write_shared(area.as_mut_ptr().add(offset), &src[..len]) };
                assert_eq!(&area[offset..offset + len], &src[..len]);
                assert!(area[..offset].iter().chain(&area[offset + len..]).all(|&b| b == 0));
            }
        }
    }
}
