//! A model cut into stages: one ONNX Runtime session per stage, run in order,
//! each stage's output tensor fed to the next without a copy. Every stage but
//! the last also outputs the global-average-pooled cut tensor (`rows × C`),
//! which caches read; after a stage, rows that exited are compacted away.

use std::time::{Duration, Instant};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, TensorRef};

use super::cuts::StagePlan;
use super::onnx_graph::OnnxModel;
use super::InferError;

/// One stage's session and the tensors it reads and writes.
pub struct Stage {
    session: Session,
    input: String,
    output: String,
}

/// What an exit decision sees after a stage.
pub struct StageView<'a> {
    /// 0-based stage index.
    pub stage: usize,
    /// Pooled features of the live rows, `live.len() × dim`.
    pub features: &'a [f32],
    pub dim: usize,
    /// Original row indices of the live rows.
    pub live: &'a [usize],
}

/// A run with exits: the rows that reached the end and their outputs.
#[derive(Debug, Clone, Default)]
pub struct ExitRun {
    /// Original indices of the rows the last stage answered.
    pub finished: Vec<usize>,
    /// Their outputs, row-major, `finished.len() × row_len`.
    pub data: Vec<f32>,
    /// Output values per row.
    pub row_len: usize,
    pub stage_times: Vec<Duration>,
    /// Rows each stage ran on.
    pub stage_rows: Vec<usize>,
}

/// The stages of one model, owned by that model's batcher thread: ONNX
/// Runtime sessions, or the GPU executor's stages (`backend = "cuda"`).
pub struct Pipeline {
    stages: Vec<Stage>,
    gpu: Option<super::gpu::stages::GpuPipeline>,
}

/// A pipeline run's answer.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Output tensor of the last stage, row-major.
    pub data: Vec<f32>,
    /// Its shape (first dimension = rows).
    pub shape: Vec<usize>,
    /// Wall time per stage.
    pub stage_times: Vec<Duration>,
}

/// Creates a session with the daemon's settings: no spinning (stages share cores).
pub fn session_from_bytes(bytes: &[u8], threads: usize, what: &str) -> Result<Session, InferError> {
    let env = super::runtime::environment(None)?;
    let ort_err = |e: ort::Error| InferError::Ort { what: what.to_string(), source: e };
    let builder = Session::builder(env).map_err(ort_err)?;
    let builder = builder.with_optimization_level(GraphOptimizationLevel::Level3).map_err(|e| ort_err(e.into()))?;
    let builder = builder.with_intra_threads(threads).map_err(|e| ort_err(e.into()))?;
    let builder = builder.with_inter_threads(1).map_err(|e| ort_err(e.into()))?;
    let mut builder = builder.with_intra_op_spinning(false).map_err(|e| ort_err(e.into()))?;
    builder.commit_from_memory(bytes).map_err(ort_err)
}

impl Pipeline {
    /// Builds one session per stage plan. [`Self::run_with_exits`] pools
    /// features from each non-final stage's output (see [`pool_features`]).
    pub fn build(model: &OnnxModel, plans: &[StagePlan], threads: usize, name: &str) -> Result<Self, InferError> {
        let mut stages = Vec::with_capacity(plans.len());
        for (i, plan) in plans.iter().enumerate() {
            let what = format!("model `{name}` stage {}", i + 1);
            let outputs: Vec<&str> = plan.outputs.iter().map(String::as_str).collect();
            let bytes = model.encode_subgraph(&plan.nodes, &[plan.input.as_str()], &outputs);
            let session = session_from_bytes(&bytes, threads, &what)?;
            stages.push(Stage { session, input: plan.input.clone(), output: plan.outputs[0].clone() });
        }
        Ok(Self { stages, gpu: None })
    }

    /// A pipeline whose stages run on a CUDA device.
    pub fn from_gpu(gpu: super::gpu::stages::GpuPipeline) -> Self {
        Self { stages: Vec::new(), gpu: Some(gpu) }
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.gpu.as_ref().map_or(self.stages.len(), |g| g.len())
    }

    /// Always false: a pipeline has at least one stage.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs all stages on `input` of `shape` (rows first).
    pub fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<RunOutput, InferError> {
        if let Some(g) = self.gpu.as_mut() {
            return g.run(shape, input);
        }
        let mut times = Vec::with_capacity(self.stages.len());
        let first = TensorRef::from_array_view((shape.to_vec(), input)).map_err(|e| ort_run(0, e))?;
        let mut carry: Option<DynValue> = None;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let t0 = Instant::now();
            let mut out = match carry.take() {
                None => stage.session.run(ort::inputs![stage.input.as_str() => first.view()]),
                Some(v) => stage.session.run(ort::inputs![stage.input.as_str() => v]),
            }
            .map_err(|e| ort_run(i, e))?;
            let value = out
                .remove(&stage.output)
                .ok_or_else(|| InferError::Shape(format!("stage {} produced no `{}`", i + 1, stage.output)))?;
            times.push(t0.elapsed());
            carry = Some(value);
        }
        let last = carry.expect("pipelines have at least one stage");
        let (shape, data) = last.try_extract_tensor::<f32>().map_err(|e| ort_run(self.stages.len() - 1, e))?;
        Ok(RunOutput {
            data: data.to_vec(),
            shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
            stage_times: times,
        })
    }
}

