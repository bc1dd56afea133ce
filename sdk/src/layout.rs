//! The shared-memory layout between the daemon and a sandboxed function,
//! defined once for both sides.
//!
//! One memfd holds, in order:
//!
//! ```text
//! offset 0                 Control      (64 B)  magic, version, capacity, guest state
//! offset 64                RingHeader   (128 B) request ring: head, tail (own cache lines)
//! offset 192               RingHeader   (128 B) response ring
//! offset 320               request data  (capacity bytes)
//! offset 320 + capacity    response data (capacity bytes)
//! ```
//!
//! Each ring carries frames of a [`FrameHeader`] (16 B: sequence number,
//! payload length, status) followed by the payload; frames wrap around the end
//! of the data area. The daemon owns the layout (it creates the memfd and never
//! reads the capacity back from shared memory); the guest validates what it
//! finds before using it.
//!
//! Both processes map the whole region read-write, so each side must assume
//! the other can change any byte at any time. Nothing here hands out a
//! reference to plain bytes of a mapped region: the control block and ring
//! headers are made only of atomics (so `&Control` and `&RingHeader` permit
//! concurrent writes), and the data areas are reached through raw pointers
//! with volatile copies into buffers the caller owns ([`crate::ring`]). A
//! mapped region is entered through the `unsafe` [`Layout::split_raw`] (and
//! [`Layout::read_from_raw`], [`Layout::init_raw`]); the safe `&mut [u8]`
//! versions are for memory this process owns exclusively (tests, fuzzing).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::ring::Ring;

/// `"GATI"` in the control block's first word.
pub const MAGIC: u32 = 0x4741_5449;
/// Layout version; bumped on any change to this file.
pub const VERSION: u32 = 1;

/// `Control::guest_state` before the guest has mapped the region.
pub const GUEST_STARTING: u32 = 0;
/// `Control::guest_state` once the guest waits for requests.
pub const GUEST_READY: u32 = 1;

/// Frame status: the payload is the handler's output.
pub const STATUS_OK: u32 = 0;
/// Frame status: the handler returned `Err`; the payload is its UTF-8 message.
pub const STATUS_HANDLER_ERROR: u32 = 1;
/// Frame status: the handler's output did not fit; the payload says how large it was.
pub const STATUS_TOO_LARGE: u32 = 2;
/// Frame status: the handler panicked; the payload is the panic message.
pub const STATUS_PANIC: u32 = 3;

/// Size of [`Control`].
pub const CONTROL_BYTES: usize = 64;
/// Size of [`RingHeader`].
pub const RING_HEADER_BYTES: usize = 128;
/// Size of [`FrameHeader`].
pub const FRAME_HEADER_BYTES: usize = 16;
/// Offset of the request ring's header.
pub const REQUEST_HEADER_OFFSET: usize = CONTROL_BYTES;
/// Offset of the response ring's header.
pub const RESPONSE_HEADER_OFFSET: usize = REQUEST_HEADER_OFFSET + RING_HEADER_BYTES;
/// Offset of the request ring's data area.
pub const DATA_OFFSET: usize = RESPONSE_HEADER_OFFSET + RING_HEADER_BYTES;

/// The control block at offset 0. Written by the daemon before the guest
/// starts (all but `guest_state`), then by protocol read-only except
/// `guest_state`, which the guest sets to [`GUEST_READY`]. A hostile guest can
/// write every word anyway: the daemon reads only `guest_state` back.
///
/// Every field, the reserved words included, is an atomic: a shared reference
/// to it asserts nothing about bytes that the other process may change.
/// `FromBytes`: every bit pattern is a valid value.
#[derive(FromBytes, IntoBytes, KnownLayout)]
#[repr(C, align(64))]
pub struct Control {
    pub magic: AtomicU32,
    pub version: AtomicU32,
    /// Bytes in each ring's data area.
    pub ring_capacity: AtomicU64,
    pub guest_state: AtomicU32,
    /// The guest's pid as it sees itself (1 in a fresh pid namespace).
    pub guest_pid: AtomicU32,
    /// Largest payload either side may send (≤ `ring_capacity` − 16).
    pub max_message: AtomicU64,
    _reserved: [AtomicU64; 4],
}

