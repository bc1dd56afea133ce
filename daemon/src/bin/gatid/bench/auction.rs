//! `gatid bench auction`: Themis (the daemon's arbiter, several f) against
//! instantaneous fair share, Tiresias-style LAS, Gandiva-style packing and
//! Gavel's finish-time-fairness objective, replaying a Philly-derived Gavel
//! trace and a synthetic workload on the same simulated cluster; and the time
//! of one arbiter round with 1000 apps on 256 GPUs.
//!
//! Writes `bench/results/auction.json` and `auction_cdf_<workload>.png` (CDF of
//! final ρ per policy; colours in the order of the printed table).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::harness::write_json;
use super::plot;
use gatid::auction::app::{App, AppSpec};
use gatid::auction::arbiter::{Arbiter, ArbiterConfig};
use gatid::auction::sim::metrics::{quantile, summarize, Summary};
use gatid::auction::sim::policy::{FairShare, Gandiva, GavelFtf, Policy, Themis, Tiresias};
use gatid::auction::sim::synthetic::{generate, SyntheticParams};
use gatid::auction::sim::trace::{load_throughputs, load_trace, Throughputs};
use gatid::auction::sim::{run as simulate, SimConfig};

/// Themis's f used for the headline `max_rho_themis` (Themis's own default).
pub const DEFAULT_F: f64 = 0.8;

/// Options of `gatid bench auction`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The first 500 jobs of the trace, 150 synthetic jobs, f ∈ {0.5, 0.8}.
    /// (`util` in the table: over the arrivals; `util*`: over the whole run;
    /// `idle`: GPUs free while an app wanted more, over the arrivals;
    /// `max ρ 1h`: over the jobs with T_id ≥ 1 h.)
    #[arg(long)]
    pub quick: bool,
    /// Gavel's data folder (traces-seed0/, simulation_throughputs.json).
    #[arg(long, default_value = "../shared/data/gavel")]
    pub data: PathBuf,
    /// Trace name under traces-seed0/.
    #[arg(long, default_value = "6c71a0")]
    pub trace: String,
    #[arg(long, default_value_t = 8)]
    pub nodes: u32,
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u32,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 300.0)]
    pub round_s: f64,
    /// Themis lease length, seconds (default: one round period, as in
    /// Themis: each lease period the arbiter re-offers; a long app renews).
    #[arg(long, default_value_t = 300.0)]
    pub lease_s: f64,
    /// Seconds a job spends restarting whenever its GPUs change (all policies; 0 = free preemption).
    #[arg(long, default_value_t = 0.0)]
    pub restart_s: f64,
    /// Themis's f values to compare (default: 0.5 and 0.8 with --quick, else 0.5, 0.8, 0.9).
    #[arg(long, value_delimiter = ',')]
    pub f: Vec<f64>,
    #[arg(long, default_value = "bench/results/auction.json")]
    pub out: PathBuf,
}

fn policies(cfg: &SimConfig, fs: &[f64], lease_s: f64) -> anyhow::Result<Vec<Box<dyn Policy>>> {
    let mut v: Vec<Box<dyn Policy>> = Vec::new();
    for &f in fs {
        v.push(Box::new(Themis::new(cfg, ArbiterConfig { fairness_f: f, lease_s })?));
    }
    v.push(Box::new(FairShare::new(cfg)));
    v.push(Box::new(Tiresias::new(cfg)));
    v.push(Box::new(Gandiva::new(cfg)));
    v.push(Box::new(GavelFtf::new(cfg, lease_s)));
    Ok(v)
}

fn compare(name: &str, jobs: &[AppSpec], cfg: &SimConfig, fs: &[f64], args: &Args) -> anyhow::Result<Vec<Summary>> {
    println!(
        "\n{name}: {} jobs on {} nodes × {} GPUs (round {} s, lease {} s, restart {} s)",
        jobs.len(),
        cfg.nodes,
        cfg.gpus_per_node,
        cfg.round_s,
        args.lease_s,
        cfg.restart_s
    );
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>6} {:>11} {:>11} {:>6} {:>6} {:>6} {:>6} {:>9}  worst job (id, GPUs, JCT h)",
        "policy",
        "max ρ",
        "max ρ 1h",
        "med ρ",
        "Jain",
        "mean JCT h",
        "p95 JCT h",
        "util",
        "util*",
        "idle",
        "unfin",
        "round ms"
    );
    let mut out = Vec::new();
    let mut rhos = Vec::new();
    for mut p in policies(cfg, fs, args.lease_s)? {
        let r = simulate(jobs, p.as_mut(), cfg);
        let s = summarize(&r);
        let worst = r.jobs.iter().max_by(|a, b| a.rho.total_cmp(&b.rho));
        println!(
            "{:<12} {:>8.2} {:>8.2} {:>8.2} {:>6.3} {:>11.1} {:>11.1} {:>6.3} {:>6.3} {:>6.3} {:>6} {:>9.3}  {}",
            s.policy,
            s.max_rho,
            s.max_rho_long,
            s.median_rho,
            s.jain_rho,
            s.mean_jct_s / 3600.0,
            s.p95_jct_s / 3600.0,
            s.utilization,
            s.utilization_span,
            s.idle_wanted,
            s.unfinished,
            s.mean_round_ms,
            worst.map_or(String::new(), |w| format!("{}, {}, {:.1}", w.id, w.demand, (w.finish - w.arrival) / 3600.0))
        );
        rhos.push(r.jobs.iter().map(|j| j.rho).collect::<Vec<f64>>());
        out.push(s);
    }
    let png = args.out.with_file_name(format!("auction_cdf_{name}.png"));
    plot::cdf(&png, &rhos)?;
    println!("CDF of ρ: {}", png.display());
    Ok(out)
}