impl Pipeline {
    /// Runs the stages; after each non-final stage, `decide` gets the stage's
    /// pooled features and says which live rows continue (`true`) — the others
    /// exited there and are compacted out of the next stage's input.
    /// Stops early if no row is left.
    pub fn run_with_exits(
        &mut self,
        shape: &[usize],
        input: &[f32],
        decide: &mut dyn FnMut(StageView<'_>) -> Vec<bool>,
    ) -> Result<ExitRun, InferError> {
        if let Some(g) = self.gpu.as_mut() {
            return g.run_with_exits(shape, input, decide);
        }
        let n = self.stages.len();
        let mut run = ExitRun::default();
        let mut live: Vec<usize> = (0..shape[0]).collect();
        let first = TensorRef::from_array_view((shape.to_vec(), input)).map_err(|e| ort_run(0, e))?;
        let mut carry: Option<DynValue> = None;
        for (i, stage) in self.stages.iter_mut().enumerate() {
            let t0 = Instant::now();
            let mut out = match carry.take() {
                None => stage.session.run(ort::inputs![stage.input.as_str() => first.view()]),
                Some(v) => stage.session.run(ort::inputs![stage.input.as_str() => v]),
            }
            .map_err(|e| ort_run(i, e))?;
            let value = out
                .remove(&stage.output)
                .ok_or_else(|| InferError::Shape(format!("stage {} produced no `{}`", i + 1, stage.output)))?;
            run.stage_times.push(t0.elapsed());
            run.stage_rows.push(live.len());
            if i + 1 == n {
                let (oshape, data) = value.try_extract_tensor::<f32>().map_err(|e| ort_run(i, e))?;
                run.row_len = oshape.iter().skip(1).map(|&d| d.max(0) as usize).product();
                run.data = data.to_vec();
                run.finished = live;
                return Ok(run);
            }
            let keep = {
                let (vshape, vdata) = value.try_extract_tensor::<f32>().map_err(|e| ort_run(i, e))?;
                let dims: Vec<usize> = vshape.iter().map(|&d| d.max(0) as usize).collect();
                let (fdata, dim) = pool_features(&dims, vdata);
                decide(StageView { stage: i, features: &fdata, dim, live: &live })
            };
            if keep.iter().all(|&k| k) {
                carry = Some(value);
                continue;
            }
            if !keep.iter().any(|&k| k) {
                run.finished = Vec::new();
                return Ok(run);
            }
            // Compact: copy the kept rows of the cut tensor into a new input.
            let (vshape, vdata) = value.try_extract_tensor::<f32>().map_err(|e| ort_run(i, e))?;
            let mut dims: Vec<usize> = vshape.iter().map(|&d| d.max(0) as usize).collect();
            let row: usize = dims[1..].iter().product();
            let mut data = Vec::with_capacity(row * keep.iter().filter(|&&k| k).count());
            let mut next_live = Vec::with_capacity(data.capacity() / row.max(1));
            for (j, (&k, &orig)) in keep.iter().zip(&live).enumerate() {
                if k {
                    data.extend_from_slice(&vdata[j * row..(j + 1) * row]);
                    next_live.push(orig);
                }
            }
            dims[0] = next_live.len();
            live = next_live;
            let t = ort::value::Tensor::from_array((dims, data)).map_err(|e| ort_run(i, e))?;
            carry = Some(t.into_dyn());
        }
        Ok(run)
    }
}

/// Pooled features of a cut tensor, ONNX `GlobalAveragePool` + `Flatten`
/// semantics: for rank ≥ 3 the mean over every axis after the second (one value
/// per channel), for rank 2 the rows themselves. Returns `rows × dim` and `dim`.
pub fn pool_features(dims: &[usize], data: &[f32]) -> (Vec<f32>, usize) {
    let rows = dims.first().copied().unwrap_or(0);
    if rows == 0 || data.is_empty() {
        return (Vec::new(), 0);
    }
    if dims.len() <= 2 {
        let dim = data.len() / rows;
        return (data.to_vec(), dim);
    }
    let channels = dims[1];
    let spatial: usize = dims[2..].iter().product::<usize>().max(1);
    let inv = 1.0 / spatial as f32;
    let out = data.chunks_exact(spatial).map(|cell| sum8(cell) * inv).collect();
    (out, channels)
}

/// Σ of `v` in 8 lanes: a plain `sum` is one dependent add per value (the
/// compiler may not reorder float adds), ~0.7 ms for the half million values
/// of EfficientNet's stage outputs per row; lanes let it vectorise.
fn sum8(v: &[f32]) -> f32 {
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    let mut acc = [0f32; 8];
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn ort_run(stage: usize, source: ort::Error) -> InferError {
    InferError::Ort { what: format!("running stage {}", stage + 1), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_averages_each_channel_and_passes_flat_rows_through() {
        // 2 rows × 3 channels × 5 × 7 (35 values a channel: 4 lanes of 8 and a tail).
        let dims = [2, 3, 5, 7];
        let data: Vec<f32> = (0..2 * 3 * 35).map(|i| ((i * 37) % 101) as f32 * 0.25).collect();
        let (out, dim) = pool_features(&dims, &data);
        assert_eq!((out.len(), dim), (6, 3));
        for (k, cell) in data.chunks_exact(35).enumerate() {
            let want = cell.iter().map(|&v| f64::from(v)).sum::<f64>() / 35.0;
            assert!((f64::from(out[k]) - want).abs() < 1e-4, "channel {k}: {} vs {want}", out[k]);
        }
        assert_eq!(pool_features(&[2, 4], &[1.0; 8]), (vec![1.0; 8], 4));
        assert_eq!(pool_features(&[0, 4], &[]), (Vec::new(), 0));
    }
}
