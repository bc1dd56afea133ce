//! Checks an inference request against its model and turns the payload into
//! model-ready rows. Pure: no I/O, so every bad-input case is unit-testable.

use super::wire::{Dtype, RequestHeader, Status};
use crate::infer::preprocess::image_to_input;
use crate::infer::ModelHandle;

/// Rows of model input decoded from a request, or the status to answer with.
pub fn decode_infer(model: &ModelHandle, header: &RequestHeader, payload: &[u8]) -> Result<(usize, Vec<f32>), Status> {
    let dtype = Dtype::from_u8(header.dtype).ok_or(Status::BadDtype)?;
    let dims = header.dims().ok_or(Status::BadShape)?;
    let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or(Status::BadShape)?;
    if dims.is_empty() || elems == 0 {
        return Err(Status::BadShape);
    }
    if elems.checked_mul(dtype.size()) != Some(payload.len()) {
        return Err(Status::PayloadMismatch);
    }
    match dtype {
        Dtype::Bytes => Err(Status::BadDtype),
        Dtype::U8 => image_to_input(&model.input, &dims, payload).map_err(|_| Status::BadShape),
        Dtype::F32 => {
            let row = &model.meta.row_shape;
            let rows = if dims.as_slice() == row.as_slice() {
                1
            } else if dims.len() == row.len() + 1 && dims[1..] == row[..] {
                dims[0]
            } else {
                return Err(Status::BadShape);
            };
            let data: Vec<f32> =
                payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if data.iter().any(|v| !v.is_finite()) {
                return Err(Status::BadPayload);
            }
            Ok((rows, data))
        }
    }
}
