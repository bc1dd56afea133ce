//! `gatid bench selector`: max-softmax against the learned selector on the
//! same recorded traffic, offline.
//!
//! Each workload's stream goes through the daemon once with caches that never
//! answer (budget 0), so every request's features at every cut reach the
//! window, which is saved at shutdown. The replay then retrains every `step`
//! rows on the rows so far (the last `window` of them) as the trainer does —
//! out-of-fold candidates per cut, thresholds at the trainer's starting share
//! of the budget — and applies the caches with their thresholds to the next
//! `step` rows, which no fit has seen. Two views: each cut alone with the
//! whole budget (how good is the selector at that cut), and all cuts in order
//! sharing it (first exit wins, as in service, without the cost model).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use super::cache_streams::{load as load_workloads, Workload};
use super::harness::{write_json, Daemon};
use gatid::api::wire::Dtype;
use gatid::cache::model_caches::Sample;
use gatid::cache::policy::{min_certifiable_rows, tune, OFF};
use gatid::cache::{store, train, CutCache};
use gatid::config::CacheConfig;

/// Options of `gatid bench selector`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Shorter streams (as `bench caches --quick`).
    #[arg(long)]
    pub quick: bool,
    /// Node config with the `cifar10` and `fmnist` models.
    #[arg(long, default_value = "configs/cpu.toml")]
    pub config: PathBuf,
    #[arg(long, default_value = "bench/results/selector.json")]
    pub out: PathBuf,
    /// Run only this workload (video, fmnist_local, fmnist_shuffled).
    #[arg(long)]
    pub only: Option<String>,
    /// Rows between retrainings in the replay.
    #[arg(long, default_value_t = 256)]
    pub step: usize,
}

const SELECTORS: [&str; 2] = ["softmax", "learned"];

/// Share of the budget the trainer's tuning starts with (`ModelCaches`' budget scale).
const BUDGET_SHARE: f32 = 0.8;

/// What one selector did on one workload.
#[derive(Default)]
struct Replay {
    /// Rows replayed (after the first training).
    rows: usize,
    /// Per cut, that cut alone: rows certified out of fold (summed over rounds,
    /// over the rows trained on), hits and errors on the next rows.
    certified: Vec<f64>,
    alone_hits: Vec<usize>,
    alone_errors: Vec<usize>,
    /// Per cut, all cuts in order: first exits and their errors.
    cascade_hits: Vec<usize>,
    cascade_errors: Vec<usize>,
    /// Candidate fitting per round (all cuts), ms.
    train_ms: Vec<f64>,
    /// Lookups per cut: total µs and rows.
    lookup_us: Vec<f64>,
    lookups: Vec<usize>,
    /// Per cut: rounds whose pick was judged by max-softmax, a learned selector
    /// on the predictor's output, one on the output and the features.
    judged_by: Vec<[usize; 3]>,
    /// Lookup time of every candidate on the next rows by how it is judged
    /// (as `judged_by`), over all cuts: µs and rows.
    kind_us: [f64; 3],
    kind_rows: [usize; 3],
}

/// Streams `w` through a daemon whose caches never answer and returns the saved window.
fn record(config: &Path, w: &Workload) -> anyhow::Result<Vec<Sample>> {
    let state = super::serving::tempdir()?;
    let n = w.requests();
    let daemon = Daemon::start_with(config, |t| {
        let rt = t.entry("runtime").or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(rt) = rt {
            rt.insert("state_dir".into(), toml::Value::String(state.display().to_string()));
        }
        if let Some(toml::Value::Array(models)) = t.get_mut("models") {
            for m in models.iter_mut().filter_map(toml::Value::as_table_mut) {
                let cache = format!(
                    "kind = \"learned\"\nbudget = 0.0\nwindow = {}\nmin_samples = 8\nretrain_every = 1073741824",
                    n.max(16)
                );
                m.insert("cache".into(), toml::Value::Table(toml::from_str(&cache).unwrap_or_default()));
            }
        }
    })?;
    let mut client = daemon.client()?;
    for i in 0..n {
        client.infer(w.model, Dtype::U8, &w.shape, w.image(i), 0)?.ok()?;
    }
    drop(client);
    daemon.stop()?;
    let file = state.join("caches").join(format!("{}.bin", w.model));
    let saved = store::load_any(&file)?.with_context(|| format!("{} not saved", file.display()))?;
    let _ = std::fs::remove_dir_all(&state);
    if saved.window.len() != n {
        bail!("{}: {} of {n} rows recorded (a busy window drops rows; rerun)", w.name, saved.window.len());
    }
    Ok(saved.window)
}

