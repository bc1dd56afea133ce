//! A [`Plan`] on a CUDA device: weights uploaded once, one device buffer per
//! value (sized for the largest batch), convolutions and pooling through
//! cuDNN, GEMMs through cuBLAS, the rest through gati's kernels, all on the
//! device's one stream. Written against cudarc 0.19 and compiled in every
//! build; it runs only where a GPU is (`tests/hil/gpu.sh`), and nothing here is
//! reached without one: [`DeviceExec::new`] checks the cuBLAS/cuDNN libraries
//! before creating their handles (cudarc panics on a missing library).

use std::sync::Arc;

use gati_kernels::cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use gati_kernels::cudarc::cudnn::{self, sys as dnn_sys, ConvForward, Cudnn, PoolingForward};
use gati_kernels::device::{Buf, DevEpilogue, Gpu};
use gati_kernels::reference::EpilogueShape;
use gati_kernels::KernelError;

use super::plan::{Op, Plan, ValueId, Window};
use super::GpuError;

/// A lowered model resident on one device.
pub struct DeviceExec {
    gpu: Arc<Gpu>,
    plan: Plan,
    max_rows: usize,
    weights: Vec<Buf>,
    values: Vec<Option<Buf>>,
    blas: CudaBlas,
    dnn: Arc<Cudnn>,
    /// cuDNN's workspace, grown to the largest a convolution asked for.
    workspace: std::cell::RefCell<Option<gati_kernels::cudarc::driver::CudaSlice<u8>>>,
}

// SAFETY: a DeviceExec is owned and used by one thread at a time (its
// model's batcher); cuDNN and cuBLAS handles may move between threads as long
// as calls on them are not concurrent, which `&mut self` on every call ensures.
unsafe impl Send for DeviceExec {}

fn blas_err(what: &'static str) -> impl FnOnce(gati_kernels::cudarc::cublas::result::CublasError) -> GpuError {
    move |e| GpuError::Library { library: "cuBLAS", what, detail: format!("{e:?}") }
}

fn dnn_err(what: &'static str) -> impl FnOnce(cudnn::CudnnError) -> GpuError {
    move |e| GpuError::Library { library: "cuDNN", what, detail: format!("{e:?}") }
}

fn int(v: usize) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Graph(format!("{v} does not fit a cuDNN/cuBLAS int")))
}

