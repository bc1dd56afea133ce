//! The fused block epilogue (`cu/epilogue.cu`).

use super::{check_len, Activation};
use crate::KernelError;

/// A block output: `rows × channels × spatial` (NCHW with spatial = H·W; 1 for a GEMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpilogueShape {
    pub rows: usize,
    pub channels: usize,
    pub spatial: usize,
}

impl EpilogueShape {
    /// Values in the tensor.
    pub fn len(&self) -> usize {
        self.rows * self.channels * self.spatial
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the epilogue adds: per-channel bias, a residual of the tensor's shape,
/// the activation, then a per-channel affine map (a BatchNorm after the activation).
#[derive(Debug, Clone, Copy, Default)]
pub struct EpilogueParams<'a> {
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub act: Activation,
    pub post_scale: Option<&'a [f32]>,
    pub post_shift: Option<&'a [f32]>,
}

impl EpilogueParams<'_> {
    /// Checks every present argument against `shape`.
    pub fn check(&self, shape: EpilogueShape) -> Result<(), KernelError> {
        for (what, v, want) in [
            ("bias", self.bias, shape.channels),
            ("residual", self.residual, shape.len()),
            ("post_scale", self.post_scale, shape.channels),
            ("post_shift", self.post_shift, shape.channels),
        ] {
            if let Some(v) = v {
                check_len(what, v.len(), want)?;
            }
        }
        Ok(())
    }
}

/// `y = act(x + bias + residual) · post_scale + post_shift`; with `pooled`
/// (`out`, `stride`), also `out[n·stride + c] = mean over the plane of y[n, c]`.
pub fn block_epilogue(
    x: &[f32],
    shape: EpilogueShape,
    p: &EpilogueParams<'_>,
    y: &mut [f32],
    pooled: Option<(&mut [f32], usize)>,
) -> Result<(), KernelError> {
    check_len("x", x.len(), shape.len())?;
    check_len("y", y.len(), shape.len())?;
    p.check(shape)?;
    let mut pooled = pooled;
    if let Some((out, stride)) = &pooled {
        if *stride < shape.channels || out.len() < shape.rows.saturating_sub(1) * stride + shape.channels {
            return Err(KernelError::Shape(format!(
                "pooled buffer of {} with stride {stride} is too small for {} rows × {} channels",
                out.len(),
                shape.rows,
                shape.channels
            )));
        }
    }
    for n in 0..shape.rows {
        for c in 0..shape.channels {
            let base = (n * shape.channels + c) * shape.spatial;
            let b = p.bias.map_or(0.0, |b| b[c]);
            let scale = p.post_scale.map_or(1.0, |s| s[c]);
            let shift = p.post_shift.map_or(0.0, |s| s[c]);
            let mut sum = 0f64;
            for s in base..base + shape.spatial {
                let mut v = x[s] + b;
                if let Some(r) = p.residual {
                    v += r[s];
                }
                let v = p.act.apply(v) * scale + shift;
                y[s] = v;
                sum += f64::from(v);
            }
            if let Some((out, stride)) = pooled.as_mut() {
                out[n * *stride + c] = (sum / shape.spatial.max(1) as f64) as f32;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_residual_relu6_affine_and_pool() {
        // 1 row, 2 channels, 2 spatial.
        let shape = EpilogueShape { rows: 1, channels: 2, spatial: 2 };
        let x = [1.0, -3.0, 5.0, 2.0];
        let res = [0.5, 0.5, 0.5, 0.5];
        let p = EpilogueParams {
            bias: Some(&[1.0, 0.0]),
            residual: Some(&res),
            act: Activation::Relu6,
            post_scale: Some(&[2.0, 1.0]),
            post_shift: Some(&[0.0, -1.0]),
        };
        let mut y = [0.0; 4];
        let mut pooled = [9.0; 3];
        block_epilogue(&x, shape, &p, &mut y, Some((&mut pooled, 3))).unwrap();
        // c0: 1+1+0.5=2.5 → 2.5·2 = 5; -3+1+0.5 = -1.5 → 0 → 0. c1: 5.5 → 5.5-1 = 4.5; 2.5 → 1.5.
        assert_eq!(y, [5.0, 0.0, 4.5, 1.5]);
        assert_eq!(pooled, [2.5, 3.0, 9.0]);
    }

    #[test]
    fn in_place_semantics_and_no_pool() {
        let shape = EpilogueShape { rows: 2, channels: 1, spatial: 3 };
        let x = [-1.0, 0.0, 7.0, 3.0, -2.0, 6.5];
        let mut y = x;
        block_epilogue(&x, shape, &EpilogueParams { act: Activation::Relu, ..Default::default() }, &mut y, None)
            .unwrap();
        assert_eq!(y, [0.0, 0.0, 7.0, 3.0, 0.0, 6.5]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let shape = EpilogueShape { rows: 1, channels: 2, spatial: 2 };
        let mut y = [0.0; 4];
        let bad_bias = EpilogueParams { bias: Some(&[1.0]), ..Default::default() };
        assert!(block_epilogue(&[0.0; 4], shape, &bad_bias, &mut y, None).is_err());
        assert!(block_epilogue(&[0.0; 3], shape, &EpilogueParams::default(), &mut y, None).is_err());
        let mut small = [0.0; 1];
        let r = block_epilogue(&[0.0; 4], shape, &EpilogueParams::default(), &mut y, Some((&mut small, 2)));
        assert!(r.is_err());
    }
}