/// Features of cut `c` for `rows`, or `None` when the cut has none.
fn cut_rows(rows: &[Sample], c: usize) -> Option<(Vec<f32>, usize)> {
    let dim = rows.first()?.features.get(c)?.len();
    if dim == 0 || rows.iter().any(|s| s.features.get(c).map_or(0, Vec::len) != dim) {
        return None;
    }
    Some((rows.iter().flat_map(|s| s.features[c].iter().copied()).collect(), dim))
}

/// The candidate a cut would serve with, its out-of-fold predictions and threshold.
type Pick = Option<(Arc<dyn CutCache>, Vec<(u32, f32)>, f32)>;

impl Replay {
    fn new(cuts: usize) -> Self {
        Self {
            certified: vec![0.0; cuts],
            alone_hits: vec![0; cuts],
            alone_errors: vec![0; cuts],
            cascade_hits: vec![0; cuts],
            cascade_errors: vec![0; cuts],
            lookup_us: vec![0.0; cuts],
            lookups: vec![0; cuts],
            judged_by: vec![[0; 3]; cuts],
            ..Self::default()
        }
    }

    /// One round: fit on `seen`, serve `next`.
    fn round(&mut self, config: &CacheConfig, seen: &[Sample], next: &[Sample], classes: usize) {
        let cuts = self.certified.len();
        let budget = config.budget * BUDGET_SHARE;
        let labels: Vec<u32> = seen.iter().map(|s| s.label).collect();
        let min_hits = seen.len() as f32 / 50.0;
        let t0 = Instant::now();
        let candidates: Vec<Vec<train::Candidate>> = (0..cuts)
            .map(|c| {
                cut_rows(seen, c)
                    .map(|(x, dim)| train::candidates(config, c, &x, dim, &labels, classes, config.stream_prior))
                    .unwrap_or_default()
            })
            .collect();
        self.train_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        // Per cut, the candidate that certifies most on its own (the placement
        // optimizer would also weigh lookup costs, ~1 µs apart here).
        let mut best: Vec<Pick> = Vec::with_capacity(cuts);
        for (c, cands) in candidates.iter().enumerate() {
            if let Some((x, dim)) = cut_rows(next, c) {
                for cand in cands {
                    let t1 = Instant::now();
                    std::hint::black_box(cand.cache.predict(&x, dim));
                    let kind = judged_by(&*cand.cache);
                    self.kind_us[kind] += t1.elapsed().as_secs_f64() * 1e6;
                    self.kind_rows[kind] += next.len();
                }
            }
            let mut pick: Option<(usize, f32, usize)> = None;
            for (k, cand) in cands.iter().enumerate() {
                let th = tune(std::slice::from_ref(&cand.option.preds), &labels, &[], budget, min_hits)[0];
                let taken = cand.option.preds.iter().filter(|p| p.1 >= th).count();
                if th != OFF && pick.is_none_or(|p| taken > p.2) {
                    pick = Some((k, th, taken));
                }
            }
            self.certified[c] += pick.map_or(0.0, |p| p.2 as f64 / seen.len() as f64 * next.len() as f64);
            best.push(pick.map(|(k, th, _)| {
                self.judged_by[c][judged_by(&*cands[k].cache)] += 1;
                (Arc::clone(&cands[k].cache), cands[k].option.preds.clone(), th)
            }));
        }
        let cascade: Vec<Vec<(u32, f32)>> =
            best.iter().map(|b| b.as_ref().map_or_else(Vec::new, |b| b.1.clone())).collect();
        let cascade_t = tune(&cascade, &labels, &[], budget, min_hits);
        let mut exited = vec![false; next.len()];
        for (c, b) in best.iter().enumerate() {
            let (Some((cache, _, alone_t)), Some((x, dim))) = (b, cut_rows(next, c)) else { continue };
            let t1 = Instant::now();
            let preds = cache.predict(&x, dim);
            self.lookup_us[c] += t1.elapsed().as_secs_f64() * 1e6;
            self.lookups[c] += next.len();
            for (r, (p, s)) in preds.iter().zip(next).enumerate() {
                if p.1 >= *alone_t {
                    self.alone_hits[c] += 1;
                    self.alone_errors[c] += usize::from(p.0 != s.label);
                }
                if !exited[r] && cascade_t[c] != OFF && p.1 >= cascade_t[c] {
                    exited[r] = true;
                    self.cascade_hits[c] += 1;
                    self.cascade_errors[c] += usize::from(p.0 != s.label);
                }
            }
        }
        self.rows += next.len();
    }
}