/// One SPSC ring's indices: monotonically increasing byte counts, each on its
/// own cache line. `head` is written only by the producer, `tail` only by the
/// consumer (by protocol: the ring checks both whenever it reads them); a frame
/// is visible once `head` moves past it (release/acquire). All atomics, like
/// [`Control`], padding included.
#[derive(FromBytes, IntoBytes, KnownLayout)]
#[repr(C, align(64))]
pub struct RingHeader {
    pub head: AtomicU64,
    _pad0: [AtomicU64; 7],
    pub tail: AtomicU64,
    _pad1: [AtomicU64; 7],
}

/// The header in front of every frame's payload.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    /// Request sequence number; a response carries its request's number.
    pub seq: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// One of the `STATUS_*` constants (requests use [`STATUS_OK`]).
    pub status: u32,
}

const _: () = assert!(size_of::<Control>() == CONTROL_BYTES);
const _: () = assert!(size_of::<RingHeader>() == RING_HEADER_BYTES);
const _: () = assert!(size_of::<FrameHeader>() == FRAME_HEADER_BYTES);
const _: () = assert!(DATA_OFFSET.is_multiple_of(64));

/// Why a region could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("shared region is {have} bytes, the layout needs {need}")]
    TooSmall { have: usize, need: usize },
    #[error("shared region is not 64-byte aligned")]
    Misaligned,
    #[error("bad magic {0:#x} (not a gati sandbox region)")]
    BadMagic(u32),
    #[error("layout version {0}, this SDK speaks {VERSION}")]
    BadVersion(u32),
    #[error("ring capacity {0} is out of range")]
    BadCapacity(u64),
}

/// Sizes of one sandbox's shared region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes in each ring's data area (a multiple of 64).
    pub ring_capacity: usize,
    /// Largest payload either side may send.
    pub max_message: usize,
}

impl Layout {
    /// The smallest layout whose rings each hold one message of `max_message` bytes.
    pub fn for_max_message(max_message: usize) -> Layout {
        let need = max_message.saturating_add(FRAME_HEADER_BYTES).max(64);
        Layout { ring_capacity: need.div_ceil(64).saturating_mul(64), max_message }
    }

    /// Offset of the response ring's data area.
    pub fn response_data_offset(&self) -> usize {
        DATA_OFFSET.saturating_add(self.ring_capacity)
    }

    /// Bytes the memfd must have (rounded up to 4 KiB pages; saturates, so an
    /// absurd layout needs more than any region has instead of wrapping).
    pub fn total_len(&self) -> usize {
        let bytes = DATA_OFFSET.saturating_add(self.ring_capacity.saturating_mul(2));
        bytes.div_ceil(4096).saturating_mul(4096)
    }

    /// Reads and validates the layout a daemon wrote into `region` (guest side).
    pub fn read_from(region: &mut [u8]) -> Result<Layout, LayoutError> {
        // SAFETY: an exclusive borrow: valid, and nothing else touches it meanwhile.
        unsafe { Layout::read_from_raw(region.as_mut_ptr(), region.len()) }
    }