impl DeviceExec {
    /// Uploads `plan` to `gpu` for batches of up to `max_rows`.
    pub fn new(gpu: Arc<Gpu>, plan: Plan, max_rows: usize) -> Result<Self, GpuError> {
        // SAFETY: opening each library runs its initialisers only.
        let (have_blas, have_dnn) =
            unsafe { (gati_kernels::cudarc::cublas::sys::is_culib_present(), cudnn::sys::is_culib_present()) };
        if !have_blas || !have_dnn {
            return Err(KernelError::CudaUnavailable(format!(
                "the GPU executor needs cuBLAS (libcublas.so.13: {have_blas}) and cuDNN (libcudnn.so.9: {have_dnn})"
            ))
            .into());
        }
        for op in &plan.ops {
            if let Op::Conv { win, .. } | Op::MaxPool { win, .. } = op {
                if win.pads[0] != win.pads[2] || win.pads[1] != win.pads[3] {
                    return Err(GpuError::Unsupported {
                        node: op.kind().into(),
                        what: format!("asymmetric pads {:?}", win.pads),
                    });
                }
            }
        }
        let weights = plan.weights.iter().map(|w| gpu.upload(w)).collect::<Result<Vec<_>, _>>()?;
        let mut values = Vec::with_capacity(plan.values.len());
        for v in &plan.values {
            values.push(Some(gpu.poisoned(max_rows * v.row_len())?));
        }
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(blas_err("creating a handle"))?;
        let dnn = Cudnn::new(gpu.stream().clone()).map_err(dnn_err("creating a handle"))?;
        Ok(Self { gpu, plan, max_rows, weights, values, blas, dnn, workspace: Default::default() })
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Copies `rows` rows of input to the device (the plan's input value).
    pub fn load_input(&mut self, rows: usize, input: &[f32]) -> Result<(), GpuError> {
        self.check_rows(rows)?;
        let want = rows * self.plan.values[self.plan.input].row_len();
        if input.len() != want {
            return Err(GpuError::Graph(format!("{} input values for {rows} rows of {want}", input.len())));
        }
        let buf = self.values[self.plan.input].as_mut().ok_or_else(|| GpuError::Graph("input buffer in use".into()))?;
        let mut view = buf.slice_mut(0..want);
        self.gpu.stream().memcpy_htod(input, &mut view).map_err(KernelError::driver("copying the input"))?;
        Ok(())
    }

    /// Runs ops `range` of the plan on the first `rows` rows of each value.
    pub fn run_ops(&mut self, rows: usize, range: std::ops::Range<usize>) -> Result<(), GpuError> {
        self.check_rows(rows)?;
        for i in range {
            let op = self.plan.ops[i].clone();
            self.op(&op, rows)?;
        }
        Ok(())
    }

    /// Copies the first `rows` rows of a value back (waits for the stream).
    pub fn read(&self, id: ValueId, rows: usize) -> Result<Vec<f32>, GpuError> {
        let len = rows * self.plan.values[id].row_len();
        let buf = self.values[id].as_ref().ok_or_else(|| GpuError::Graph("value buffer in use".into()))?;
        let mut host = vec![0f32; len];
        self.gpu
            .stream()
            .memcpy_dtoh(&buf.slice(0..len), &mut host)
            .map_err(KernelError::driver("copying a value back"))?;
        Ok(host)
    }

    /// The whole plan: input in, output back.
    pub fn run(&mut self, rows: usize, input: &[f32]) -> Result<Vec<f32>, GpuError> {
        self.load_input(rows, input)?;
        self.run_ops(rows, 0..self.plan.ops.len())?;
        self.read(self.plan.output, rows)
    }

    /// A value's device buffer (for the stage code: pooling, compaction).
    pub fn value(&self, id: ValueId) -> Result<&Buf, GpuError> {
        self.val(id)
    }

    /// Overwrites the first `rows` rows of value `id` with `src`'s.
    pub fn write_rows(&mut self, id: ValueId, src: &Buf, rows: usize) -> Result<(), GpuError> {
        let len = rows * self.plan.values[id].row_len();
        if src.len() < len {
            return Err(GpuError::Graph(format!("{} values to copy {rows} rows of {len}", src.len())));
        }
        let stream = self.gpu.stream().clone();
        let buf = self.values[id].as_mut().ok_or_else(|| GpuError::Graph("value buffer in use".into()))?;
        let mut view = buf.slice_mut(0..len);
        stream.memcpy_dtod(&src.slice(0..len), &mut view).map_err(KernelError::driver("copying compacted rows"))?;
        Ok(())
    }

    fn check_rows(&self, rows: usize) -> Result<(), GpuError> {
        if rows == 0 || rows > self.max_rows {
            return Err(GpuError::Graph(format!("batch of {rows} rows; this executor holds 1..={}", self.max_rows)));
        }
        Ok(())
    }

    fn take(&mut self, id: ValueId) -> Result<Buf, GpuError> {
        self.values[id].take().ok_or_else(|| GpuError::Graph(format!("value {id} read and written by one op")))
    }

    fn val(&self, id: ValueId) -> Result<&Buf, GpuError> {
        self.values[id].as_ref().ok_or_else(|| GpuError::Graph(format!("value {id} is being written")))
    }

    fn op(&mut self, op: &Op, rows: usize) -> Result<(), GpuError> {
        let y = op.output();
        let mut out = self.take(y)?;
        let res = self.op_into(op, rows, &mut out);
        self.values[y] = Some(out);
        res
    }

    fn op_into(&self, op: &Op, rows: usize, out: &mut Buf) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        match *op {
            Op::NhwcToNchw { x, c, h, w, .. } => gpu.nhwc_to_nchw(self.val(x)?, out, [rows, c, h, w])?,
            Op::Conv { x, w, cin, cout, group, win, .. } => {
                self.conv(self.val(x)?, &self.weights[w], rows, [cin, cout, group], &win, out)?
            }
            Op::Epilogue { x, y, channels, spatial, bias, residual, act, post_scale, post_shift } => {
                let p = DevEpilogue {
                    bias: bias.map(|b| &self.weights[b]),
                    residual: residual.map(|r| self.val(r)).transpose()?,
                    act,
                    post_scale: post_scale.map(|b| &self.weights[b]),
                    post_shift: post_shift.map(|b| &self.weights[b]),
                };
                let shape = EpilogueShape { rows, channels, spatial };
                if x == y {
                    gpu.block_epilogue_in_place(out, shape, &p, None)?;
                } else {
                    gpu.block_epilogue(self.val(x)?, shape, &p, out, None)?;
                }
            }
            Op::Pad { x, channels, in_hw, top_left, out_hw, .. } => {
                gpu.pad2d(self.val(x)?, out, rows * channels, in_hw, top_left, out_hw)?
            }
            Op::MaxPool { x, channels, win, .. } => self.max_pool(self.val(x)?, rows, channels, &win, out)?,
            Op::GlobalAvgPool { x, channels, spatial, .. } => {
                // The epilogue kernel with nothing to add: its pooled output is the mean.
                let shape = EpilogueShape { rows, channels, spatial };
                let mut scratch = gpu.poisoned(shape.len())?;
                gpu.block_epilogue(self.val(x)?, shape, &DevEpilogue::default(), &mut scratch, Some((out, channels)))?;
            }
            Op::Gemm { x, w, k, n, bias, act, .. } => {
                let cfg = GemmConfig {
                    transa: blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    m: int(n)?,
                    n: int(rows)?,
                    k: int(k)?,
                    alpha: 1.0f32,
                    lda: int(n)?,
                    ldb: int(k)?,
                    beta: 0.0f32,
                    ldc: int(n)?,
                };
                // Row-major Y = X·W is column-major Yᵀ = Wᵀ·Xᵀ: A = W (n × k, ld n), B = X (k × rows, ld k).
                // SAFETY: W holds k·n values, X rows·k, Y rows·n (buffers sized for
                // max_rows ≥ rows); all three live on this handle's stream.
                unsafe { self.blas.gemm(cfg, &self.weights[w], self.val(x)?, out) }.map_err(blas_err("sgemm"))?;
                if bias.is_some() || act != gati_kernels::Activation::None {
                    gpu.row_bias_act(out, bias.map(|b| &self.weights[b]), rows, n, act)?;
                }
            }
        }
        Ok(())
    }

    fn conv(
        &self,
        x: &Buf,
        w: &Buf,
        rows: usize,
        [cin, cout, group]: [usize; 3],
        win: &Window,
        y: &mut Buf,
    ) -> Result<(), GpuError> {
        let nchw = dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let xd = self
            .dnn
            .create_4d_tensor::<f32>(nchw, [int(rows)?, int(cin)?, int(win.in_hw[0])?, int(win.in_hw[1])?])
            .map_err(dnn_err("an input descriptor"))?;
        let yd = self
            .dnn
            .create_4d_tensor::<f32>(nchw, [int(rows)?, int(cout)?, int(win.out_hw[0])?, int(win.out_hw[1])?])
            .map_err(dnn_err("an output descriptor"))?;
        let wd = self
            .dnn
            .create_4d_filter::<f32>(nchw, [int(cout)?, int(cin / group)?, int(win.kernel[0])?, int(win.kernel[1])?])
            .map_err(dnn_err("a filter descriptor"))?;
        let mut conv = self
            .dnn
            .create_conv2d::<f32>(
                [int(win.pads[0])?, int(win.pads[1])?],
                [int(win.stride[0])?, int(win.stride[1])?],
                [int(win.dilation[0])?, int(win.dilation[1])?],
                dnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(dnn_err("a convolution descriptor"))?;
        conv.set_group_count(int(group)?).map_err(dnn_err("the group count"))?;
        // fp32 throughout: the check against the CPU reference is at 1e-4.
        conv.set_math_type(dnn_sys::cudnnMathType_t::CUDNN_FMA_MATH).map_err(dnn_err("the math type"))?;
        let fwd = ConvForward { conv: &conv, x: &xd, w: &wd, y: &yd };
        let algo = fwd.pick_algorithm().map_err(dnn_err("picking an algorithm"))?;
        let bytes = fwd.get_workspace_size(algo).map_err(dnn_err("the workspace size"))?;
        let mut ws = self.workspace.borrow_mut();
        if ws.as_ref().is_none_or(|b| b.len() < bytes.max(1)) {
            *ws = Some(self.gpu.stream().alloc_zeros::<u8>(bytes.max(1)).map_err(KernelError::driver("a workspace"))?);
        }
        let ws = ws.as_mut().ok_or_else(|| GpuError::Graph("no cuDNN workspace".into()))?;
        // SAFETY: the descriptors describe exactly these buffers (NCHW f32, sized
        // for max_rows ≥ rows), all on the handle's stream; the workspace holds
        // at least the bytes cuDNN asked for this algorithm.
        unsafe { fwd.launch(algo, Some(ws), (1.0f32, 0.0f32), x, w, y) }.map_err(dnn_err("convolution forward"))?;
        Ok(())
    }

    fn max_pool(&self, x: &Buf, rows: usize, channels: usize, win: &Window, y: &mut Buf) -> Result<(), GpuError> {
        let nchw = dnn_sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let xd = self
            .dnn
            .create_4d_tensor::<f32>(nchw, [int(rows)?, int(channels)?, int(win.in_hw[0])?, int(win.in_hw[1])?])
            .map_err(dnn_err("an input descriptor"))?;
        let yd = self
            .dnn
            .create_4d_tensor::<f32>(nchw, [int(rows)?, int(channels)?, int(win.out_hw[0])?, int(win.out_hw[1])?])
            .map_err(dnn_err("an output descriptor"))?;
        let pool = self
            .dnn
            .create_poolingnd::<f32>(
                &[int(win.kernel[0])?, int(win.kernel[1])?],
                &[int(win.pads[0])?, int(win.pads[1])?],
                &[int(win.stride[0])?, int(win.stride[1])?],
                dnn_sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX,
                dnn_sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
            )
            .map_err(dnn_err("a pooling descriptor"))?;
        let fwd = PoolingForward { pooling: &pool, x: &xd, y: &yd };
        // SAFETY: as for the convolution: descriptors match the NCHW f32 buffers.
        unsafe { fwd.launch((1.0f32, 0.0f32), x, y) }.map_err(dnn_err("pooling forward"))?;
        Ok(())
    }
}
