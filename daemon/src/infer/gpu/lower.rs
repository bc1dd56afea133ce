//! ONNX graph → [`Plan`]: shapes inferred per row from the model's input,
//! BatchNorms folded (into the convolution before them, or as the epilogue's
//! affine map when they follow the activation), bias + residual + ReLU/ReLU6
//! fused into one epilogue per convolution, Gemm + bias + activation fused,
//! and layout-only nodes (Flatten, Reshape, Identity, an NHWC view before a
//! Gemm, an identity pool) turned into aliases or folded into weights.

use std::collections::{HashMap, HashSet};

use gati_kernels::Activation;

use super::graph::{Attr, Graph, OpNode, Tensor};
use super::plan::{Op, Plan, Value, ValueId, WeightId, Window};
use super::GpuError;

/// Lowering switches (tests lower without fusion to check that fusing changes nothing).
#[derive(Debug, Clone, Copy)]
pub struct LowerOptions {
    pub fuse: bool,
}

impl Default for LowerOptions {
    fn default() -> Self {
        Self { fuse: true }
    }
}

/// What an ONNX tensor is in the plan: a value, possibly seen through an
/// NHWC flattening (`nhwc = [c, h, w]`: the tensor is the NCHW value's
/// `[h, w, c]` order, flattened).
#[derive(Debug, Clone)]
struct View {
    id: ValueId,
    dims: Vec<usize>,
    nhwc: Option<[usize; 3]>,
}

struct Lowerer<'g> {
    g: &'g Graph,
    plan: Plan,
    env: HashMap<String, View>,
    consts: HashMap<String, Tensor>,
    consumers: HashMap<String, Vec<usize>>,
    pinned: HashSet<String>,
    done: HashSet<usize>,
    opts: LowerOptions,
}

/// Lowers `g` for rows of `row_shape`; `keep` names tensors that must be
/// materialised (the cuts), so no fusion runs through them.
pub fn lower(g: &Graph, row_shape: &[usize], keep: &[String], opts: LowerOptions) -> Result<Plan, GpuError> {
    let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
            consumers.entry(inp.clone()).or_default().push(i);
        }
    }
    let pinned = keep.iter().chain(&g.outputs).cloned().collect();
    let mut l = Lowerer {
        g,
        plan: Plan::default(),
        env: HashMap::new(),
        consts: HashMap::new(),
        consumers,
        pinned,
        done: HashSet::new(),
        opts,
    };
    let input = l.value(&g.input, row_shape.to_vec());
    l.plan.input = input;
    for i in 0..g.nodes.len() {
        if !l.done.contains(&i) {
            l.node(i)?;
        }
    }
    let [out] = g.outputs.as_slice() else {
        return Err(GpuError::Graph(format!(
            "the GPU executor serves one-output models, this one has {}",
            g.outputs.len()
        )));
    };
    let view = l.view(out, "the graph output")?;
    if view.nhwc.is_some() {
        return Err(unsupported("graph output", "an NHWC-ordered output"));
    }
    l.plan.output = view.id;
    for (name, v) in &l.env {
        if v.nhwc.is_none() {
            l.plan.names.insert(name.clone(), v.id);
        }
    }
    Ok(l.plan)
}

fn unsupported(node: &str, what: &str) -> GpuError {
    GpuError::Unsupported { node: node.to_string(), what: what.to_string() }
}

fn act_of(n: &OpNode, l: &Lowerer<'_>) -> Option<Activation> {
    match n.op.as_str() {
        "Relu" => Some(Activation::Relu),
        "Clip" => {
            // Opset ≥ 11: min/max are inputs; before: attributes.
            let bound = |idx: usize, attr: &str, default: f32| -> Option<f32> {
                match n.inputs.get(idx).filter(|s| !s.is_empty()) {
                    Some(name) => l.constant(name)?.floats()?.first().copied(),
                    None => Some(n.float(attr, default)),
                }
            };
            let (lo, hi) = (bound(1, "min", f32::MIN)?, bound(2, "max", f32::MAX)?);
            match (lo, hi) {
                (0.0, 6.0) => Some(Activation::Relu6),
                (0.0, h) if h >= f32::MAX => Some(Activation::Relu),
                _ => None,
            }
        }
        _ => None,
    }
}

impl<'g> Lowerer<'g> {
    fn value(&mut self, name: &str, dims: Vec<usize>) -> ValueId {
        let id = self.plan.values.len();
        self.plan.values.push(Value { name: name.to_string(), dims: dims.clone() });
        self.env.insert(name.to_string(), View { id, dims, nhwc: None });
        id
    }

