//! What the simulator reports per policy: max ρ, Jain's index over ρ, JCT
//! mean and p95, GPU utilisation (GPU-seconds running jobs over GPUs × time:
//! while jobs arrive, and over the whole run).

use serde::Serialize;

use super::SimResult;

/// The summary of one policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub policy: String,
    pub jobs: usize,
    pub unfinished: usize,
    pub max_rho: f64,
    /// Max ρ over the jobs with T_id ≥ [`LONG_T_ID_S`] (the long-running apps Themis targets).
    pub max_rho_long: f64,
    /// How many jobs have T_id ≥ [`LONG_T_ID_S`].
    pub long_jobs: usize,
    pub median_rho: f64,
    pub jain_rho: f64,
    pub mean_jct_s: f64,
    pub p95_jct_s: f64,
    /// Busy GPU-seconds over GPUs × (first to last arrival).
    pub utilization: f64,
    /// Busy GPU-seconds over GPUs × (first arrival to last finish).
    pub utilization_span: f64,
    /// GPU-seconds idle while an app wanted more GPUs, over GPUs × (first to
    /// last arrival): 0 for a work-conserving policy.
    pub idle_wanted: f64,
    pub makespan_s: f64,
    pub mean_round_ms: f64,
}

/// T_id from which a job counts as long-running (one hour).
pub const LONG_T_ID_S: f64 = 3600.0;

/// The `q` quantile (nearest rank) of `v`, 0 when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Jain's fairness index (Σx)² / (n Σx²): 1 when all equal, 1/n at worst.
pub fn jain(v: &[f64]) -> f64 {
    let s: f64 = v.iter().sum();
    let s2: f64 = v.iter().map(|x| x * x).sum();
    if s2 == 0.0 {
        1.0
    } else {
        s * s / (v.len() as f64 * s2)
    }
}

pub fn summarize(r: &SimResult) -> Summary {
    let rhos: Vec<f64> = r.jobs.iter().map(|j| j.rho).collect();
    let jcts: Vec<f64> = r.jobs.iter().map(|j| j.finish - j.arrival).collect();
    // T_id = JCT / ρ.
    let long: Vec<f64> =
        r.jobs.iter().filter(|j| (j.finish - j.arrival) / j.rho >= LONG_T_ID_S).map(|j| j.rho).collect();
    Summary {
        policy: r.policy.clone(),
        jobs: r.jobs.len(),
        unfinished: r.unfinished,
        max_rho: rhos.iter().copied().fold(0.0, f64::max),
        max_rho_long: long.iter().copied().fold(0.0, f64::max),
        long_jobs: long.len(),
        median_rho: quantile(&rhos, 0.5),
        jain_rho: jain(&rhos),
        mean_jct_s: if jcts.is_empty() { 0.0 } else { jcts.iter().sum::<f64>() / jcts.len() as f64 },
        p95_jct_s: quantile(&jcts, 0.95),
        utilization: r.window_busy_gpu_s / (f64::from(r.gpus) * r.window_s),
        utilization_span: r.busy_gpu_s / (f64::from(r.gpus) * r.span_s),
        idle_wanted: r.window_idle_wanted_gpu_s / (f64::from(r.gpus) * r.window_s),
        makespan_s: r.span_s,
        mean_round_ms: if r.round_ms.is_empty() {
            0.0
        } else {
            r.round_ms.iter().sum::<f64>() / r.round_ms.len() as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_and_quantiles() {
        assert!((jain(&[2.0, 2.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.95), 4.0);
    }
}
