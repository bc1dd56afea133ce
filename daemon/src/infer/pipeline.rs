//! A model cut into stages: one ONNX Runtime session per stage, run in order,
//! each stage's output tensor fed to the next without a copy.

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

/// The stages of one model, owned by that model's batcher thread.
pub struct Pipeline {
    stages: Vec<Stage>,
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
    /// Builds one session per stage plan.
    pub fn build(model: &OnnxModel, plans: &[StagePlan], threads: usize, name: &str) -> Result<Self, InferError> {
        let mut stages = Vec::with_capacity(plans.len());
        for (i, plan) in plans.iter().enumerate() {
            let outputs: Vec<&str> = plan.outputs.iter().map(String::as_str).collect();
            let bytes = model.encode_subgraph(&plan.nodes, &[plan.input.as_str()], &outputs);
            let session = session_from_bytes(&bytes, threads, &format!("model `{name}` stage {}", i + 1))?;
            stages.push(Stage { session, input: plan.input.clone(), output: plan.outputs[0].clone() });
        }
        Ok(Self { stages })
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Always false: a pipeline has at least one stage.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Runs all stages on `input` of `shape` (rows first).
    pub fn run(&mut self, shape: &[usize], input: &[f32]) -> Result<RunOutput, InferError> {
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

fn ort_run(stage: usize, source: ort::Error) -> InferError {
    InferError::Ort { what: format!("running stage {}", stage + 1), source }
}