    fn weight(&mut self, data: Vec<f32>) -> WeightId {
        self.plan.weights.push(data);
        self.plan.weights.len() - 1
    }

    fn constant(&self, name: &str) -> Option<&Tensor> {
        self.g.weights.get(name).or_else(|| self.consts.get(name))
    }

    fn floats(&self, name: &str, node: &str) -> Result<(Vec<usize>, Vec<f32>), GpuError> {
        let t = self.constant(name).ok_or_else(|| unsupported(node, &format!("`{name}` is not a constant")))?;
        let v = t.floats().ok_or_else(|| unsupported(node, &format!("`{name}` is not float")))?;
        Ok((t.dims.clone(), v.to_vec()))
    }

    fn view(&self, name: &str, node: &str) -> Result<View, GpuError> {
        self.env.get(name).cloned().ok_or_else(|| unsupported(node, &format!("input `{name}` is not computed")))
    }

    fn plain(&self, name: &str, node: &str) -> Result<View, GpuError> {
        let v = self.view(name, node)?;
        if v.nhwc.is_some() {
            return Err(unsupported(node, "an NHWC-ordered tensor feeding anything but Flatten/Gemm"));
        }
        Ok(v)
    }

    /// The one node reading `t`, if fusing may continue through `t`.
    fn sole_consumer(&self, t: &str) -> Option<usize> {
        if !self.opts.fuse || self.pinned.contains(t) {
            return None;
        }
        match self.consumers.get(t).map(Vec::as_slice) {
            Some([j]) if !self.done.contains(j) => Some(*j),
            _ => None,
        }
    }

    fn alias(&mut self, name: &str, v: View) {
        self.env.insert(name.to_string(), v);
    }

    fn node(&mut self, i: usize) -> Result<(), GpuError> {
        let g = self.g;
        let n = &g.nodes[i];
        let name = if n.name.is_empty() { n.op.as_str() } else { n.name.as_str() };
        let out = n.outputs.first().cloned().unwrap_or_default();
        match n.op.as_str() {
            "Constant" => {
                let Some(Attr::Tensor(t)) = n.attrs.get("value") else {
                    return Err(unsupported(name, "a Constant without a tensor value"));
                };
                self.consts.insert(out, t.clone());
            }
            "Identity" | "Dropout" => {
                let v = self.view(&n.inputs[0], name)?;
                self.alias(&out, v);
            }
            "Flatten" => {
                let v = self.view(&n.inputs[0], name)?;
                if n.int("axis", 1) != 1 {
                    return Err(unsupported(name, "Flatten with axis != 1"));
                }
                let len = v.dims.iter().product();
                self.alias(&out, View { dims: vec![len], ..v });
            }
            "Reshape" => {
                let v = self.view(&n.inputs[0], name)?;
                let shape = self
                    .constant(&n.inputs[1])
                    .map(Tensor::ints)
                    .ok_or_else(|| unsupported(name, "a computed shape"))?;
                let len: usize = v.dims.iter().product();
                let dims: Vec<usize> = match shape.as_slice() {
                    [_, rest @ ..] if rest.iter().all(|&d| d > 0) => rest.iter().map(|&d| d as usize).collect(),
                    [_, -1] => vec![len],
                    _ => return Err(unsupported(name, &format!("Reshape to {shape:?}"))),
                };
                if dims.iter().product::<usize>() != len || (v.nhwc.is_some() && dims.len() != 1) {
                    return Err(unsupported(name, &format!("Reshape of {:?} to {dims:?}", v.dims)));
                }
                self.alias(&out, View { dims, ..v });
            }
            "Transpose" => self.transpose(n, name, &out)?,
            "Conv" => self.conv(i, name)?,
            "Gemm" | "MatMul" => self.gemm(i, name)?,
            "BatchNormalization" => {
                let x = self.plain(&n.inputs[0], name)?;
                let (scale, shift) = self.bn(n, name, x.dims[0])?;
                let (s, t) = (self.weight(scale), self.weight(shift));
                self.standalone(&x, &out, None, Activation::None, Some((s, t)));
            }
            "Relu" | "Clip" => {
                let x = self.plain(&n.inputs[0], name)?;
                let act = act_of(n, self).ok_or_else(|| unsupported(name, "a Clip other than ReLU/ReLU6"))?;
                self.standalone(&x, &out, None, act, None);
            }
            "Add" => {
                let a = self.plain(&n.inputs[0], name)?;
                let b = self.plain(&n.inputs[1], name)?;
                if a.dims != b.dims {
                    return Err(unsupported(name, &format!("Add with broadcasting ({:?} + {:?})", a.dims, b.dims)));
                }
                self.standalone(&a, &out, Some(b.id), Activation::None, None);
            }
            "MaxPool" => self.max_pool(n, name, &out)?,
            "GlobalAveragePool" | "ReduceMean" => {
                let x = self.plain(&n.inputs[0], name)?;
                if x.dims.len() != 3 {
                    return Err(unsupported(name, "pooling of a tensor that is not C×H×W"));
                }
                if n.op == "ReduceMean" && n.ints("axes").is_none_or(|a| a != [2, 3] && a != [-2, -1]) {
                    return Err(unsupported(name, "ReduceMean over axes other than the spatial ones"));
                }
                let keep = n.op == "GlobalAveragePool" || n.int("keepdims", 1) == 1;
                let dims = if keep { vec![x.dims[0], 1, 1] } else { vec![x.dims[0]] };
                let y = self.value(&out, dims);
                self.plan.ops.push(Op::GlobalAvgPool {
                    x: x.id,
                    y,
                    channels: x.dims[0],
                    spatial: x.dims[1] * x.dims[2],
                });
            }
            other => return Err(unsupported(name, &format!("op {other}"))),
        }
        Ok(())
    }

