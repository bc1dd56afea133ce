//! Running a batch with caches: rows exit at the first cut whose cache is
//! confident enough, a job is answered the moment its last row is done, the
//! batch is compacted so later stages compute only on the rest, and the rows
//! that ran the whole model feed the caches' training window.

use super::batcher::{Job, JobResult, Reply};
use super::pipeline::{Pipeline, StageView};
use super::InferError;
use crate::cache::model_caches::{ModelCaches, Sample};
use crate::telemetry;
use std::sync::atomic::Ordering;

/// One job's answer being assembled.
struct Pending {
    reply: Option<Reply>,
    rows: usize,
    remaining: usize,
    out: Vec<f32>,
    /// Latest stage (1-based) that answered one of its rows.
    stage: u16,
}

impl Pending {
    fn finish_if_done(&mut self, classes: usize) {
        if self.remaining == 0 {
            if let Some(r) = self.reply.take() {
                let data = std::mem::take(&mut self.out);
                r.send(JobResult::Answer { data, shape: vec![self.rows, classes], exit_stage: self.stage });
            }
        }
    }
}

/// What a cache hit answers: the guessed class at the cache's confidence, the
/// rest spread evenly; as log-probabilities when the model outputs logits.
fn hit_row(class: u32, conf: f32, classes: usize, logits: bool) -> Vec<f32> {
    let conf = conf.clamp(1.0 / classes as f32, 1.0);
    let rest = if classes > 1 { (1.0 - conf) / (classes - 1) as f32 } else { 0.0 };
    (0..classes)
        .map(|k| if k as u32 == class { conf } else { rest })
        .map(|p| if logits { p.max(1e-9).ln() } else { p })
        .collect()
}

/// Runs `jobs` (already validated, not expired) through `pipeline` with `caches`.
/// Returns per-stage (rows, time) for the cost model.
pub(super) fn run(
    pipeline: &mut Pipeline,
    caches: &ModelCaches,
    jobs: Vec<Job>,
    row_shape: &[usize],
    logits: bool,
    model: &str,
    rng: &mut u64,
) -> Result<Vec<(usize, std::time::Duration)>, InferError> {
    let classes = caches.classes;
    let cuts = pipeline.len() - 1;
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    let mut owner = Vec::with_capacity(rows);
    let mut data = Vec::with_capacity(rows * row_shape.iter().product::<usize>());
    let mut pending: Vec<Pending> = Vec::with_capacity(jobs.len());
    for (k, job) in jobs.into_iter().enumerate() {
        owner.extend((0..job.rows).map(|r| (k, r)));
        data.extend_from_slice(&job.data);
        pending.push(Pending {
            reply: Some(job.reply),
            rows: job.rows,
            remaining: job.rows,
            out: vec![0.0; job.rows * classes],
            stage: 0,
        });
    }
    let mut shape = vec![rows];
    shape.extend(row_shape);
    let active = caches.active();
    let mut features: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); cuts]; rows];
    let mut hit: Vec<Option<(usize, u32)>> = vec![None; rows];
    let shadow_fraction = caches.config.shadow_fraction;
    let mut decide = |view: StageView<'_>| -> Vec<bool> {
        for (j, &r) in view.live.iter().enumerate() {
            features[r][view.stage] = view.features[j * view.dim..(j + 1) * view.dim].to_vec();
        }
        let Some(Some(entry)) = active.cuts.get(view.stage) else { return vec![true; view.live.len()] };
        let preds = entry.cache.predict(view.features, view.dim);
        let mut keep = vec![true; view.live.len()];
        for (j, (&r, &(class, conf))) in view.live.iter().zip(&preds).enumerate() {
            if hit[r].is_some() || conf < entry.threshold {
                continue;
            }
            hit[r] = Some((view.stage, class));
            caches.stats[view.stage].hits.fetch_add(1, Ordering::Relaxed);
            let (k, row) = owner[r];
            let p = &mut pending[k];
            p.out[row * classes..(row + 1) * classes].copy_from_slice(&hit_row(class, conf, classes, logits));
            p.remaining -= 1;
            p.stage = p.stage.max(view.stage as u16 + 1);
            p.finish_if_done(classes);
            telemetry::cache_exit(model, view.stage + 1);
            // A few hits also run on, off the request path, to measure disagreement.
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            keep[j] = ((*rng >> 11) as f64 / (1u64 << 53) as f64) < f64::from(shadow_fraction);
        }
        keep
    };
    let run = pipeline.run_with_exits(&shape, &data, &mut decide);
    caches.rows.fetch_add(rows as u64, Ordering::Relaxed);
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            for p in &mut pending {
                if let Some(r) = p.reply.take() {
                    r.send(JobResult::Failed(e.to_string()));
                }
            }
            return Err(e);
        }
    };
    let mut samples = Vec::with_capacity(run.finished.len());
    let last = pipeline.len() as u16;
    for (i, &r) in run.finished.iter().enumerate() {
        let out = &run.data[i * run.row_len..(i + 1) * run.row_len];
        let label = out.iter().enumerate().fold((0, f32::MIN), |b, (k, &v)| if v > b.1 { (k, v) } else { b }).0 as u32;
        samples.push(Sample { features: std::mem::take(&mut features[r]), label });
        match hit[r] {
            Some((cut, cached)) => caches.shadow(cut, cached, label),
            None => {
                let (k, row) = owner[r];
                let p = &mut pending[k];
                let n = run.row_len.min(classes);
                p.out[row * classes..row * classes + n].copy_from_slice(&out[..n]);
                p.remaining -= 1;
                p.stage = last;
                p.finish_if_done(classes);
                telemetry::cache_exit(model, last as usize);
            }
        }
    }
    caches.record(samples);
    telemetry::cache_state(model, caches.live_disagreement(), caches.mem_bytes());
    for p in &mut pending {
        if let Some(r) = p.reply.take() {
            r.send(JobResult::Failed("internal: rows left unanswered".into()));
        }
    }
    Ok(run.stage_rows.into_iter().zip(run.stage_times).collect())
}
