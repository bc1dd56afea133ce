//! Running a batch with caches: rows exit at the first cut whose cache is
//! confident enough, a job is answered the moment its last row is done, the
//! batch is compacted so later stages compute only on the rest, and the rows
//! that ran the whole model feed the caches' training window.
//!
//! Cut 0 is the model input (an 8×8 average-pooled thumbnail per channel, so an
//! answer there skips every stage); cut i ≥ 1 is the end of stage i. A row that
//! exits at cut c is answered with `exit_stage = c`.

use std::sync::atomic::Ordering;

use super::batcher::{Job, JobResult, Reply};
use super::pipeline::{Pipeline, StageView};
use super::InferError;
use crate::cache::model_caches::{Active, ModelCaches, Sample};
use crate::telemetry;

/// Side of the input thumbnail cut 0 reads.
const THUMB: usize = 8;

/// Changes whenever the features a cut gives its cache change (saved cache
/// state from another version is not reused).
pub const FEATURES_VERSION: &str = "thumb8+rust-gap+prior-id";

/// One job's answer being assembled.
struct Pending {
    reply: Option<Reply>,
    rows: usize,
    remaining: usize,
    out: Vec<f32>,
    /// Latest cut that answered one of its rows.
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

/// Average-pools one input row to THUMB×THUMB per channel. The two largest
/// dimensions of `row_shape` are taken as height and width, the other as channels.
pub fn thumbnail(row: &[f32], row_shape: &[usize]) -> Vec<f32> {
    let [a, b, c] = *row_shape else { return Vec::new() };
    // Channel axis: the smallest dimension.
    let ch_axis = if a <= b && a <= c {
        0
    } else if c <= a && c <= b {
        2
    } else {
        1
    };
    let dims = [a, b, c];
    let spatial: Vec<usize> = (0..3).filter(|&d| d != ch_axis).collect();
    let (h, w, chans) = (dims[spatial[0]], dims[spatial[1]], dims[ch_axis]);
    let mut out = vec![0f32; chans * THUMB * THUMB];
    let mut counts = vec![0f32; THUMB * THUMB];
    let clean = |v: f32| if v.is_finite() { v } else { 0.0 };
    if ch_axis != 1 {
        // Channels first or last: walk the row in memory order, a cell index
        // per row and per column (a per-pixel map cost ~0.35 ms to build per
        // 260×260 row, and dividing per pixel as much again).
        let ycell: Vec<usize> = (0..h).map(|y| y * THUMB / h * THUMB).collect();
        let xcell: Vec<usize> = (0..w).map(|x| x * THUMB / w).collect();
        let (mut ny, mut nx) = ([0f32; THUMB], [0f32; THUMB]);
        for &c in &ycell {
            ny[c / THUMB] += 1.0;
        }
        for &c in &xcell {
            nx[c] += 1.0;
        }
        for (cell, n) in counts.iter_mut().enumerate() {
            *n = ny[cell / THUMB] * nx[cell % THUMB];
        }
        if ch_axis == 0 {
            for (ch, plane) in row.chunks_exact(h * w).enumerate() {
                let o = &mut out[ch * THUMB * THUMB..(ch + 1) * THUMB * THUMB];
                for (line, &yc) in plane.chunks_exact(w).zip(&ycell) {
                    let o = &mut o[yc..yc + THUMB];
                    for (&v, &xc) in line.iter().zip(&xcell) {
                        o[xc] += clean(v);
                    }
                }
            }
        } else {
            // Cell-major sums (channels adjacent), laid out channel-major after.
            let mut acc = vec![0f32; THUMB * THUMB * chans];
            for (line, &yc) in row.chunks_exact(w * chans).zip(&ycell) {
                for (px, &xc) in line.chunks_exact(chans).zip(&xcell) {
                    let a = &mut acc[(yc + xc) * chans..(yc + xc + 1) * chans];
                    for (a, &v) in a.iter_mut().zip(px) {
                        *a += clean(v);
                    }
                }
            }
            for (cell, sums) in acc.chunks_exact(chans).enumerate() {
                for (ch, &v) in sums.iter().enumerate() {
                    out[ch * THUMB * THUMB + cell] = v;
                }
            }
        }
        for ch in 0..chans {
            for (o, n) in out[ch * THUMB * THUMB..(ch + 1) * THUMB * THUMB].iter_mut().zip(&counts) {
                *o /= n.max(1.0);
            }
        }
        return out;
    }
    for y in 0..h {
        for x in 0..w {
            let cell = (y * THUMB / h) * THUMB + x * THUMB / w;
            counts[cell] += 1.0;
            for ch in 0..chans {
                let mut idx = [0usize; 3];
                idx[spatial[0]] = y;
                idx[spatial[1]] = x;
                idx[ch_axis] = ch;
                let v = row[(idx[0] * b + idx[1]) * c + idx[2]];
                out[ch * THUMB * THUMB + cell] += clean(v);
            }
        }
    }
    for ch in 0..chans {
        for (o, n) in out[ch * THUMB * THUMB..(ch + 1) * THUMB * THUMB].iter_mut().zip(&counts) {
            *o /= n.max(1.0);
        }
    }
    out
}

/// Next xorshift64 draw as a uniform number in [0, 1).
pub(super) fn unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// The class a row of model outputs answers.
pub(super) fn argmax(out: &[f32]) -> u32 {
    out.iter().enumerate().fold((0, f32::MIN), |b, (k, &v)| if v > b.1 { (k, v) } else { b }).0 as u32
}

/// Per-batch bookkeeping shared by every cut.
struct Exits<'a> {
    caches: &'a ModelCaches,
    active: &'a Active,
    model: &'a str,
    classes: usize,
    logits: bool,
    owner: Vec<(usize, usize)>,
    pending: Vec<Pending>,
    features: Vec<Vec<Vec<f32>>>,
    hit: Vec<Option<(usize, u32)>>,
    /// Per row: (cut, class) each active predictor guessed, for the oracle.
    guesses: Vec<Vec<(usize, u32)>>,
    /// Per row: the model's previous answer on the row's stream (stream prior).
    prior: Option<Vec<Option<u32>>>,
    /// Per row: a calibration row (never answered from a cache).
    calibrate: Vec<bool>,
    /// Per row: the (cut, class) a cache on probation would have answered;
    /// the full model answers the row and judges the cache's guess.
    probe: Vec<Option<(usize, u32)>>,
    rng: &'a mut u64,
}

