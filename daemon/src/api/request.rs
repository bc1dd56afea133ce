//! Checks an inference request against its model and turns the payload into
//! model-ready rows. Pure: no I/O, so every bad-input case is unit-testable
//! (and fuzzable).
//!
//! Promise: every size comes from the header and is checked before anything is
//! allocated. An accepted request has at most `max_batch` rows, so its decoded
//! input is at most [`InferTarget::max_input_floats`] floats, whatever shape
//! the client declared (an image's resize can expand it by any factor, so the
//! row count is checked before preprocessing, not after).

use super::wire::{Dtype, RequestHeader, Status};
use crate::config::InputConfig;
use crate::infer::preprocess::image_to_input;

/// What an Infer request for one model must fit.
#[derive(Debug, Clone, Copy)]
pub struct InferTarget<'a> {
    /// How client images become input rows.
    pub input: &'a InputConfig,
    /// One row of the model's input, without the batch dimension.
    pub row_shape: &'a [usize],
    /// Most rows one request may carry (the model's `max_batch`).
    pub max_batch: usize,
}

impl InferTarget<'_> {
    /// Floats in one input row.
    pub fn row_len(&self) -> usize {
        self.row_shape.iter().product()
    }

    /// The most floats an accepted request decodes to.
    pub fn max_input_floats(&self) -> usize {
        self.max_batch.saturating_mul(self.row_len())
    }
}

/// A checked Infer request: how many rows it carries and how it decodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferPlan {
    pub rows: usize,
    dtype: Dtype,
    dims: Vec<usize>,
}

impl InferPlan {
    /// Floats the decoded input takes (`rows` × the model's row): what the
    /// caller charges before [`InferPlan::decode`] allocates it.
    pub fn floats(&self, target: &InferTarget<'_>) -> usize {
        self.rows.saturating_mul(target.row_len())
    }

    /// The model-ready rows; allocates [`InferPlan::floats`] floats.
    pub fn decode(&self, target: &InferTarget<'_>, payload: &[u8]) -> Result<Vec<f32>, Status> {
        match self.dtype {
            Dtype::U8 => {
                image_to_input(target.input, &self.dims, payload).map(|(_, v)| v).map_err(|_| Status::BadShape)
            }
            _ => {
                let data: Vec<f32> =
                    payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                if data.iter().any(|v| !v.is_finite()) {
                    return Err(Status::BadPayload);
                }
                Ok(data)
            }
        }
    }
}

/// Checks an Infer request's header against the model, allocating nothing.
pub fn check_infer(target: &InferTarget<'_>, header: &RequestHeader, payload: &[u8]) -> Result<InferPlan, Status> {
    let dtype = Dtype::from_u8(header.dtype).ok_or(Status::BadDtype)?;
    let n = usize::from(header.ndim);
    if n > crate::api::wire::MAX_DIMS {
        return Err(Status::BadShape);
    }
    let mut dims = [0usize; crate::api::wire::MAX_DIMS];
    for (d, s) in dims.iter_mut().zip(&header.shape[..n]) {
        *d = s.get() as usize;
    }
    let dims = &dims[..n];
    let elems = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or(Status::BadShape)?;
    if dims.is_empty() || elems == 0 {
        return Err(Status::BadShape);
    }
    if elems.checked_mul(dtype.size()) != Some(payload.len()) {
        return Err(Status::PayloadMismatch);
    }
    let rows = match dtype {
        Dtype::Bytes => return Err(Status::BadDtype),
        // HWC is one image, NHWC is N: N is bounded before the resize runs.
        Dtype::U8 => match dims.len() {
            3 => 1,
            4 => dims[0],
            _ => return Err(Status::BadShape),
        },
        Dtype::F32 => {
            let row = target.row_shape;
            if dims == row {
                1
            } else if dims.len() == row.len() + 1 && dims[1..] == row[..] {
                dims[0]
            } else {
                return Err(Status::BadShape);
            }
        }
    };
    if rows > target.max_batch {
        return Err(Status::TooManyRows);
    }
    Ok(InferPlan { rows, dtype, dims: dims.to_vec() })
}

/// Checks and decodes in one step (tests, tools): rows and model-ready data.
pub fn decode_infer(
    target: &InferTarget<'_>,
    header: &RequestHeader,
    payload: &[u8],
) -> Result<(usize, Vec<f32>), Status> {
    let plan = check_infer(target, header, payload)?;
    let data = plan.decode(target, payload)?;
    Ok((plan.rows, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::wire::Kind;
    use crate::config::{Layout, Resize};

    fn input() -> InputConfig {
        InputConfig {
            layout: Layout::NCHW,
            height: 32,
            width: 32,
            channels: 3,
            scale: 1.0,
            mean: vec![],
            std: vec![],
            resize: Resize::Bilinear,
        }
    }

    fn header(dtype: Dtype, shape: &[u32], len: usize) -> RequestHeader {
        RequestHeader::new(Kind::Infer, 1, 7, dtype, shape, len as u32)
    }

    #[test]
    fn an_expanding_shape_is_refused_before_the_resize_allocates() {
        let input = input();
        let t = InferTarget { input: &input, row_shape: &[3, 32, 32], max_batch: 8 };
        // 4 Mi one-pixel images: 4 MiB on the wire, 48 GiB of f32 after the resize.
        let n = 4 << 20;
        let payload = vec![7u8; n];
        let h = header(Dtype::U8, &[n as u32, 1, 1, 1], n);
        assert_eq!(decode_infer(&t, &h, &payload), Err(Status::TooManyRows));
        // At the limit it is served, and the output is within the documented bound.
        let (rows, data) = decode_infer(&t, &header(Dtype::U8, &[8, 1, 1, 1], 8), &payload[..8]).unwrap();
        assert_eq!((rows, data.len()), (8, t.max_input_floats()));
    }

    #[test]
    fn f32_rows_are_bounded_and_shapes_checked() {
        let input = input();
        let t = InferTarget { input: &input, row_shape: &[3, 2, 2], max_batch: 2 };
        let row = vec![0u8; 12 * 4];
        assert_eq!(decode_infer(&t, &header(Dtype::F32, &[3, 2, 2], 48), &row).unwrap().0, 1);
        let three = vec![0u8; 3 * 48];
        assert_eq!(decode_infer(&t, &header(Dtype::F32, &[3, 3, 2, 2], 144), &three), Err(Status::TooManyRows));
        assert_eq!(decode_infer(&t, &header(Dtype::F32, &[2, 2, 3], 48), &row), Err(Status::BadShape));
        assert_eq!(decode_infer(&t, &header(Dtype::F32, &[3, 2, 2], 44), &row[..44]), Err(Status::PayloadMismatch));
        let nan: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), 12).flatten().collect();
        assert_eq!(decode_infer(&t, &header(Dtype::F32, &[3, 2, 2], 48), &nan), Err(Status::BadPayload));
        // Dimensions whose product overflows are a bad shape, not a panic.
        let huge = [u32::MAX, u32::MAX, u32::MAX, u32::MAX];
        assert_eq!(decode_infer(&t, &header(Dtype::U8, &huge, 0), &[]), Err(Status::BadShape));
    }
}
