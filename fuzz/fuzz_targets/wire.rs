//! `wire`: a request header off the socket, the Infer request's validation
//! and its preprocessing plan (`api::request`), against a fuzzer-chosen model.
//!
//! Input: the model's input config (size, channels, layout, resize, scale,
//! mean/std) and `max_batch`, then a 64-byte request header, then the payload.
//! Properties: `RequestHeader::parse`, `check_infer` and `InferPlan::decode`
//! never panic; an accepted request has 1..=max_batch rows and its plan's
//! floats are within `InferTarget::max_input_floats`, the bound
//! `api::request` documents; decoding allocates exactly the planned floats;
//! `decode_infer` agrees with check + decode. (scripts/fuzz.sh also caps
//! every single allocation with -malloc_limit_mb.)

#![no_main]

use gati_fuzz::Input;
use gatid::api::request::{check_infer, decode_infer, InferTarget};
use gatid::api::wire::{Dtype, Kind, RequestHeader, Status, HEADER_LEN, MAGIC, MAX_DIMS, VERSION};
use gatid::config::{InputConfig, Layout, Resize};
use gatid::infer::model::row_shape;
use libfuzzer_sys::fuzz_target;

fn input_config(input: &mut Input<'_>) -> InputConfig {
    let flags = input.u8();
    let channels = input.range(1, 4);
    let per_channel = |input: &mut Input<'_>, default: f32| -> Vec<f32> {
        (0..channels).map(|_| if input.u8() & 1 == 0 { default } else { input.f32() }).collect()
    };
    // Validation refuses a non-finite mean and a zero or non-finite std: keep
    // to what a loaded config can hold.
    let mean = if flags & 0x10 != 0 { per_channel(input, 0.0) } else { vec![] };
    let mean = mean.into_iter().map(|m| if m.is_finite() { m } else { 0.0 }).collect();
    let std = if flags & 0x20 != 0 { per_channel(input, 1.0) } else { vec![] };
    let std = std.into_iter().map(|s| if s.is_finite() && s != 0.0 { s } else { 1.0 }).collect();
    let scale = if flags & 0x40 != 0 { input.f32() } else { 1.0 / 255.0 };
    InputConfig {
        layout: if flags & 1 == 0 { Layout::NCHW } else { Layout::NHWC },
        // Small models keep each run cheap; the sizes still vary.
        height: input.range(1, 32),
        width: input.range(1, 32),
        channels,
        scale: if scale.is_finite() && scale != 0.0 { scale } else { 1.0 },
        mean,
        std,
        resize: match (flags >> 1) & 3 {
            0 => Resize::Nearest,
            1 => Resize::None,
            _ => Resize::Bilinear,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let cfg = input_config(&mut input);
    let max_batch = input.range(1, 64);
    let mut head: [u8; HEADER_LEN] = input.array();
    let force = input.u8();
    let payload = input.rest();
    // Most inputs should get past framing to the Infer checks: magic, version
    // and kind are forced unless the flag byte says to keep the fuzzer's.
    if force & 1 == 0 {
        head[..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4..6].copy_from_slice(&VERSION.to_le_bytes());
        head[6..8].copy_from_slice(&(Kind::Infer as u16).to_le_bytes());
    }
    let Ok(header) = RequestHeader::parse(&head) else { return };
    assert_eq!(header.dims().is_none(), usize::from(header.ndim) > MAX_DIMS);
    let row = row_shape(&cfg);
    let target = InferTarget { input: &cfg, row_shape: &row, max_batch };
    let checked = check_infer(&target, &header, payload);
    let plan = match &checked {
        Ok(plan) => plan,
        Err(status) => {
            assert_ne!(*status, Status::Ok);
            assert_eq!(decode_infer(&target, &header, payload), Err(*status));
            return;
        }
    };
    assert!((1..=max_batch).contains(&plan.rows), "rows {} outside 1..={max_batch}", plan.rows);
    let floats = plan.floats(&target);
    assert!(floats <= target.max_input_floats(), "{floats} floats > bound {}", target.max_input_floats());
    let decoded = plan.decode(&target, payload);
    if let Ok(v) = &decoded {
        assert_eq!(v.len(), floats, "decode allocates the planned floats");
        if header.dtype == Dtype::F32 as u8 {
            assert!(v.iter().all(|x| x.is_finite()), "accepted f32 input is finite");
        }
    }
    // Bitwise: a huge scale can make an image's values infinite (or NaN), which
    // `==` would call unequal to themselves.
    let bits =
        |r: Result<(usize, Vec<f32>), Status>| r.map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
    assert_eq!(bits(decode_infer(&target, &header, payload)), bits(decoded.map(|v| (plan.rows, v))));
});