/// One arbiter round with `apps` apps (all waiting) on `nodes` × 8 free GPUs: ms (median, max of `reps`).
pub fn round_time(
    models: &Throughputs,
    apps: usize,
    nodes: u32,
    f: f64,
    reps: usize,
) -> anyhow::Result<(f64, f64, usize)> {
    let p = SyntheticParams { jobs: apps, seed: 42, ..SyntheticParams::default() };
    let specs: Vec<AppSpec> = generate(&p, models)
        .into_iter()
        .map(|mut s| {
            s.arrival = 0.0;
            s
        })
        .collect();
    let apps: Vec<App> = specs.into_iter().map(App::new).collect();
    let refs: Vec<&App> = apps.iter().collect();
    let nodes: Vec<(u32, u32)> = (0..nodes).map(|n| (n, 8)).collect();
    let mut times = Vec::new();
    let mut grants = 0;
    for _ in 0..reps {
        let mut arb = Arbiter::new(ArbiterConfig { fairness_f: f, lease_s: 1200.0 }, &nodes)?;
        let r = arb.round(600.0, &refs);
        grants = r.grants.len();
        times.push(r.elapsed_ms);
    }
    Ok((quantile(&times, 0.5), times.iter().copied().fold(0.0, f64::max), grants))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let models = load_throughputs(&args.data.join("simulation_throughputs.json"), "v100")
        .with_context(|| format!("the Gavel data under {} (see shared/data/gavel/README.md)", args.data.display()))?;
    let cfg = SimConfig {
        nodes: args.nodes,
        gpus_per_node: args.gpus_per_node,
        round_s: args.round_s,
        horizon_s: 4.0e7,
        restart_s: args.restart_s,
    };
    let mut fs: Vec<f64> = match (&args.f[..], args.quick) {
        ([], true) => vec![0.5, DEFAULT_F],
        ([], false) => vec![0.5, DEFAULT_F, 0.9],
        (given, _) => given.to_vec(),
    };
    if !fs.contains(&DEFAULT_F) {
        fs.push(DEFAULT_F);
    }
    let trace_path = args.data.join("traces-seed0").join(format!("{}.trace", args.trace));
    let (jobs, skipped) = load_trace(&trace_path, &models, args.quick.then_some(500))?;
    println!(
        "trace {}: {} jobs replayed, {} skipped (job type without measured throughput)",
        trace_path.display(),
        jobs.len(),
        skipped
    );
    let trace = compare("trace", &jobs, &cfg, &fs, &args)?;
    let synth_params = SyntheticParams { jobs: if args.quick { 150 } else { 400 }, ..SyntheticParams::default() };
    let synth = compare("synthetic", &generate(&synth_params, &models), &cfg, &fs, &args)?;

    let (round_ms, round_max, grants) = round_time(&models, 1000, 32, DEFAULT_F, 5)?;
    let (round_f0, round_f0_max, _) = round_time(&models, 1000, 32, 0.0, 3)?;
    println!("\narbiter round, 1000 apps, 256 GPUs free: f={DEFAULT_F}: {round_ms:.1} ms median ({round_max:.1} max, {grants} leases); f=0: {round_f0:.1} ms ({round_f0_max:.1} max)");

    let get = |v: &[Summary], name: &str| v.iter().find(|s| s.policy == name).cloned();
    let themis_name = format!("themis_f{DEFAULT_F:.2}");
    let th = get(&trace, &themis_name).context("Themis result")?;
    let fsh = get(&trace, "fairshare").context("fair share result")?;
    let max_of = |name: &str| get(&trace, name).map(|s| s.max_rho);
    let gain = fsh.max_rho / th.max_rho;
    println!("fairness gain (fair share max ρ / Themis max ρ, trace): {gain:.2}×; utilisation Themis {:.3} vs fair share {:.3}", th.utilization, fsh.utilization);
    let v = json!({
        "cluster": {
            "nodes": cfg.nodes, "gpus_per_node": cfg.gpus_per_node, "gpu": "v100", "round_s": cfg.round_s,
            "lease_s": args.lease_s, "restart_s": cfg.restart_s,
        },
        "trace": args.trace,
        "quick": args.quick,
        "trace_jobs": jobs.len(),
        "trace_jobs_skipped": skipped,
        "synthetic": {
            "jobs": synth_params.jobs, "mean_interarrival_s": synth_params.mean_interarrival_s,
            "demand_weights_1_2_4_8": synth_params.demand_weights, "median_duration_s": synth_params.median_duration_s,
            "sigma": synth_params.sigma, "seed": synth_params.seed,
        },
        "themis_default_f": DEFAULT_F,
        "results_trace": trace,
        "results_synthetic": synth,
        "max_rho_themis": th.max_rho,
        "max_rho_fairshare": fsh.max_rho,
        "max_rho_tiresias": max_of("tiresias"),
        "max_rho_gandiva": max_of("gandiva"),
        "max_rho_gavel_ftf": max_of("gavel_ftf"),
        "long_t_id_s": gatid::auction::sim::metrics::LONG_T_ID_S,
        "max_rho_themis_long": th.max_rho_long,
        "max_rho_fairshare_long": fsh.max_rho_long,
        "fairness_gain_long": fsh.max_rho_long / th.max_rho_long,
        "fairness_gain": gain,
        "utilization_themis": th.utilization,
        "utilization_fairshare": fsh.utilization,
        "round_ms_1000_apps": round_ms,
        "round_ms_1000_apps_max": round_max,
        "round_ms_1000_apps_f0": round_f0,
    });
    write_json(&args.out, &v)?;
    println!("wrote {}", args.out.display());
    Ok(())
}