impl Exits<'_> {
    /// Consults cut `cut` for the `live` rows; returns which continue.
    fn consult(&mut self, cut: usize, features: &[f32], dim: usize, live: &[usize]) -> Vec<bool> {
        let width = dim + usize::from(self.prior.is_some());
        for (j, &r) in live.iter().enumerate() {
            let mut row = Vec::with_capacity(width);
            row.extend_from_slice(&features[j * dim..(j + 1) * dim]);
            if let Some(prior) = &self.prior {
                // The stream's previous answer as one column: class + 1, 0 for none.
                row.push(prior[r].map_or(0.0, |k| (k + 1) as f32));
            }
            self.features[r][cut] = row;
        }
        let Some(Some(entry)) = self.active.cuts.get(cut) else { return vec![true; live.len()] };
        let rows: Vec<f32> = live.iter().flat_map(|&r| self.features[r][cut].iter().copied()).collect();
        let preds = entry.cache.predict(&rows, width);
        let mut keep = vec![true; live.len()];
        for (j, (&r, &(class, conf))) in live.iter().zip(&preds).enumerate() {
            if !self.calibrate[r] {
                self.guesses[r].push((cut, class));
            }
            if self.hit[r].is_some() || self.probe[r].is_some() || self.calibrate[r] || conf < entry.threshold {
                continue;
            }
            self.caches.stats[cut].hits.fetch_add(1, Ordering::Relaxed);
            if self.caches.on_probation() {
                // Not answered: nothing live has judged these caches yet (the first
                // training, a restore, a retraining after a cut proved wrong). The
                // full model answers, and judges what the cache would have said.
                self.probe[r] = Some((cut, class));
                continue;
            }
            self.hit[r] = Some((cut, class));
            let (k, row) = self.owner[r];
            let p = &mut self.pending[k];
            p.out[row * self.classes..(row + 1) * self.classes].copy_from_slice(&hit_row(
                class,
                conf,
                self.classes,
                self.logits,
            ));
            p.remaining -= 1;
            p.stage = p.stage.max(cut as u16);
            // Counted before the answer goes out: a client that reads its
            // answer and then the metrics sees its own exit.
            telemetry::cache_exit(self.model, cut);
            p.finish_if_done(self.classes);
            // A few hits also run on, off the request path, to measure disagreement.
            keep[j] = unit(self.rng) < f64::from(self.caches.config.shadow_fraction);
        }
        keep
    }

    fn fail_unanswered(&mut self, why: &str) {
        for p in &mut self.pending {
            if let Some(r) = p.reply.take() {
                r.send(JobResult::Failed(why.to_string()));
            }
        }
    }
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
    let cuts = pipeline.len();
    let row_len: usize = row_shape.iter().product();
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    let active = caches.active();
    let mut owner = Vec::with_capacity(rows);
    let mut streams = Vec::with_capacity(rows);
    let mut calibrate = Vec::with_capacity(rows);
    let mut data = Vec::with_capacity(rows * row_len);
    let mut pending: Vec<Pending> = Vec::with_capacity(jobs.len());
    for (k, job) in jobs.into_iter().enumerate() {
        owner.extend((0..job.rows).map(|r| (k, r)));
        streams.extend(std::iter::repeat_n(job.stream, job.rows));
        calibrate.extend(std::iter::repeat_n(job.calibrate, job.rows));
        data.extend_from_slice(&job.data);
        pending.push(Pending {
            reply: Some(job.reply),
            rows: job.rows,
            remaining: job.rows,
            out: vec![0.0; job.rows * classes],
            stage: 0,
        });
    }
    let mut ex = Exits {
        caches,
        active: &active,
        model,
        classes,
        logits,
        owner,
        pending,
        features: vec![vec![Vec::new(); cuts]; rows],
        hit: vec![None; rows],
        guesses: vec![Vec::new(); rows],
        // Calibration rows come in no stream order: they see no prior.
        prior: caches
            .config
            .stream_prior
            .then(|| caches.priors(&streams).into_iter().zip(&calibrate).map(|(p, &c)| p.filter(|_| !c)).collect()),
        calibrate,
        probe: vec![None; rows],
        rng,
    };
    caches.rows.fetch_add(rows as u64, Ordering::Relaxed);
    // Every cut's features are computed for every batch: every full-model row
    // feeds the window, and they are pooled from cut tensors the stages compute
    // anyway (~1 µs per stage).
    // Cut 0: the input itself.
    let all: Vec<usize> = (0..rows).collect();
    let thumbs: Vec<f32> = data.chunks_exact(row_len).flat_map(|r| thumbnail(r, row_shape)).collect();
    let tdim = thumbs.len() / rows.max(1);
    let keep = if tdim > 0 { ex.consult(0, &thumbs, tdim, &all) } else { vec![true; rows] };
    let live: Vec<usize> = all.iter().copied().filter(|&r| keep[r]).collect();
    if live.is_empty() {
        // Every row was a hit: the streams' priors stay the last full-model answers.
        ex.fail_unanswered("internal: rows left unanswered");
        return Ok(Vec::new());
    }
    let input: Vec<f32> = if live.len() == rows {
        data
    } else {
        live.iter().flat_map(|&r| data[r * row_len..(r + 1) * row_len].iter().copied()).collect()
    };
    let mut shape = vec![live.len()];
    shape.extend(row_shape);

    let run = {
        let mut decide = |view: StageView<'_>| -> Vec<bool> {
            let rows: Vec<usize> = view.live.iter().map(|&j| live[j]).collect();
            ex.consult(view.stage + 1, view.features, view.dim, &rows)
        };
        pipeline.run_with_exits(&shape, &input, &mut decide)
    };
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            ex.fail_unanswered(&e.to_string());
            return Err(e);
        }
    };
    let mut samples = Vec::with_capacity(run.finished.len());
    // The full model's answer where it ran (shadowed hits too), else the hit's.
    let mut truth: Vec<Option<u32>> = ex.hit.iter().map(|h| h.map(|(_, class)| class)).collect();
    let mut ran_full: Vec<Option<u32>> = vec![None; rows];
    let last = pipeline.len() as u16;
    for (i, &j) in run.finished.iter().enumerate() {
        let r = live[j];
        let out = &run.data[i * run.row_len..(i + 1) * run.row_len];
        let label = argmax(out);
        let sampled = ex.hit[r].is_some();
        let weight = if sampled { 1.0 / caches.config.shadow_fraction.max(1e-3) } else { 1.0 };
        samples.push(Sample { features: std::mem::take(&mut ex.features[r]), label, weight });
        truth[r] = Some(label);
        ran_full[r] = Some(label);
        match ex.hit[r] {
            Some((cut, cached)) => caches.shadow(cut, cached, label),
            None => {
                if let Some((cut, guess)) = ex.probe[r] {
                    caches.shadow(cut, guess, label);
                }
                let (k, row) = ex.owner[r];
                let p = &mut ex.pending[k];
                let n = run.row_len.min(classes);
                p.out[row * classes..row * classes + n].copy_from_slice(&out[..n]);
                p.remaining -= 1;
                p.stage = last;
                telemetry::cache_exit(model, last as usize);
                p.finish_if_done(classes);
            }
        }
    }
    caches.record(samples);
    // Oracle: the earliest cut whose predictor had the answer (a perfect selector).
    for ((guesses, t), &c) in ex.guesses.iter().zip(&truth).zip(&ex.calibrate) {
        if let (Some(t), false) = (t, c) {
            let cut = guesses.iter().find(|g| g.1 == *t).map_or(last as usize, |g| g.0);
            telemetry::cache_oracle_exit(model, cut);
        }
    }
    if caches.config.stream_prior {
        // The prior is the stream's last *full-model* answer, never a cache's:
        // a predictor that leans on the prior and fed on its own answers would
        // repeat its first mistake frame after frame (measured on vtest: 53 of
        // 86 hits wrong at the input cut, 6.7 % disagreement, before this).
        let full = streams.iter().zip(&ran_full).zip(&ex.calibrate).filter(|(_, &c)| !c);
        caches.remember(full.filter_map(|((&s, a), _)| Some((s, (*a)?))));
    }
    telemetry::cache_state(model, caches.live_disagreement(), caches.mem_bytes());
    ex.fail_unanswered("internal: rows left unanswered");
    Ok(run.stage_rows.into_iter().zip(run.stage_times).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnail_pools_spatial_dims_per_channel_in_either_layout() {
        // NHWC 16x16x2: channel 0 = 1.0, channel 1 = row index; each cell pools 2x2 pixels.
        let mut nhwc = Vec::new();
        for y in 0..16 {
            for _x in 0..16 {
                nhwc.extend([1.0, y as f32]);
            }
        }
        let cells = THUMB * THUMB;
        let t = thumbnail(&nhwc, &[16, 16, 2]);
        assert_eq!(t.len(), 2 * cells);
        assert!(t[..cells].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!((t[cells] - 0.5).abs() < 1e-6 && (t[cells + (THUMB - 1) * THUMB] - 14.5).abs() < 1e-6);
        // NCHW 1x16x16 gives one channel of THUMB² cells.
        let nchw: Vec<f32> = (0..256).map(|i| (i / 16) as f32).collect();
        let t = thumbnail(&nchw, &[1, 16, 16]);
        assert_eq!(t.len(), cells);
        assert!((t[0] - 0.5).abs() < 1e-6 && (t[cells - 1] - 14.5).abs() < 1e-6);
        assert!(thumbnail(&[1.0; 4], &[4]).is_empty());
        // Channels in the middle (H×C×W) pools the same values as the other layouts.
        let (h, w, c) = (12, 10, 2);
        let val = |y: usize, x: usize, ch: usize| (y * 31 + x * 7 + ch * 101) as f32 % 13.0;
        let mut hwc = Vec::new();
        let mut hcw = Vec::new();
        let mut chw = Vec::new();
        for y in 0..h {
            for x in 0..w {
                hwc.extend((0..c).map(|ch| val(y, x, ch)));
            }
            for ch in 0..c {
                hcw.extend((0..w).map(|x| val(y, x, ch)));
            }
        }
        for ch in 0..c {
            for y in 0..h {
                chw.extend((0..w).map(|x| val(y, x, ch)));
            }
        }
        let t = thumbnail(&hwc, &[h, w, c]);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-5);
        assert!(close(&t, &thumbnail(&chw, &[c, h, w])), "NCHW and NHWC agree");
        assert!(close(&t, &thumbnail(&hcw, &[h, c, w])), "and the general walk");
    }
}
