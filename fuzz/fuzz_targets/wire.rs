//! `wire` (first version): request header parsing. Extended once the
//! bounds-checked Infer validation lands (see docs/fuzzing.md).

#![no_main]

use gatid::api::wire::{RequestHeader, ResponseHeader, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.first_chunk::<HEADER_LEN>() else { return };
    if let Ok(h) = RequestHeader::parse(head) {
        let _ = h.dims();
    }
    if let Ok(h) = ResponseHeader::parse(head) {
        let _ = h.dims();
    }
});