    /// [`Layout::read_from`] on a mapped region (guest side).
    ///
    /// # Safety
    /// As for [`Layout::split_raw`], for the duration of the call.
    pub unsafe fn read_from_raw(base: *mut u8, len: usize) -> Result<Layout, LayoutError> {
        // SAFETY: the caller's contract covers `len` bytes from `base`.
        let control = unsafe { control(base, len)? };
        let magic = control.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(LayoutError::BadMagic(magic));
        }
        let version = control.version.load(Ordering::Acquire);
        if version != VERSION {
            return Err(LayoutError::BadVersion(version));
        }
        let capacity = control.ring_capacity.load(Ordering::Acquire);
        if capacity < 64 || !capacity.is_multiple_of(64) || capacity > (1 << 40) {
            return Err(LayoutError::BadCapacity(capacity));
        }
        let max_message = control.max_message.load(Ordering::Acquire);
        if max_message > capacity - FRAME_HEADER_BYTES as u64 {
            return Err(LayoutError::BadCapacity(capacity));
        }
        let layout = Layout { ring_capacity: capacity as usize, max_message: max_message as usize };
        if layout.total_len() > len {
            return Err(LayoutError::TooSmall { have: len, need: layout.total_len() });
        }
        Ok(layout)
    }

    /// Writes the control block into a fresh (zeroed) region (daemon side).
    pub fn init(&self, region: &mut [u8]) -> Result<(), LayoutError> {
        // SAFETY: an exclusive borrow: valid, and nothing else touches it meanwhile.
        unsafe { self.init_raw(region.as_mut_ptr(), region.len()) }
    }

    /// [`Layout::init`] on a mapped region (daemon side).
    ///
    /// # Safety
    /// As for [`Layout::split_raw`], for the duration of the call.
    pub unsafe fn init_raw(&self, base: *mut u8, len: usize) -> Result<(), LayoutError> {
        // SAFETY: the caller's contract.
        let shared = unsafe { self.split_raw(base, len)? };
        shared.control.ring_capacity.store(self.ring_capacity as u64, Ordering::Relaxed);
        shared.control.max_message.store(self.max_message as u64, Ordering::Relaxed);
        shared.control.version.store(VERSION, Ordering::Relaxed);
        shared.control.magic.store(MAGIC, Ordering::Release);
        Ok(())
    }

    /// Splits `region` into the control block and the two rings.
    pub fn split<'a>(&self, region: &'a mut [u8]) -> Result<Shared<'a>, LayoutError> {
        // SAFETY: an exclusive borrow for `'a`: valid for reads and writes, and
        // only reached through the returned view while it lives.
        unsafe { self.split_raw(region.as_mut_ptr(), region.len()) }
    }

    /// Splits a mapped region into the control block and the two rings.
    ///
    /// # Safety
    /// `base` must point to `len` bytes that stay mapped, readable and writable
    /// for `'a` (a `MAP_SHARED` mapping of a memfd sealed against shrinking:
    /// it cannot lose pages), and during `'a` this process must not reach
    /// those bytes other than through the returned view (no `&[u8]`/`&mut
    /// [u8]` over them, no second view used at the same time). Another
    /// process may write any byte at any time: the view reads the control
    /// words and ring indices atomically, copies data with volatile accesses
    /// into buffers the caller owns and checks every index and length it read.
    pub unsafe fn split_raw<'a>(&self, base: *mut u8, len: usize) -> Result<Shared<'a>, LayoutError> {
        // SAFETY: the caller's contract; `control` checks alignment and size.
        let control = unsafe { control(base, len)? };
        if len < self.total_len() {
            return Err(LayoutError::TooSmall { have: len, need: self.total_len() });
        }
        let at = |offset: usize| {
            // SAFETY: offset ≤ total_len ≤ len, so this stays inside the region,
            // whose base is not null (`control` checked it).
            unsafe { NonNull::new_unchecked(base.add(offset)) }
        };
        // SAFETY: both headers lie inside the region (DATA_OFFSET ≤ total_len)
        // at 64-byte aligned offsets of a 64-byte aligned base; RingHeader is
        // FromBytes and made only of atomics, so any bytes are a valid value
        // that the other process may change concurrently.
        let (request_header, response_header) = unsafe {
            (
                at(REQUEST_HEADER_OFFSET).cast::<RingHeader>().as_ref(),
                at(RESPONSE_HEADER_OFFSET).cast::<RingHeader>().as_ref(),
            )
        };
        // SAFETY: each data area is `ring_capacity` bytes inside the region
        // (DATA_OFFSET + 2 × capacity ≤ total_len ≤ len), disjoint from the
        // headers and from each other; the caller's contract keeps them
        // mapped and otherwise untouched for `'a`.
        let (request, response) = unsafe {
            (
                Ring::new(request_header, at(DATA_OFFSET), self.ring_capacity),
                Ring::new(response_header, at(self.response_data_offset()), self.ring_capacity),
            )
        };
        Ok(Shared { control, request, response })
    }
}

