//! A synthetic job generator with documented parameters (defaults in
//! [`SyntheticParams::default`]):
//!
//! - Poisson arrivals, mean inter-arrival `mean_interarrival_s`;
//! - demand drawn from `demand_weights` over 1, 2, 4, 8 GPUs;
//! - job type uniform over the throughput table's types (so placement
//!   sensitivity is the measured one);
//! - duration on its full demand, packed: log-normal with median
//!   `median_duration_s` and shape `sigma`; work = duration × that rate.
//!
//! Deterministic for a seed (splitmix64).

use std::sync::Arc;

use crate::auction::app::AppSpec;
use crate::auction::gpu::Placement;

use super::trace::Throughputs;

/// The generator's parameters.
#[derive(Clone, Debug)]
pub struct SyntheticParams {
    pub jobs: usize,
    pub mean_interarrival_s: f64,
    /// Weights of 1, 2, 4, 8 GPUs.
    pub demand_weights: [f64; 4],
    pub median_duration_s: f64,
    pub sigma: f64,
    pub seed: u64,
}

impl Default for SyntheticParams {
    fn default() -> Self {
        SyntheticParams {
            jobs: 400,
            mean_interarrival_s: 300.0,
            demand_weights: [0.5, 0.2, 0.2, 0.1],
            median_duration_s: 4.0 * 3600.0,
            sigma: 1.2,
            seed: 1,
        }
    }
}

/// splitmix64: small, seeded, good enough for workloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Jobs drawn as the module doc says (ids from 0).
pub fn generate(p: &SyntheticParams, models: &Throughputs) -> Vec<AppSpec> {
    let mut names: Vec<&String> = models.keys().collect();
    names.sort();
    let mut r = Rng::new(p.seed);
    let total_w: f64 = p.demand_weights.iter().sum();
    let mut t = 0.0;
    (0..p.jobs)
        .map(|id| {
            t += -p.mean_interarrival_s * r.unit().ln();
            let mut x = r.unit() * total_w;
            let mut demand = 8;
            for (i, w) in p.demand_weights.iter().enumerate() {
                if x < *w {
                    demand = 1 << i;
                    break;
                }
                x -= w;
            }
            let name = names[(r.next_u64() % names.len().max(1) as u64) as usize].clone();
            let model = Arc::clone(&models[&name]);
            let duration = p.median_duration_s * (p.sigma * r.normal()).exp();
            let total_work = duration * model.rate(f64::from(demand), Placement::Packed);
            AppSpec { id: id as u64, name, demand, total_work, model, arrival: t }
        })
        .collect()
}
