//! Loading a configured model: decode, cut, build stage sessions, check the
//! staged result against the whole model, and measure stage costs.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::cost::{ModelCost, StageCost};
use super::cuts::{auto_cuts, plan_stages};
use super::gpu::{self, stages::GpuPipeline, Placement};
use super::onnx_graph::OnnxModel;
use super::pipeline::{session_from_bytes, Pipeline};
use super::InferError;
use crate::config::{Cuts, InputConfig, Layout, ModelConfig, OutputKind};

/// What clients and operators see of a model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelMeta {
    pub name: String,
    pub id: u32,
    pub path: String,
    /// One row of model input, e.g. `[32, 32, 3]` (NHWC) or `[1, 28, 28]` (NCHW).
    pub row_shape: Vec<usize>,
    pub layout: String,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub output: String,
    pub classes: usize,
    pub labels: Vec<String>,
    pub max_batch: usize,
    pub stages: Vec<StageMeta>,
    /// Where it runs: `cpu` or `cuda:N`.
    pub backend: String,
    /// Why a `backend = "cuda"` model runs on the CPU (`fallback = "cpu"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

/// One stage as reported in metadata.
#[derive(Debug, Clone, Serialize)]
pub struct StageMeta {
    /// The tensor the stage ends at.
    pub output: String,
    pub nodes: usize,
    /// Measured cost at load for one row, microseconds.
    pub cost_us_batch1: f64,
}

/// A model ready to serve: its pipeline (moved into the batcher) and shared facts.
pub struct LoadedModel {
    pub meta: ModelMeta,
    pub pipeline: Pipeline,
    pub cost: ModelCost,
    pub config: ModelConfig,
}

/// Tolerance of staged vs whole-model outputs (same kernels; only fusion across a cut differs).
const STAGED_TOLERANCE: f32 = 1e-4;
/// Tolerance of the GPU executor vs ONNX Runtime on the CPU (other convolution
/// algorithms: cuDNN may pick Winograd or FFT ones).
const GPU_TOLERANCE: f32 = 1e-3;

impl LoadedModel {
    /// Loads, cuts, verifies and measures the model of `cfg`.
    pub fn load(cfg: &ModelConfig) -> Result<Self, InferError> {
        let bytes = std::fs::read(&cfg.path).map_err(|source| InferError::Read { path: cfg.path.clone(), source })?;
        let onnx = OnnxModel::decode(&bytes)?;
        let cuts = match &cfg.cuts {
            Cuts::Mode(m) if m == "none" => Vec::new(),
            Cuts::Mode(_) => auto_cuts(&onnx)?,
            Cuts::Tensors(t) => t.clone(),
        };
        let plans = plan_stages(&onnx, &cuts)?;
        let mut whole = session_from_bytes(&bytes, cfg.intra_threads, &format!("model `{}`", cfg.name))?;
        let row_shape = row_shape(&cfg.input);
        check_input(&whole, &cfg.name, &row_shape)?;
        let (mut pipeline, placement) = match gpu::place(cfg)? {
            Placement::Cuda { device, gpu } => match GpuPipeline::build(&onnx, &row_shape, &cuts, gpu, cfg.max_batch) {
                Ok(p) => (Pipeline::from_gpu(p), Placement::label_cuda(device)),
                Err(e) => {
                    let reason = gpu::placement::refuse_or_fall_back(cfg, e.to_string())?;
                    (Pipeline::build(&onnx, &plans, cfg.intra_threads, &cfg.name)?, ("cpu".to_string(), Some(reason)))
                }
            },
            Placement::Cpu { fallback } => {
                (Pipeline::build(&onnx, &plans, cfg.intra_threads, &cfg.name)?, ("cpu".to_string(), fallback))
            }
        };
        let tolerance = if placement.0 == "cpu" { STAGED_TOLERANCE } else { GPU_TOLERANCE };

        // Staged == unstaged, on a deterministic pseudo-random batch of 2.
        let probe = probe_input(2, &row_shape);
        let mut shape = vec![2];
        shape.extend(&row_shape);
        let staged = pipeline.run(&shape, &probe)?;
        let reference = run_whole(&mut whole, &shape, &probe)?;
        let diff = max_rel_diff(&staged.data, &reference);
        if staged.data.len() != reference.len() || diff > tolerance {
            return Err(InferError::StagedMismatch(diff));
        }
        let classes = staged.shape.get(1).copied().unwrap_or(1);
        if !cfg.labels.is_empty() && cfg.labels.len() != classes {
            return Err(InferError::Shape(format!(
                "model `{}` has {} labels for {classes} outputs",
                cfg.name,
                cfg.labels.len()
            )));
        }
        let cost = measure(&mut pipeline, &row_shape, cfg.max_batch.min(8))?;
        let stages = plans
            .iter()
            .zip(&cost.stages)
            .map(|(p, c)| StageMeta {
                output: p.outputs[0].clone(),
                nodes: p.nodes.len(),
                cost_us_batch1: c.predict(1).as_secs_f64() * 1e6,
            })
            .collect();
        let meta = ModelMeta {
            name: cfg.name.clone(),
            id: crate::id::model_id(&cfg.name),
            path: cfg.path.display().to_string(),
            row_shape,
            layout: format!("{:?}", cfg.input.layout),
            height: cfg.input.height,
            width: cfg.input.width,
            channels: cfg.input.channels,
            output: match cfg.output {
                OutputKind::Logits => "logits".into(),
                OutputKind::Probabilities => "probabilities".into(),
            },
            classes,
            labels: cfg.labels.clone(),
            max_batch: cfg.max_batch,
            stages,
            backend: placement.0,
            fallback_reason: placement.1,
        };
        Ok(Self { meta, pipeline, cost, config: cfg.clone() })
    }
}

