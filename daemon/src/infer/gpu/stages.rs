//! A model's stages on a CUDA device, behind the same interface as the ONNX
//! Runtime pipeline: `run` and `run_with_exits` (pooled features after each
//! non-final stage, computed on the device; the rows that exited compacted
//! away on the device, in order). Stage times are measured with a stream
//! synchronisation at each stage's end (the cost model needs them).

use std::ops::Range;
use std::time::Instant;

use gati_kernels::device::{DevEpilogue, Gpu};
use gati_kernels::reference::EpilogueShape;

use super::super::onnx_graph::OnnxModel;
use super::super::pipeline::{ExitRun, RunOutput, StageView};
use super::super::InferError;
use super::exec::DeviceExec;
use super::graph::Graph;
use super::lower::{lower, LowerOptions};
use super::plan::ValueId;
use super::GpuError;

/// The GPU stages of one model (owned by its batcher thread).
pub struct GpuPipeline {
    exec: DeviceExec,
    stages: Vec<Range<usize>>,
    cuts: Vec<ValueId>,
}

impl GpuPipeline {
    /// Lowers `onnx` with `cuts` kept, uploads it to `gpu` for batches of up to `max_rows`.
    pub fn build(
        onnx: &OnnxModel,
        row_shape: &[usize],
        cuts: &[String],
        gpu: Gpu,
        max_rows: usize,
    ) -> Result<Self, GpuError> {
        let graph = Graph::from_onnx(onnx)?;
        let plan = lower(&graph, row_shape, cuts, LowerOptions::default())?;
        let ids = cuts
            .iter()
            .map(|c| {
                plan.value_of(c)
                    .ok_or_else(|| GpuError::Graph(format!("cut `{c}` is not a tensor of the lowered plan")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stages = plan.stages(&ids).ok_or_else(|| GpuError::Graph("the cuts are not in graph order".into()))?;
        tracing::info!(device = %gpu.name(), arch = gpu.arch(), ops = ?plan.summary(), "model lowered for the GPU");
        let exec = DeviceExec::new(std::sync::Arc::new(gpu), plan, max_rows)?;
        Ok(Self { exec, stages, cuts: ids })
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Always false: there is at least one stage.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    fn out_shape(&self, rows: usize) -> Vec<usize> {
        let mut shape = vec![rows];
        shape.extend(&self.exec.plan().values[self.exec.plan().output].dims);
        shape
    }

    /// Runs every stage.
    pub fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<RunOutput, InferError> {
        let rows = shape.first().copied().unwrap_or(0);
        self.exec.load_input(rows, input)?;
        let mut times = Vec::with_capacity(self.stages.len());
        for range in self.stages.clone() {
            let t0 = Instant::now();
            self.exec.run_ops(rows, range)?;
            self.exec.gpu().synchronize().map_err(GpuError::from)?;
            times.push(t0.elapsed());
        }
        let data = self.exec.read(self.exec.plan().output, rows)?;
        Ok(RunOutput { data, shape: self.out_shape(rows), stage_times: times })
    }

    /// Runs the stages with an exit decision after each non-final one (see
    /// [`super::super::pipeline::Pipeline::run_with_exits`]).
    pub fn run_with_exits(
        &mut self,
        shape: &[usize],
        input: &[f32],
        decide: &mut dyn FnMut(StageView<'_>) -> Vec<bool>,
    ) -> Result<ExitRun, InferError> {
        let mut rows = shape.first().copied().unwrap_or(0);
        let mut live: Vec<usize> = (0..rows).collect();
        let mut run = ExitRun::default();
        self.exec.load_input(rows, input)?;
        let n = self.stages.len();
        for (i, range) in self.stages.clone().into_iter().enumerate() {
            let t0 = Instant::now();
            self.exec.run_ops(rows, range)?;
            self.exec.gpu().synchronize().map_err(GpuError::from)?;
            run.stage_times.push(t0.elapsed());
            run.stage_rows.push(rows);
            if i + 1 == n {
                let out = self.exec.plan().output;
                run.row_len = self.exec.plan().values[out].row_len();
                run.data = self.exec.read(out, rows)?;
                run.finished = live;
                return Ok(run);
            }
            let cut = self.cuts[i];
            let (features, dim) = self.pooled(cut, rows)?;
            let keep = decide(StageView { stage: i, features: &features, dim, live: &live });
            if keep.iter().all(|&k| k) {
                continue;
            }
            if !keep.iter().any(|&k| k) {
                run.finished = Vec::new();
                return Ok(run);
            }
            self.compact(cut, rows, &keep)?;
            live = live.iter().zip(&keep).filter(|(_, &k)| k).map(|(&r, _)| r).collect();
            rows = live.len();
        }
        Ok(run)
    }

    /// The cut's pooled features (`rows × dim`), pooled on the device.
    fn pooled(&self, cut: ValueId, rows: usize) -> Result<(Vec<f32>, usize), GpuError> {
        let dims = self.exec.plan().values[cut].dims.clone();
        if dims.len() < 2 {
            let dim = dims.iter().product();
            return Ok((self.exec.read(cut, rows)?, dim));
        }
        let (channels, spatial) = (dims[0], dims[1..].iter().product());
        let gpu = self.exec.gpu();
        let shape = EpilogueShape { rows, channels, spatial };
        let mut scratch = gpu.poisoned(shape.len())?;
        let mut pooled = gpu.poisoned(rows * channels)?;
        gpu.block_epilogue(
            self.exec.value(cut)?,
            shape,
            &DevEpilogue::default(),
            &mut scratch,
            Some((&mut pooled, channels)),
        )?;
        Ok((gpu.download(&pooled)?, channels))
    }

    /// Keeps the `keep` rows of the cut value, in order, at its front.
    fn compact(&mut self, cut: ValueId, rows: usize, keep: &[bool]) -> Result<(), GpuError> {
        let gpu = self.exec.gpu().clone();
        let hit: Vec<i32> = keep.iter().map(|&k| i32::from(!k)).collect();
        let hit = gpu.stream().clone_htod(&hit).map_err(gati_kernels::KernelError::driver("copying exit flags"))?;
        let mut index =
            gpu.stream().alloc_zeros::<i32>(rows).map_err(gati_kernels::KernelError::driver("an index buffer"))?;
        let mut count = gpu.stream().alloc_zeros::<i32>(1).map_err(gati_kernels::KernelError::driver("a count"))?;
        gpu.compact_index(&hit, rows, &mut index, &mut count)?;
        let row_len = self.exec.plan().values[cut].row_len();
        let mut dst = gpu.poisoned(rows * row_len)?;
        gpu.gather_rows(self.exec.value(cut)?, &mut dst, &index, &count, row_len, rows)?;
        self.exec.write_rows(cut, &dst, keep.iter().filter(|&&k| k).count())
    }
}