    fn standalone(
        &mut self,
        x: &View,
        out: &str,
        residual: Option<ValueId>,
        act: Activation,
        post: Option<(WeightId, WeightId)>,
    ) {
        let (channels, spatial) = match x.dims.as_slice() {
            [c, rest @ ..] if !rest.is_empty() => (*c, rest.iter().product()),
            // A flat tensor: each value its own "channel" with a plane of 1.
            _ => (x.dims.iter().product(), 1),
        };
        let y = self.value(out, x.dims.clone());
        self.plan.ops.push(Op::Epilogue {
            x: x.id,
            y,
            channels,
            spatial,
            bias: None,
            residual,
            act,
            post_scale: post.map(|p| p.0),
            post_shift: post.map(|p| p.1),
        });
    }

    /// A BatchNormalization as a per-channel affine map `(scale, shift)`.
    fn bn(&self, n: &OpNode, name: &str, channels: usize) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        if n.inputs.len() < 5 {
            return Err(unsupported(name, "BatchNormalization without its four parameters"));
        }
        let eps = n.float("epsilon", 1e-5);
        let (_, gamma) = self.floats(&n.inputs[1], name)?;
        let (_, beta) = self.floats(&n.inputs[2], name)?;
        let (_, mean) = self.floats(&n.inputs[3], name)?;
        let (_, var) = self.floats(&n.inputs[4], name)?;
        if [&gamma, &beta, &mean, &var].iter().any(|v| v.len() != channels) {
            return Err(unsupported(name, "BatchNormalization parameters of the wrong length"));
        }
        let scale: Vec<f32> = gamma.iter().zip(&var).map(|(&g, &v)| g / (v + eps).sqrt()).collect();
        let shift = beta.iter().zip(&mean).zip(&scale).map(|((&b, &m), &s)| b - m * s).collect();
        Ok((scale, shift))
    }

    fn transpose(&mut self, n: &OpNode, name: &str, out: &str) -> Result<(), GpuError> {
        let x = self.plain(&n.inputs[0], name)?;
        match (n.ints("perm"), x.dims.as_slice()) {
            (Some([0, 3, 1, 2]), &[h, w, c]) => {
                let y = self.value(out, vec![c, h, w]);
                self.plan.ops.push(Op::NhwcToNchw { x: x.id, y, c, h, w });
            }
            (Some([0, 2, 3, 1]), &[c, h, w]) => {
                self.alias(out, View { id: x.id, dims: vec![h, w, c], nhwc: Some([c, h, w]) });
            }
            (perm, dims) => return Err(unsupported(name, &format!("Transpose {perm:?} of {dims:?}"))),
        }
        Ok(())
    }

    fn window(n: &OpNode, name: &str, kernel: [usize; 2], in_hw: [usize; 2]) -> Result<Window, GpuError> {
        let two = |key: &str, default: usize| -> Result<[usize; 2], GpuError> {
            match n.ints(key) {
                None | Some([]) => Ok([default; 2]),
                Some(&[a, b]) if a >= 0 && b >= 0 => Ok([a as usize, b as usize]),
                Some(v) => Err(unsupported(name, &format!("{key} = {v:?}"))),
            }
        };
        match n.attrs.get("auto_pad") {
            None => {}
            Some(Attr::Str(s)) if s == "NOTSET" || s == "VALID" => {}
            Some(a) => return Err(unsupported(name, &format!("auto_pad {a:?}"))),
        }
        if n.int("ceil_mode", 0) != 0 {
            return Err(unsupported(name, "ceil_mode = 1"));
        }
        let pads = match n.ints("pads") {
            None | Some([]) => [0; 4],
            // ONNX order: top, left, bottom, right.
            Some(&[t, l, b, r]) if [t, l, b, r].iter().all(|&p| p >= 0) => {
                [t as usize, l as usize, b as usize, r as usize]
            }
            Some(v) => return Err(unsupported(name, &format!("pads = {v:?}"))),
        };
        let (stride, dilation) = (two("strides", 1)?, two("dilations", 1)?);
        let mut out_hw = [0; 2];
        for a in 0..2 {
            let span = dilation[a] * (kernel[a] - 1) + 1;
            let padded = in_hw[a] + pads[a] + pads[a + 2];
            if padded < span || stride[a] == 0 {
                return Err(unsupported(name, "a window larger than its padded input"));
            }
            out_hw[a] = (padded - span) / stride[a] + 1;
        }
        Ok(Window { kernel, stride, pads, dilation, in_hw, out_hw })
    }

    fn max_pool(&mut self, n: &OpNode, name: &str, out: &str) -> Result<(), GpuError> {
        let x = self.plain(&n.inputs[0], name)?;
        let &[c, h, w] = x.dims.as_slice() else { return Err(unsupported(name, "MaxPool of a tensor not C×H×W")) };
        let kernel = match n.ints("kernel_shape") {
            Some(&[a, b]) if a > 0 && b > 0 => [a as usize, b as usize],
            k => return Err(unsupported(name, &format!("kernel_shape {k:?}"))),
        };
        let win = Self::window(n, name, kernel, [h, w])?;
        if win.kernel == [1, 1] && win.stride == [1, 1] && win.pads == [0; 4] {
            self.alias(out, x);
            return Ok(());
        }
        let y = self.value(out, vec![c, win.out_hw[0], win.out_hw[1]]);
        self.plan.ops.push(Op::MaxPool { x: x.id, y, channels: c, win });
        Ok(())
    }

    fn conv(&mut self, i: usize, name: &str) -> Result<(), GpuError> {
        let g = self.g;
        let n = &g.nodes[i];
        let x = self.plain(&n.inputs[0], name)?;
        let &[cin, h, w] = x.dims.as_slice() else { return Err(unsupported(name, "Conv of a tensor not C×H×W")) };
        let (wdims, mut weights) = self.floats(&n.inputs[1], name)?;
        let &[cout, cpg, kh, kw] = wdims.as_slice() else { return Err(unsupported(name, "a Conv that is not 2-D")) };
        let group = n.int("group", 1).max(1) as usize;
        if cpg * group != cin || cout % group != 0 {
            return Err(unsupported(name, &format!("group {group} with {cin} input and {cout} output channels")));
        }
        let mut win = Self::window(n, name, [kh, kw], [h, w])?;
        let mut xid = x.id;
        if win.pads[0] != win.pads[2] || win.pads[1] != win.pads[3] {
            // cuDNN pads symmetrically: make an asymmetric padding an explicit pad.
            let [t, l, b, r] = win.pads;
            let out_hw = [h + t + b, w + l + r];
            let padded = self.value(&format!("{}.gati_pad", n.outputs[0]), vec![cin, out_hw[0], out_hw[1]]);
            self.plan.ops.push(Op::Pad { x: x.id, y: padded, channels: cin, in_hw: [h, w], top_left: [t, l], out_hw });
            (xid, win.pads, win.in_hw) = (padded, [0; 4], out_hw);
        }
        let mut bias = match n.inputs.get(2).filter(|s| !s.is_empty()) {
            Some(b) => Some(self.floats(b, name)?.1),
            None => None,
        };
        // Fuse what follows the convolution into its epilogue.
        let mut t = n.outputs[0].clone();
        let (mut residual, mut act, mut post) = (None, Activation::None, None);
        while let Some(j) = self.sole_consumer(&t) {
            let m = &g.nodes[j];
            let fresh = act == Activation::None && post.is_none();
            match m.op.as_str() {
                "BatchNormalization" if fresh && residual.is_none() => {
                    let (s, sh) = self.bn(m, name, cout)?;
                    let per = weights.len() / cout;
                    for (c, &sc) in s.iter().enumerate() {
                        weights[c * per..(c + 1) * per].iter_mut().for_each(|v| *v *= sc);
                    }
                    let b = bias.get_or_insert_with(|| vec![0.0; cout]);
                    for c in 0..cout {
                        b[c] = b[c] * s[c] + sh[c];
                    }
                }
                "BatchNormalization" if post.is_none() => post = Some(self.bn(m, name, cout)?),
                "Add" if fresh && residual.is_none() => {
                    let other = if m.inputs[0] == t { &m.inputs[1] } else { &m.inputs[0] };
                    match self.env.get(other) {
                        Some(v) if v.nhwc.is_none() && v.dims == [cout, win.out_hw[0], win.out_hw[1]] => {
                            residual = Some(v.id)
                        }
                        _ => break,
                    }
                }
                "Relu" | "Clip" if fresh => match act_of(m, self) {
                    Some(a) => act = a,
                    None => break,
                },
                _ => break,
            }
            self.done.insert(j);
            t = m.outputs[0].clone();
        }
        let wid = self.weight(weights);
        let y = self.value(&t, vec![cout, win.out_hw[0], win.out_hw[1]]);
        self.plan.ops.push(Op::Conv { x: xid, y, w: wid, cin, cout, group, win });
        if bias.is_some() || residual.is_some() || act != Activation::None || post.is_some() {
            let bias = bias.map(|b| self.weight(b));
            let post = post.map(|(s, sh)| (self.weight(s), self.weight(sh)));
            self.plan.ops.push(Op::Epilogue {
                x: y,
                y,
                channels: cout,
                spatial: win.out_hw[0] * win.out_hw[1],
                bias,
                residual,
                act,
                post_scale: post.map(|p| p.0),
                post_shift: post.map(|p| p.1),
            });
        }
        Ok(())
    }

    fn gemm(&mut self, i: usize, name: &str) -> Result<(), GpuError> {
        let g = self.g;
        let n = &g.nodes[i];
        let x = self.view(&n.inputs[0], name)?;
        let k = x.dims.iter().product::<usize>();
        if x.dims.len() != 1 || n.int("transA", 0) != 0 {
            return Err(unsupported(name, &format!("{} of a {:?} input", n.op, x.dims)));
        }
        let (bdims, b) = self.floats(&n.inputs[1], name)?;
        let trans_b = n.op == "Gemm" && n.int("transB", 0) != 0;
        let alpha = if n.op == "Gemm" { n.float("alpha", 1.0) } else { 1.0 };
        let (rows, cols) = match bdims.as_slice() {
            &[r, c] => (r, c),
            _ => return Err(unsupported(name, "a weight that is not a matrix")),
        };
        let (kk, nn) = if trans_b { (cols, rows) } else { (rows, cols) };
        if kk != k {
            return Err(unsupported(name, &format!("weight {bdims:?} for {k} inputs")));
        }
        // W as [k][n], alpha applied, rows reordered for an NHWC-flattened input.
        let mut wk = vec![0f32; k * nn];
        for r in 0..k {
            // Row r of the plan's (NCHW) input is row `src` of the model's weight.
            let src = match x.nhwc {
                None => r,
                Some([c, h, w]) => {
                    let (ci, rest) = (r / (h * w), r % (h * w));
                    rest * c + ci
                }
            };
            for col in 0..nn {
                let v = if trans_b { b[col * k + src] } else { b[src * nn + col] };
                wk[r * nn + col] = alpha * v;
            }
        }
        let mut bias = match n.inputs.get(2).filter(|s| !s.is_empty()) {
            Some(c) => {
                let (_, c) = self.floats(c, name)?;
                let beta = n.float("beta", 1.0);
                if c.len() != nn {
                    return Err(unsupported(name, "a Gemm bias that is not one value per output"));
                }
                Some(c.iter().map(|v| v * beta).collect::<Vec<f32>>())
            }
            None => None,
        };
        let mut t = n.outputs[0].clone();
        let mut act = Activation::None;
        while let Some(j) = self.sole_consumer(&t) {
            let m = &g.nodes[j];
            match m.op.as_str() {
                "Relu" | "Clip" if act == Activation::None => match act_of(m, self) {
                    Some(a) => act = a,
                    None => break,
                },
                "Add" if act == Activation::None && bias.is_none() => {
                    let other = if m.inputs[0] == t { &m.inputs[1] } else { &m.inputs[0] };
                    match self.constant(other).and_then(Tensor::floats) {
                        Some(c) if c.len() == nn => bias = Some(c.to_vec()),
                        _ => break,
                    }
                }
                _ => break,
            }
            self.done.insert(j);
            t = m.outputs[0].clone();
        }
        let w = self.weight(wk);
        let bias = bias.map(|b| self.weight(b));
        let y = self.value(&t, vec![nn]);
        self.plan.ops.push(Op::Gemm { x: x.id, y, w, k, n: nn, bias, act });
        Ok(())
    }
}
