//! The GPU executor's program: a list of ops over numbered values, each op a
//! cuDNN / cuBLAS call or a gati kernel, with BatchNorms folded and block
//! epilogues fused. Made by [`super::lower`], run by [`super::exec`] on a
//! device or by [`super::cpu_exec`] on the CPU (the reference tests use).

use std::collections::HashMap;

use gati_kernels::Activation;

/// Index of a value (an activation tensor) in [`Plan::values`].
pub type ValueId = usize;
/// Index of a constant buffer in [`Plan::weights`].
pub type WeightId = usize;

/// An activation tensor; `dims` are per row (`[C, H, W]` or `[K]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub name: String,
    pub dims: Vec<usize>,
}

impl Value {
    /// Values per row.
    pub fn row_len(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A 2-D window: kernel, stride, padding (top, left, bottom, right), dilation,
/// and the input and output height × width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// An NHWC model input to NCHW (gati kernel).
    NhwcToNchw { x: ValueId, y: ValueId, c: usize, h: usize, w: usize },
    /// Convolution without bias (cuDNN); weights `[cout, cin/group, kh, kw]`, BN folded in.
    Conv { x: ValueId, y: ValueId, w: WeightId, cin: usize, cout: usize, group: usize, win: Window },
    /// The fused block epilogue (gati kernel), in place when `y == x`.
    Epilogue {
        x: ValueId,
        y: ValueId,
        channels: usize,
        spatial: usize,
        bias: Option<WeightId>,
        residual: Option<ValueId>,
        act: Activation,
        post_scale: Option<WeightId>,
        post_shift: Option<WeightId>,
    },
    /// Zero padding (gati kernel): an asymmetric convolution padding made explicit.
    Pad { x: ValueId, y: ValueId, channels: usize, in_hw: [usize; 2], top_left: [usize; 2], out_hw: [usize; 2] },
    /// Max pooling (cuDNN).
    MaxPool { x: ValueId, y: ValueId, channels: usize, win: Window },
    /// Mean over each channel's plane (the epilogue kernel's pooled output).
    GlobalAvgPool { x: ValueId, y: ValueId, channels: usize, spatial: usize },
    /// `y = act(x · W + bias)` (cuBLAS + gati kernel); `W` is `[k][n]` row-major.
    Gemm { x: ValueId, y: ValueId, w: WeightId, k: usize, n: usize, bias: Option<WeightId>, act: Activation },
}

impl Op {
    /// The value it writes.
    pub fn output(&self) -> ValueId {
        match *self {
            Op::NhwcToNchw { y, .. }
            | Op::Conv { y, .. }
            | Op::Epilogue { y, .. }
            | Op::Pad { y, .. }
            | Op::MaxPool { y, .. }
            | Op::GlobalAvgPool { y, .. }
            | Op::Gemm { y, .. } => y,
        }
    }

    /// A short name for summaries ("conv", "epilogue", ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::NhwcToNchw { .. } => "nhwc_to_nchw",
            Op::Conv { group, cin, .. } if *group > 1 && *group == *cin => "conv_depthwise",
            Op::Conv { .. } => "conv",
            Op::Epilogue { .. } => "epilogue",
            Op::Pad { .. } => "pad",
            Op::MaxPool { .. } => "max_pool",
            Op::GlobalAvgPool { .. } => "global_avg_pool",
            Op::Gemm { .. } => "gemm",
        }
    }
}

/// A lowered model.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub values: Vec<Value>,
    pub weights: Vec<Vec<f32>>,
    pub ops: Vec<Op>,
    pub input: ValueId,
    pub output: ValueId,
    /// ONNX tensor names that map onto a value (aliases — Flatten, Reshape,
    /// an identity pool — share their source's value).
    pub names: HashMap<String, ValueId>,
}

impl Plan {
    /// The value an ONNX tensor name maps to.
    pub fn value_of(&self, name: &str) -> Option<ValueId> {
        self.names.get(name).copied()
    }

    /// How many ops of each kind, sorted by kind.
    pub fn summary(&self) -> Vec<(&'static str, usize)> {
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for op in &self.ops {
            *counts.entry(op.kind()).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort();
        v
    }

    /// Splits the ops into stages ending at the ops that write `cuts` (values,
    /// in order); the last stage ends at the plan's end. `None` if a cut is
    /// not written by any op after the previous cut.
    pub fn stages(&self, cuts: &[ValueId]) -> Option<Vec<std::ops::Range<usize>>> {
        let mut out = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for &c in cuts {
            let end = start + self.ops[start..].iter().rposition(|op| op.output() == c)? + 1;
            out.push(start..end);
            start = end;
        }
        out.push(start..self.ops.len());
        Some(out)
    }
}
