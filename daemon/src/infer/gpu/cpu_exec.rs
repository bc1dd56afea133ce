//! Runs a [`Plan`] on the CPU, op by op, with the kernels' CPU references for
//! gati's own kernels and plain loops for what cuDNN/cuBLAS do on the device.
//! The reference the lowering is tested against (vs ONNX Runtime), and what
//! the hardware-in-loop check compares the device executor with.

use gati_kernels::reference::{self, EpilogueParams, EpilogueShape};

use super::plan::{Op, Plan, ValueId, Window};
use super::GpuError;

/// Runs `plan` on `rows` rows of `input` (row-major, the model's input layout);
/// returns every value (`rows × row_len` each; unwritten ones empty).
pub fn run_all(plan: &Plan, rows: usize, input: &[f32]) -> Result<Vec<Vec<f32>>, GpuError> {
    let mut vals: Vec<Vec<f32>> = vec![Vec::new(); plan.values.len()];
    let want = rows * plan.values[plan.input].row_len();
    if input.len() != want {
        return Err(GpuError::Graph(format!("{} input values for {rows} rows of {want}", input.len())));
    }
    vals[plan.input] = input.to_vec();
    for op in &plan.ops {
        let y = op.output();
        let len = rows * plan.values[y].row_len();
        let mut out = std::mem::take(&mut vals[y]);
        if out.len() != len {
            out = vec![0.0; len];
        }
        step(plan, op, rows, &vals, &mut out)?;
        vals[y] = out;
    }
    Ok(vals)
}

/// The plan's output for `rows` rows.
pub fn run(plan: &Plan, rows: usize, input: &[f32]) -> Result<Vec<f32>, GpuError> {
    let mut vals = run_all(plan, rows, input)?;
    Ok(std::mem::take(&mut vals[plan.output]))
}

fn get(vals: &[Vec<f32>], id: ValueId, out: &[f32]) -> Vec<f32> {
    // An in-place op reads the value it writes: `out` holds it.
    if vals[id].is_empty() {
        out.to_vec()
    } else {
        vals[id].clone()
    }
}

fn step(plan: &Plan, op: &Op, rows: usize, vals: &[Vec<f32>], out: &mut [f32]) -> Result<(), GpuError> {
    let w = |id: usize| plan.weights[id].as_slice();
    match *op {
        Op::NhwcToNchw { x, c, h, w: width, .. } => {
            out.copy_from_slice(&reference::nhwc_to_nchw(&vals[x], rows, c, h, width)?);
        }
        Op::Conv { x, w: wid, cin, cout, group, win, .. } => conv(&vals[x], w(wid), rows, cin, cout, group, &win, out),
        Op::Epilogue { x, y, channels, spatial, bias, residual, act, post_scale, post_shift } => {
            let xin = if x == y { out.to_vec() } else { get(vals, x, out) };
            let p = EpilogueParams {
                bias: bias.map(w),
                residual: residual.map(|r| vals[r].as_slice()),
                act,
                post_scale: post_scale.map(w),
                post_shift: post_shift.map(w),
            };
            reference::block_epilogue(&xin, EpilogueShape { rows, channels, spatial }, &p, out, None)?;
        }
        Op::Pad { x, channels, in_hw, top_left, out_hw, .. } => {
            out.copy_from_slice(&reference::pad2d(&vals[x], rows * channels, in_hw, top_left, out_hw)?);
        }
        Op::MaxPool { x, channels, win, .. } => max_pool(&vals[x], rows * channels, &win, out),
        Op::GlobalAvgPool { x, channels, spatial, .. } => {
            let shape = EpilogueShape { rows, channels, spatial };
            let mut scratch = vec![0.0; shape.len()];
            reference::block_epilogue(
                &vals[x],
                shape,
                &EpilogueParams::default(),
                &mut scratch,
                Some((out, channels)),
            )?;
        }
        Op::Gemm { x, w: wid, k, n, bias, act, .. } => {
            let (xv, wv) = (&vals[x], w(wid));
            for r in 0..rows {
                let xr = &xv[r * k..(r + 1) * k];
                let yr = &mut out[r * n..(r + 1) * n];
                let mut acc = vec![0f64; n];
                for (kk, &xk) in xr.iter().enumerate() {
                    let wr = &wv[kk * n..(kk + 1) * n];
                    for (a, &wkn) in acc.iter_mut().zip(wr) {
                        *a += f64::from(xk) * f64::from(wkn);
                    }
                }
                for (j, v) in yr.iter_mut().enumerate() {
                    *v = acc[j] as f32;
                }
            }
            reference::row_bias_act(out, bias.map(w), n, act)?;
        }
    }
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "a convolution's shape is this many numbers")]
fn conv(x: &[f32], wt: &[f32], rows: usize, cin: usize, cout: usize, group: usize, win: &Window, out: &mut [f32]) {
    let [ih, iw] = win.in_hw;
    let [oh, ow] = win.out_hw;
    let (cpg, opg) = (cin / group, cout / group);
    let [kh, kw] = win.kernel;
    for n in 0..rows {
        for co in 0..cout {
            let gi = co / opg;
            let wbase = co * cpg * kh * kw;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f64;
                    for ci in 0..cpg {
                        let xc = n * cin + gi * cpg + ci;
                        for ky in 0..kh {
                            let iy = (oy * win.stride[0] + ky * win.dilation[0]) as isize - win.pads[0] as isize;
                            if iy < 0 || iy >= ih as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * win.stride[1] + kx * win.dilation[1]) as isize - win.pads[1] as isize;
                                if ix < 0 || ix >= iw as isize {
                                    continue;
                                }
                                let xv = x[(xc * ih + iy as usize) * iw + ix as usize];
                                acc += f64::from(xv) * f64::from(wt[wbase + (ci * kh + ky) * kw + kx]);
                            }
                        }
                    }
                    out[((n * cout + co) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
}

fn max_pool(x: &[f32], planes: usize, win: &Window, out: &mut [f32]) {
    let [ih, iw] = win.in_hw;
    let [oh, ow] = win.out_hw;
    for p in 0..planes {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..win.kernel[0] {
                    let iy = (oy * win.stride[0] + ky * win.dilation[0]) as isize - win.pads[0] as isize;
                    for kx in 0..win.kernel[1] {
                        let ix = (ox * win.stride[1] + kx * win.dilation[1]) as isize - win.pads[1] as isize;
                        if iy >= 0 && (iy as usize) < ih && ix >= 0 && (ix as usize) < iw {
                            m = m.max(x[(p * ih + iy as usize) * iw + ix as usize]);
                        }
                    }
                }
                out[(p * oh + oy) * ow + ox] = m;
            }
        }
    }
}
