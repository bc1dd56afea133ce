//! A CUDA device for gati: its context and one stream, the modules of
//! [`crate::source`] compiled (NVRTC) and loaded on first use, and the launch
//! code of each kernel. Every check that can fail without a GPU comes before
//! the first `cudarc` driver call, so a machine without a driver gets
//! [`KernelError::CudaUnavailable`], never a panic.
//!
//! One [`Gpu`] per worker: its stream orders every launch, so event tracking
//! is off and device pointers are passed as plain values.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::reference::{compact::MAX_COMPACT_ROWS, Activation, EpilogueShape};
use crate::{libs, nvrtc, Kernel, KernelError, Module, Param};

/// A device buffer of f32 values.
pub type Buf = CudaSlice<f32>;

/// One kernel argument, by value (device pointers as addresses; 0 = null).
#[derive(Debug, Clone, Copy)]
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    fn param(&self) -> Param {
        match self {
            Arg::Ptr(_) => Param::Ptr,
            Arg::I32(_) => Param::I32,
            Arg::I64(_) => Param::I64,
            Arg::F32(_) => Param::F32,
        }
    }
}

/// Whether the CUDA driver library (`libcuda.so.1`) can be opened.
pub fn driver_present() -> bool {
    libs::preload_env();
    // SAFETY: opening the library runs its initialisers only.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Devices the driver sees.
pub fn device_count() -> Result<usize, KernelError> {
    if !driver_present() {
        return Err(no_driver());
    }
    let n = CudaContext::device_count().map_err(KernelError::driver("cuDeviceGetCount"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn no_driver() -> KernelError {
    KernelError::CudaUnavailable(format!(
        "no CUDA driver (libcuda.so.1) on this machine (searched the loader's path and {})",
        libs::LIBRARY_PATH_VAR
    ))
}

/// Device-side epilogue arguments (see [`crate::reference::EpilogueParams`]).
#[derive(Default)]
pub struct DevEpilogue<'a> {
    pub bias: Option<&'a Buf>,
    pub residual: Option<&'a Buf>,
    pub act: Activation,
    pub post_scale: Option<&'a Buf>,
    pub post_shift: Option<&'a Buf>,
}

/// Device-side cache head (see [`crate::reference::CacheHead`]).
pub struct DevCacheHead {
    pub dim: usize,
    pub classes: usize,
    pub hidden: usize,
    pub mean: Option<Buf>,
    pub inv_std: Option<Buf>,
    pub w1: Option<Buf>,
    pub b1: Option<Buf>,
    pub weight: Buf,
    pub bias: Buf,
    pub centroids: Option<Buf>,
    pub radius2: Option<Buf>,
}

/// Device-side outputs of a cache lookup, one value per row.
pub struct DevLookup {
    pub hit: CudaSlice<i32>,
    pub class: CudaSlice<i32>,
    pub conf: Buf,
    /// Per-row probabilities (`rows × classes`), when wanted.
    pub probs: Option<Buf>,
}

/// One device: context, stream, lazily loaded modules.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    modules: [OnceLock<Arc<CudaModule>>; Module::ALL.len()],
}

impl Gpu {
    /// Opens device `ordinal` (checks the driver library and the device first).
    pub fn open(ordinal: usize) -> Result<Self, KernelError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(KernelError::CudaUnavailable(format!("no CUDA device {ordinal}: the driver sees {count}")));
        }
        let ctx = CudaContext::new(ordinal).map_err(KernelError::driver("creating the context"))?;
        // SAFETY: called before this context allocated anything or made a
        // stream; every launch of this Gpu goes through its one stream, which
        // orders them, so the events cudarc would track are not needed.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(KernelError::driver("reading the compute capability"))?;
        let stream = ctx.new_stream().map_err(KernelError::driver("creating a stream"))?;
        Ok(Self { ctx, stream, arch: format!("sm_{major}{minor}"), modules: Default::default() })
    }

    /// The device's name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// The stream every launch of this device goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// `sm_XY` of the device.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The kernel's function, compiling and loading its module on first use.
    pub fn function(&self, k: Kernel) -> Result<CudaFunction, KernelError> {
        let m = k.module();
        let slot = &self.modules[m.index()];
        let module = match slot.get() {
            Some(module) => module.clone(),
            None => {
                let ptx = nvrtc::compile(m, &self.arch)?;
                let module = self.ctx.load_module(ptx.into()).map_err(KernelError::driver("loading a module"))?;
                slot.get_or_init(|| module).clone()
            }
        };
        module.load_function(k.name()).map_err(KernelError::driver("looking up a kernel"))
    }

    /// Copies host values to a new device buffer.
    pub fn upload(&self, host: &[f32]) -> Result<Buf, KernelError> {
        self.stream.clone_htod(host).map_err(KernelError::driver("copying to the device"))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>, KernelError> {
        self.stream.clone_dtoh(dev).map_err(KernelError::driver("copying from the device"))
    }

    /// A new buffer of `len` NaNs: outputs start poisoned, so a value a kernel failed to write shows.
    pub fn poisoned(&self, len: usize) -> Result<Buf, KernelError> {
        self.upload(&vec![f32::NAN; len])
    }

    fn ptr<T>(&self, b: &CudaSlice<T>) -> u64 {
        b.device_ptr(&self.stream).0
    }

    fn opt_ptr<T>(&self, b: Option<&CudaSlice<T>>) -> u64 {
        b.map_or(0, |b| self.ptr(b))
    }

    /// The fused block epilogue (`cu/epilogue.cu`); `y` may be `x`'s buffer
    /// only through [`Self::block_epilogue_in_place`].
    pub fn block_epilogue(
        &self,
        x: &Buf,
        shape: EpilogueShape,
        p: &DevEpilogue<'_>,
        y: &mut Buf,
        pooled: Option<(&mut Buf, usize)>,
    ) -> Result<(), KernelError> {
        let (xp, yp) = (self.ptr(x), self.ptr(y));
        self.epilogue_raw(xp, shape, p, yp, pooled.map(|(b, s)| (self.ptr(b), s)), x.len().min(y.len()))
    }

    /// The epilogue over `x` in place.
    pub fn block_epilogue_in_place(
        &self,
        x: &mut Buf,
        shape: EpilogueShape,
        p: &DevEpilogue<'_>,
        pooled: Option<(&mut Buf, usize)>,
    ) -> Result<(), KernelError> {
        let xp = self.ptr(x);
        self.epilogue_raw(xp, shape, p, xp, pooled.map(|(b, s)| (self.ptr(b), s)), x.len())
    }

    fn epilogue_raw(
        &self,
        x: u64,
        shape: EpilogueShape,
        p: &DevEpilogue<'_>,
        y: u64,
        pooled: Option<(u64, usize)>,
        len: usize,
    ) -> Result<(), KernelError> {
        if len < shape.len() {
            return Err(KernelError::Shape(format!("epilogue buffers of {len} for a {shape:?} tensor")));
        }
        for (what, b, want) in [
            ("bias", p.bias, shape.channels),
            ("post_scale", p.post_scale, shape.channels),
            ("post_shift", p.post_shift, shape.channels),
            ("residual", p.residual, shape.len()),
        ] {
            if let Some(b) = b {
                if b.len() < want {
                    return Err(KernelError::Shape(format!("{what} has {} values, needs {want}", b.len())));
                }
            }
        }
        let planes = shape.rows * shape.channels;
        if planes == 0 {
            return Ok(());
        }
        let threads = shape.spatial.next_power_of_two().clamp(32, 256) as u32;
        let (bias, res, scale, shift) =
            (self.opt_ptr(p.bias), self.opt_ptr(p.residual), self.opt_ptr(p.post_scale), self.opt_ptr(p.post_shift));
        let (pooled, stride) = pooled.map_or((0, 0), |(b, s)| (b, s));
        let ints =
            [i32_of(shape.rows)?, i32_of(shape.channels)?, i32_of(shape.spatial)?, p.act as i32, i32_of(stride)?];
        let cfg = LaunchConfig {
            grid_dim: (u32_of(planes)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: threads * 4,
        };
        let mut args: Vec<Arg> = [x, bias, res, scale, shift, y, pooled].map(Arg::Ptr).to_vec();
        args.extend(ints.map(Arg::I32));
        // SAFETY: every non-null pointer is a live allocation of this context
        // holding at least the values the shape addresses (checked above for x,
        // y and the per-channel/residual buffers; pooled by its caller's stride).
        unsafe { self.launch(Kernel::BlockEpilogue, cfg, &args) }
    }

    /// The fused cache lookup over `rows` feature rows of `stride` values.
    pub fn cache_lookup(
        &self,
        features: &Buf,
        stride: usize,
        rows: usize,
        head: &DevCacheHead,
        threshold: f32,
        out: &mut DevLookup,
    ) -> Result<(), KernelError> {
        if rows == 0 {
            return Ok(());
        }
        if stride < head.dim || features.len() < (rows - 1) * stride + head.dim {
            return Err(KernelError::Shape(format!(
                "{} features do not hold {rows} rows of stride {stride}",
                features.len()
            )));
        }
        if out.hit.len() < rows || out.class.len() < rows || out.conf.len() < rows {
            return Err(KernelError::Shape(format!("lookup outputs shorter than {rows} rows")));
        }
        let width = if head.hidden > 0 { head.hidden } else { head.dim };
        if head.weight.len() != head.classes * width || head.bias.len() != head.classes {
            return Err(KernelError::Shape("cache head weight/bias do not match classes × width".into()));
        }
        if let Some(p) = &out.probs {
            if p.len() < rows * head.classes {
                return Err(KernelError::Shape("probabilities buffer too small".into()));
            }
        }
        let threads: u32 = 128;
        let smem = 4 * (head.dim + head.hidden + head.classes + threads as usize);
        let ptrs = [
            self.ptr(features),
            self.opt_ptr(head.mean.as_ref()),
            self.opt_ptr(head.inv_std.as_ref()),
            self.opt_ptr(head.w1.as_ref()),
            self.opt_ptr(head.b1.as_ref()),
            self.ptr(&head.weight),
            self.ptr(&head.bias),
            self.opt_ptr(head.centroids.as_ref()),
            self.opt_ptr(head.radius2.as_ref()),
            self.ptr(&out.hit),
            self.ptr(&out.class),
            self.ptr(&out.conf),
            self.opt_ptr(out.probs.as_ref()),
        ];
        let (stride, hidden, rows_i, dim, classes) =
            (i32_of(stride)?, i32_of(head.hidden)?, i32_of(rows)?, i32_of(head.dim)?, i32_of(head.classes)?);
        let cfg = LaunchConfig {
            grid_dim: (u32_of(rows)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: u32_of(smem)?,
        };
        let p = ptrs.map(Arg::Ptr);
        let args = [
            p[0],
            Arg::I32(stride),
            p[1],
            p[2],
            p[3],
            p[4],
            Arg::I32(hidden),
            p[5],
            p[6],
            p[7],
            p[8],
            Arg::I32(rows_i),
            Arg::I32(dim),
            Arg::I32(classes),
            Arg::F32(threshold),
            p[9],
            p[10],
            p[11],
            p[12],
        ];
        // SAFETY: buffer sizes were checked against rows, dim, hidden and
        // classes above (optional buffers are null or sized by the head's builder).
        unsafe { self.launch(Kernel::CacheLookup, cfg, &args) }
    }

    /// Order-preserving compaction: `src_of_dst[j]` = index of the j-th miss,
    /// `count[0]` = misses, both on the device.
    pub fn compact_index(
        &self,
        hit: &CudaSlice<i32>,
        rows: usize,
        src_of_dst: &mut CudaSlice<i32>,
        count: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        if rows == 0 || rows > MAX_COMPACT_ROWS || hit.len() < rows || src_of_dst.len() < rows || count.is_empty() {
            return Err(KernelError::Shape(format!("compaction of {rows} rows (1..={MAX_COMPACT_ROWS})")));
        }
        let threads = rows.next_power_of_two().max(32) as u32;
        let (h, s, c, n) = (self.ptr(hit), self.ptr(src_of_dst), self.ptr(count), i32_of(rows)?);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: threads * 4 };
        // SAFETY: hit and src_of_dst hold at least `rows` values, count one; threads ≥ rows.
        unsafe { self.launch(Kernel::CompactIndex, cfg, &[Arg::Ptr(h), Arg::I32(n), Arg::Ptr(s), Arg::Ptr(c)]) }
    }

    /// `dst[j] = src[src_of_dst[j]]` for `j < count[0]`, rows of `row_len`;
    /// `max_rows` bounds `count[0]` (the batch the index was made from).
    pub fn gather_rows(
        &self,
        src: &Buf,
        dst: &mut Buf,
        src_of_dst: &CudaSlice<i32>,
        count: &CudaSlice<i32>,
        row_len: usize,
        max_rows: usize,
    ) -> Result<(), KernelError> {
        if max_rows == 0 {
            return Ok(());
        }
        if src.len() < max_rows * row_len
            || dst.len() < max_rows * row_len
            || src_of_dst.len() < max_rows
            || count.is_empty()
        {
            return Err(KernelError::Shape(format!("gather of up to {max_rows} rows of {row_len}")));
        }
        let threads: u32 = 256;
        let blocks_x = row_len.div_ceil(threads as usize).clamp(1, 1024) as u32;
        let (s, d, i, c, len) = (self.ptr(src), self.ptr(dst), self.ptr(src_of_dst), self.ptr(count), row_len as i64);
        let cfg = LaunchConfig {
            grid_dim: (blocks_x, u32_of(max_rows.min(65_535))?, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [Arg::Ptr(s), Arg::Ptr(d), Arg::Ptr(i), Arg::Ptr(c), Arg::I64(len)];
        // SAFETY: src and dst hold max_rows rows, and count[0] ≤ max_rows (written
        // by gati_compact_index over the same batch), so every index read is in range.
        unsafe { self.launch(Kernel::GatherRows, cfg, &args) }
    }

    /// NHWC → NCHW into `y`.
    pub fn nhwc_to_nchw(&self, x: &Buf, y: &mut Buf, dims: [usize; 4]) -> Result<(), KernelError> {
        let [n, c, h, w] = dims;
        let total = n * c * h * w;
        if x.len() < total || y.len() < total {
            return Err(KernelError::Shape(format!(
                "transpose of {dims:?} with buffers of {} and {}",
                x.len(),
                y.len()
            )));
        }
        if total == 0 {
            return Ok(());
        }
        let (xp, yp) = (self.ptr(x), self.ptr(y));
        let ints = [i32_of(n)?, i32_of(c)?, i32_of(h)?, i32_of(w)?];
        let cfg = flat(total);
        let mut args = vec![Arg::Ptr(xp), Arg::Ptr(yp)];
        args.extend(ints.map(Arg::I32));
        // SAFETY: both buffers hold n·c·h·w values.
        unsafe { self.launch(Kernel::NhwcToNchw, cfg, &args) }
    }

    /// `y = act(y + bias)` over `rows × cols`, in place.
    pub fn row_bias_act(
        &self,
        y: &mut Buf,
        bias: Option<&Buf>,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<(), KernelError> {
        let total = rows * cols;
        if y.len() < total || bias.is_some_and(|b| b.len() < cols) {
            return Err(KernelError::Shape(format!("bias/act over {rows} × {cols}")));
        }
        if total == 0 {
            return Ok(());
        }
        let (yp, bp) = (self.ptr(y), self.opt_ptr(bias));
        let ints = [i32_of(rows)?, i32_of(cols)?, act as i32];
        let cfg = flat(total);
        let mut args = vec![Arg::Ptr(yp), Arg::Ptr(bp)];
        args.extend(ints.map(Arg::I32));
        // SAFETY: y holds rows·cols values, bias cols or is null.
        unsafe { self.launch(Kernel::RowBiasAct, cfg, &args) }
    }

    /// Launches `k` with `args`, after checking them against the kernel's
    /// parameter table ([`Kernel::params`], itself checked against the PTX by
    /// the test suite).
    ///
    /// # Safety
    /// Every non-null pointer must be a live allocation of this context, large
    /// enough for every index the kernel computes from the other arguments and
    /// `cfg`; outputs must not alias inputs unless the kernel allows it.
    unsafe fn launch(&self, k: Kernel, cfg: LaunchConfig, args: &[Arg]) -> Result<(), KernelError> {
        let kinds: Vec<Param> = args.iter().map(|a| a.param()).collect();
        if kinds != k.params() {
            return Err(KernelError::Shape(format!("{}: arguments {kinds:?}, parameters {:?}", k.name(), k.params())));
        }
        let f = self.function(k)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: each argument has its parameter's type and size (checked
        // above) and lives in `args` until the launch returns; the caller
        // vouches for the pointers.
        unsafe { b.launch(cfg) }.map_err(|source| KernelError::Driver { what: k.name(), source })?;
        Ok(())
    }

    /// Zero padding: `planes` planes of `hw` into `y` of `out`, placed at `top_left`.
    pub fn pad2d(
        &self,
        x: &Buf,
        y: &mut Buf,
        planes: usize,
        hw: [usize; 2],
        top_left: [usize; 2],
        out: [usize; 2],
    ) -> Result<(), KernelError> {
        let ([h, w], [top, left], [oh, ow]) = (hw, top_left, out);
        let total = planes * oh * ow;
        if x.len() < planes * h * w || y.len() < total || top + h > oh || left + w > ow {
            return Err(KernelError::Shape(format!("pad of {planes} × {h}×{w} to {oh}×{ow} at ({top}, {left})")));
        }
        if total == 0 {
            return Ok(());
        }
        let cfg = flat(total);
        let mut args = vec![Arg::Ptr(self.ptr(x)), Arg::Ptr(self.ptr(y))];
        args.extend(
            [planes, h, w, top, left, oh, ow]
                .into_iter()
                .map(|v| i32_of(v).map(Arg::I32))
                .collect::<Result<Vec<_>, _>>()?,
        );
        // SAFETY: x holds planes·h·w values and y planes·oh·ow (checked above);
        // every read is inside x because the placed input fits the output.
        unsafe { self.launch(Kernel::Pad2d, cfg, &args) }
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream.synchronize().map_err(KernelError::driver("synchronising the stream"))
    }
}

fn i32_of(v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::Shape(format!("{v} does not fit a kernel's int argument")))
}

fn u32_of(v: usize) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::Shape(format!("{v} does not fit a launch dimension")))
}

/// One thread per element in blocks of 256, at most 65 535 blocks (the
/// element-wise kernels loop with a grid stride past that).
fn flat(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(256).min(65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
