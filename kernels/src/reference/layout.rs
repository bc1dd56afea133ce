//! Layout kernels (`cu/layout.cu`).

use super::{check_len, Activation};
use crate::KernelError;

/// NHWC → NCHW.
pub fn nhwc_to_nchw(
    x: &[f32],
    rows: usize,
    channels: usize,
    height: usize,
    width: usize,
) -> Result<Vec<f32>, KernelError> {
    check_len("x", x.len(), rows * channels * height * width)?;
    let mut y = vec![0.0; x.len()];
    for n in 0..rows {
        for c in 0..channels {
            for h in 0..height {
                for w in 0..width {
                    y[((n * channels + c) * height + h) * width + w] = x[((n * height + h) * width + w) * channels + c];
                }
            }
        }
    }
    Ok(y)
}

/// Zero padding of `planes` planes of `height × width` to `out = [oh, ow]`,
/// the input placed at (`top`, `left`).
pub fn pad2d(
    x: &[f32],
    planes: usize,
    hw: [usize; 2],
    top_left: [usize; 2],
    out: [usize; 2],
) -> Result<Vec<f32>, KernelError> {
    let ([h, w], [top, left], [oh, ow]) = (hw, top_left, out);
    check_len("x", x.len(), planes * h * w)?;
    if top + h > oh || left + w > ow {
        return Err(KernelError::Shape(format!("{h}×{w} at ({top}, {left}) does not fit {oh}×{ow}")));
    }
    let mut y = vec![0.0; planes * oh * ow];
    for p in 0..planes {
        for r in 0..h {
            let src = &x[(p * h + r) * w..(p * h + r + 1) * w];
            let at = (p * oh + r + top) * ow + left;
            y[at..at + w].copy_from_slice(src);
        }
    }
    Ok(y)
}

/// `y[r, k] = act(y[r, k] + bias[k])` in place over `rows × cols`.
pub fn row_bias_act(y: &mut [f32], bias: Option<&[f32]>, cols: usize, act: Activation) -> Result<(), KernelError> {
    if let Some(b) = bias {
        check_len("bias", b.len(), cols)?;
    }
    if cols == 0 || !y.len().is_multiple_of(cols) {
        return Err(KernelError::Shape(format!("{} values are not rows of {cols}", y.len())));
    }
    for row in y.chunks_exact_mut(cols) {
        for (k, v) in row.iter_mut().enumerate() {
            *v = act.apply(*v + bias.map_or(0.0, |b| b[k]));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_and_biases() {
        // 1 row, 2×1 image, 3 channels: NHWC [[a0 a1 a2], [b0 b1 b2]].
        let y = nhwc_to_nchw(&[0.0, 1.0, 2.0, 10.0, 11.0, 12.0], 1, 3, 2, 1).unwrap();
        assert_eq!(y, [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        let mut v = [1.0, -5.0, 3.0, 4.0];
        row_bias_act(&mut v, Some(&[0.5, 0.0]), 2, Activation::Relu).unwrap();
        assert_eq!(v, [1.5, 0.0, 3.5, 4.0]);
        assert!(row_bias_act(&mut v, None, 3, Activation::None).is_err());
        // 1 plane of 1×2 padded to 2×3 at (0, 1): [[0 a b], [0 0 0]].
        assert_eq!(pad2d(&[1.0, 2.0], 1, [1, 2], [0, 1], [2, 3]).unwrap(), [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]);
        assert!(pad2d(&[1.0, 2.0], 1, [1, 2], [0, 2], [2, 3]).is_err());
    }
}
