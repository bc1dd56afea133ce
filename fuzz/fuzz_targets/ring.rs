//! `ring`: the shared-memory ring as a hostile guest leaves it.
//!
//! Input: a layout size, then the region's control words and data bytes, then
//! a script of operations. Operations either use the rings through their
//! public API (push and pop on both rings, as the daemon and the guest do) or
//! play the hostile guest: overwrite a ring index, a frame header or data bytes
//! between two calls, or the whole control block before `Layout::read_from`.
//! Properties: nothing panics or reads out of bounds; a popped frame's payload
//! has the length its header says and fits the ring; and while no one has
//! tampered with a ring, it is a FIFO: frames come out as they went in.

#![no_main]

use std::collections::VecDeque;

use gati_fuzz::Input;
use gati_sdk::layout::{
    Layout, Shared, DATA_OFFSET, FRAME_HEADER_BYTES, REQUEST_HEADER_OFFSET, RESPONSE_HEADER_OFFSET,
};
use gati_sdk::ring::{Ring, RingError};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// 64-byte aligned storage for a region.
#[derive(IntoBytes, FromBytes, Immutable, KnownLayout, Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// What the fuzzer expects a ring to hold, while it is still trustworthy.
#[derive(Default)]
struct Model {
    frames: VecDeque<(u64, u32, Vec<u8>)>,
    tampered: bool,
}

fn ring<'r, 'a>(shared: &'r mut Shared<'a>, which: u8) -> &'r mut Ring<'a> {
    if which & 1 == 0 {
        &mut shared.request
    } else {
        &mut shared.response
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // Small rings so that wrap-around and "full" are reached quickly.
    let layout = Layout::for_max_message(usize::from(input.u8()) * 4);
    let mut blocks = vec![Block([0; 64]); layout.total_len() / 64];
    let region = blocks.as_mut_bytes();
    layout.init(region).expect("a fresh region fits its own layout");
    let cap = layout.ring_capacity;
    let mut models = [Model::default(), Model::default()];
    // Starting indices: zero, or hostile ones (the guest wrote them before we looked).
    if input.u8() & 1 == 1 {
        for off in [REQUEST_HEADER_OFFSET, RESPONSE_HEADER_OFFSET] {
            for field in [0, 64] {
                region[off + field..off + field + 8].copy_from_slice(&input.u64().to_ne_bytes());
            }
        }
        models.iter_mut().for_each(|m| m.tampered = true);
    }
    let mut out = Vec::new();
    let mut seq = 0u64;
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let which = op >> 7;
        match op & 0x7 {
            0 | 1 => {
                // Push a frame of a fuzzer-chosen length (may exceed the limit).
                let len = usize::from(input.u8()) * 3;
                let payload: Vec<u8> = (0..len).map(|i| i as u8 ^ op).collect();
                let status = u32::from(op & 0x70);
                let mut shared = layout.split(region).expect("region fits");
                let r = ring(&mut shared, which);
                let max = r.max_payload();
                assert!(max <= cap - FRAME_HEADER_BYTES);
                match r.push(seq, status, &payload) {
                    Ok(()) => models[usize::from(which)].frames.push_back((seq, status, payload)),
                    Err(RingError::TooLarge { len, max: m }) => assert!(len > m && m == max),
                    Err(RingError::Full { free, need }) => assert!(need > free && free <= cap),
                    Err(RingError::Corrupt(_)) => assert!(models[usize::from(which)].tampered),
                }
                seq += 1;
            }
            2 | 3 => {
                let mut shared = layout.split(region).expect("region fits");
                let r = ring(&mut shared, which);
                let model = &mut models[usize::from(which)];
                match r.pop_into(&mut out) {
                    Ok(Some(f)) => {
                        assert_eq!(out.len(), f.len as usize, "payload has the header's length");
                        assert!(out.len() <= cap - FRAME_HEADER_BYTES, "payload fits the ring");
                        if !model.tampered {
                            let (s, st, p) = model.frames.pop_front().expect("a frame was pushed");
                            assert_eq!((f.seq, f.status, out.as_slice()), (s, st, p.as_slice()), "FIFO");
                        }
                    }
                    Ok(None) => assert!(model.tampered || model.frames.is_empty(), "a pushed frame was lost"),
                    Err(_) => assert!(model.tampered, "an untouched ring is never corrupt"),
                }
                let _ = r.is_empty();
            }
            4 => {
                // The guest overwrites one index of one ring.
                let off = if which == 0 { REQUEST_HEADER_OFFSET } else { RESPONSE_HEADER_OFFSET };
                let field = if input.u8() & 1 == 0 { 0 } else { 64 };
                let v = match input.u8() & 3 {
                    // Small nudges around the current value hit the edge cases.
                    0 => {
                        let cur = u64::from_ne_bytes(region[off + field..off + field + 8].try_into().unwrap());
                        cur.wrapping_add(u64::from(input.u8())).wrapping_sub(128)
                    }
                    _ => input.u64(),
                };
                region[off + field..off + field + 8].copy_from_slice(&v.to_ne_bytes());
                models[usize::from(which)].tampered = true;
            }
            5 => {
                // The guest scribbles over data bytes (frame headers included).
                let base = if which == 0 { DATA_OFFSET } else { layout.response_data_offset() };
                let at = (input.u64() as usize) % cap;
                let n = usize::from(input.u8() % 32);
                let bytes = input.bytes(n).to_vec();
                for (i, b) in bytes.iter().enumerate() {
                    region[base + (at + i) % cap] = *b;
                }
                models[usize::from(which)].tampered |= !bytes.is_empty();
            }
            6 => {
                // Indices near the top of u64: wrap-around arithmetic.
                let off = if which == 0 { REQUEST_HEADER_OFFSET } else { RESPONSE_HEADER_OFFSET };
                let base = u64::MAX - u64::from(input.u8());
                for field in [0, 64] {
                    region[off + field..off + field + 8].copy_from_slice(&base.to_ne_bytes());
                }
                // Equal indices: an empty ring, but frames that straddle 2^64
                // land at a different offset (2^64 is no multiple of the
                // capacity), so the FIFO check no longer applies; never panicking does.
                models[usize::from(which)].frames.clear();
                models[usize::from(which)].tampered = true;
            }
            _ => {
                // The guest side reads the layout from a control block it may not trust.
                let mut copy = region[..DATA_OFFSET].to_vec();
                let n = usize::from(input.u8() % 40);
                for _ in 0..n {
                    let at = usize::from(input.u8()) % 64;
                    copy[at] = input.u8();
                }
                let mut guest = vec![Block([0; 64]); layout.total_len() / 64];
                let g = guest.as_mut_bytes();
                g[..DATA_OFFSET].copy_from_slice(&copy);
                if let Ok(l) = Layout::read_from(g) {
                    assert!(l.total_len() <= g.len());
                    assert!(l.max_message + FRAME_HEADER_BYTES <= l.ring_capacity);
                    let mut s = l.split(g).expect("a layout read from a region fits it");
                    let _ = s.request.pop_into(&mut out);
                    let _ = s.response.push(0, 0, &[]);
                }
            }
        }
    }
});