/// 0: max-softmax, 1: a selector on the predictor's output, 2: one also on the features.
fn judged_by(cache: &dyn CutCache) -> usize {
    match cache.kind() {
        "learned+output-selector" => 1,
        "learned+features-selector" => 2,
        _ => 0,
    }
}

/// Retrains every `step` rows and serves the next `step`, with each selector
/// setting in turn on the same rows (so their training times pair up).
fn replay(samples: &[Sample], classes: usize, step: usize) -> anyhow::Result<Vec<Replay>> {
    let configs: Vec<CacheConfig> = SELECTORS
        .iter()
        .map(|s| toml::from_str(&format!("kind = \"learned\"\nselector = \"{s}\"")))
        .collect::<Result<_, _>>()?;
    let cuts = samples.first().map_or(0, |s| s.features.len());
    let mut out: Vec<Replay> = SELECTORS.iter().map(|_| Replay::new(cuts)).collect();
    let first = &configs[0];
    let mut t = min_certifiable_rows(first.budget * BUDGET_SHARE).max(first.min_samples);
    while t < samples.len() {
        let seen = &samples[t.saturating_sub(first.window)..t];
        let next = &samples[t..(t + step).min(samples.len())];
        for (config, r) in configs.iter().zip(out.iter_mut()) {
            r.round(config, seen, next, classes);
        }
        t += step;
    }
    Ok(out)
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    let root = args.config.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let mut workloads = load_workloads(&root, args.quick, args.only.as_deref())?;
    // The CIFAR-10 / Fashion-MNIST streams unless one is named (`bench caches` has the ImageNet ones).
    if args.only.is_none() {
        workloads.retain(|w| w.model != "imagenet");
    }
    println!(
        "gatid bench selector{}: retrain every {} rows, budget 1 % x {BUDGET_SHARE}",
        if args.quick { " (quick)" } else { "" },
        args.step
    );
    let mut results = Vec::new();
    for w in &workloads {
        let samples = record(&args.config, w)?;
        let labelled =
            gatid::config::load(&args.config)?.models.iter().find(|m| m.name == w.model).map(|m| m.labels.len());
        let seen = samples.iter().map(|s| s.label as usize + 1).max().unwrap_or(1);
        let classes = labelled.unwrap_or(0).max(seen);
        let cuts = samples.first().map_or(0, |s| s.features.len());
        let dims: Vec<usize> = (0..cuts).map(|c| samples[0].features[c].len()).collect();
        println!("\n{} ({} rows, feature dims per cut {dims:?})", w.name, samples.len());
        let replays = replay(&samples, classes, args.step.max(1))?;
        let per = report(&replays);
        results.push(
            json!({ "workload": w.name, "model": w.model, "rows": samples.len(), "dims": dims, "selectors": per }),
        );
    }
    write_json(
        &args.out,
        &json!({ "quick": args.quick, "step": args.step, "budget_share": BUDGET_SHARE, "workloads": results }),
    )?;
    println!("\nwrote {}", args.out.display());
    Ok(())
}