/// The per-row input shape the config declares.
pub fn row_shape(input: &InputConfig) -> Vec<usize> {
    match input.layout {
        Layout::NHWC => vec![input.height, input.width, input.channels],
        Layout::NCHW => vec![input.channels, input.height, input.width],
    }
}

fn check_input(session: &ort::session::Session, name: &str, row: &[usize]) -> Result<(), InferError> {
    let [input] = session.inputs() else {
        return Err(InferError::Shape(format!("model `{name}` must have one input, has {}", session.inputs().len())));
    };
    if let ort::value::ValueType::Tensor { ty, shape, .. } = input.dtype() {
        if *ty != ort::value::TensorElementType::Float32 {
            return Err(InferError::Shape(format!("model `{name}` input is {ty:?}; gatid serves float32 inputs")));
        }
        let dims: &[i64] = shape;
        let fits = dims.len() == row.len() + 1 && dims[1..].iter().zip(row).all(|(&d, &r)| d < 0 || d as usize == r);
        if !fits {
            return Err(InferError::Shape(format!(
                "model `{name}` takes input {dims:?} but its config declares rows of {row:?} (check input.layout/height/width/channels)"
            )));
        }
    }
    Ok(())
}

fn run_whole(session: &mut ort::session::Session, shape: &[usize], data: &[f32]) -> Result<Vec<f32>, InferError> {
    let err = |e| InferError::Ort { what: "running the whole model".into(), source: e };
    let input = ort::value::TensorRef::from_array_view((shape.to_vec(), data)).map_err(err)?;
    let outputs = session.run(ort::inputs![input]).map_err(err)?;
    let (_, out) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
    Ok(out.to_vec())
}

/// Deterministic inputs in [0, 1) (xorshift), enough to exercise every path.
pub fn probe_input(rows: usize, row_shape: &[usize]) -> Vec<f32> {
    let n = rows * row_shape.iter().product::<usize>();
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

fn measure(pipeline: &mut Pipeline, row: &[usize], big: usize) -> Result<ModelCost, InferError> {
    let mut per_stage = |rows: usize, reps: usize| -> Result<Vec<Duration>, InferError> {
        let mut shape = vec![rows];
        shape.extend(row);
        let input = probe_input(rows, row);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); pipeline.len()];
        for _ in 0..reps {
            let out = pipeline.run(&shape, &input)?;
            for (s, t) in samples.iter_mut().zip(out.stage_times) {
                s.push(t);
            }
        }
        Ok(samples
            .into_iter()
            .map(|mut s| {
                s.sort();
                s[s.len() / 2]
            })
            .collect())
    };
    let started = Instant::now();
    per_stage(1, 2)?; // warm-up
    let t1 = per_stage(1, 7)?;
    let tn = if big > 1 { per_stage(big, 3)? } else { t1.clone() };
    tracing::debug!(took_ms = started.elapsed().as_millis() as u64, "measured stage costs");
    Ok(ModelCost { stages: t1.iter().zip(&tn).map(|(&a, &b)| StageCost::from_measurements(a, big, b)).collect() })
}