/// The control block at the start of `len` bytes at `base`.
///
/// # Safety
/// `base` must be valid for reads and writes of `len` bytes for `'a`.
unsafe fn control<'a>(base: *mut u8, len: usize) -> Result<&'a Control, LayoutError> {
    if base.is_null() || !(base as usize).is_multiple_of(align_of::<Control>()) {
        return Err(LayoutError::Misaligned);
    }
    if len < DATA_OFFSET {
        return Err(LayoutError::TooSmall { have: len, need: DATA_OFFSET });
    }
    // SAFETY: aligned, in bounds (len ≥ 64) and valid per the caller; Control
    // is FromBytes (any bytes are a valid value) and made only of atomics, so
    // a shared reference stays sound while the other process writes it.
    Ok(unsafe { &*base.cast::<Control>() })
}

/// The region seen through its layout.
pub struct Shared<'a> {
    pub control: &'a Control,
    /// Daemon → guest.
    pub request: Ring<'a>,
    /// Guest → daemon.
    pub response: Ring<'a>,
}

/// A 64-byte aligned block; tests build regions out of these.
#[cfg(test)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Block([u8; 64]);

/// A zeroed, 64-byte aligned region for `layout`.
#[cfg(test)]
pub(crate) fn test_region(layout: &Layout) -> Vec<Block> {
    vec![Block([0; 64]); layout.total_len() / 64]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn offsets_are_what_the_docs_say() {
        assert_eq!(offset_of!(Control, magic), 0);
        assert_eq!(offset_of!(Control, ring_capacity), 8);
        assert_eq!(offset_of!(Control, guest_state), 16);
        assert_eq!(offset_of!(RingHeader, head), 0);
        assert_eq!(offset_of!(RingHeader, tail), 64);
        assert_eq!(offset_of!(FrameHeader, len), 8);
        assert_eq!(offset_of!(FrameHeader, status), 12);
        let l = Layout::for_max_message(1 << 20);
        assert_eq!(l.ring_capacity % 64, 0);
        assert_eq!(offset_of!(Control, max_message), 24);
        assert!(l.ring_capacity - FRAME_HEADER_BYTES >= l.max_message);
        assert_eq!(l.response_data_offset(), 320 + l.ring_capacity);
    }

    #[test]
    fn guest_reads_back_what_the_daemon_wrote() {
        let layout = Layout::for_max_message(1000);
        let mut buf = test_region(&layout);
        let region = buf.as_mut_bytes();
        layout.init(region).unwrap();
        assert_eq!(Layout::read_from(region).unwrap(), layout);
        region[0] ^= 1;
        assert!(matches!(Layout::read_from(region), Err(LayoutError::BadMagic(_))));
        assert!(matches!(layout.split(&mut region[..100]), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(layout.split(&mut region[1..]), Err(LayoutError::Misaligned)));
        // Absurd layouts saturate instead of overflowing and fit no region.
        let huge = Layout::for_max_message(usize::MAX);
        assert_eq!(huge.total_len(), usize::MAX);
        assert!(matches!(huge.split(region), Err(LayoutError::TooSmall { .. })));
        let odd = Layout { ring_capacity: usize::MAX, max_message: 0 };
        assert!(matches!(odd.split(region), Err(LayoutError::TooSmall { .. })));
    }
}