/// Prints one workload's table and returns its JSON.
fn report(replays: &[Replay]) -> serde_json::Value {
    println!(
        "  {:<8} {:>4} {:>9} {:>7} {:>7} {:>8} {:>7} {:>8}  picked (softmax/output/features)",
        "selector", "cut", "certified", "hits", "dis", "cascade", "dis", "look us"
    );
    let mut per = serde_json::Map::new();
    for (selector, r) in SELECTORS.iter().zip(replays) {
        let share = |v: usize| v as f64 / r.rows.max(1) as f64;
        let lookup: Vec<f64> = r.lookup_us.iter().zip(&r.lookups).map(|(u, &n)| u / n.max(1) as f64).collect();
        #[expect(clippy::needless_range_loop, reason = "c indexes every per-cut column")]
        for c in 0..r.certified.len() {
            println!(
                "  {:<8} {:>4} {:>9.3} {:>7.3} {:>7.4} {:>8.3} {:>7.4} {:>8.2}  {:?}",
                selector,
                c,
                r.certified[c] / r.rows.max(1) as f64,
                share(r.alone_hits[c]),
                share(r.alone_errors[c]),
                share(r.cascade_hits[c]),
                share(r.cascade_errors[c]),
                lookup[c],
                r.judged_by[c]
            );
        }
        let (hits, errors): (usize, usize) = (r.cascade_hits.iter().sum(), r.cascade_errors.iter().sum());
        let kind_us: Vec<f64> = r.kind_us.iter().zip(&r.kind_rows).map(|(u, &n)| u / n.max(1) as f64).collect();
        if r.kind_rows[1] > 0 {
            println!(
                "  {selector:<8} lookup per row, all cuts: max-softmax {:.2} us, output selector {:.2} us, features selector {:.2} us",
                kind_us[0], kind_us[1], kind_us[2]
            );
        }
        let mean_ms = r.train_ms.iter().sum::<f64>() / r.train_ms.len().max(1) as f64;
        println!(
            "  {selector:<8} all cuts in order: exits {:.3}, disagreement {:.4} over {} rows; {} trainings, {mean_ms:.0} ms each",
            share(hits),
            share(errors),
            r.rows,
            r.train_ms.len()
        );
        per.insert(
            (*selector).to_string(),
            json!({
                "rows": r.rows,
                "certified_share": r.certified.iter().map(|v| v / r.rows.max(1) as f64).collect::<Vec<_>>(),
                "alone_hit_share": r.alone_hits.iter().map(|&v| share(v)).collect::<Vec<_>>(),
                "alone_disagreement": r.alone_errors.iter().map(|&v| share(v)).collect::<Vec<_>>(),
                "cascade_exit_share": r.cascade_hits.iter().map(|&v| share(v)).collect::<Vec<_>>(),
                "cascade_exits": share(hits),
                "cascade_disagreement": share(errors),
                "lookup_us": lookup,
                "picked_softmax_output_features": r.judged_by,
                "lookup_us_softmax_output_features": kind_us,
                "train_ms_mean": mean_ms,
                "trainings": r.train_ms.len(),
            }),
        );
    }
    if let [soft, learned] = replays {
        // Paired: the same rounds on the same rows, one after the other.
        let extra: Vec<f64> = soft.train_ms.iter().zip(&learned.train_ms).map(|(a, b)| b - a).collect();
        let mean = extra.iter().sum::<f64>() / extra.len().max(1) as f64;
        let base = soft.train_ms.iter().sum::<f64>() / soft.train_ms.len().max(1) as f64;
        println!("  learned selectors add {mean:.0} ms per training round ({:+.0} %)", 100.0 * mean / base.max(1e-9));
        per.insert("learned_extra_train_ms".into(), json!(mean));
    }
    serde_json::Value::Object(per)
}
