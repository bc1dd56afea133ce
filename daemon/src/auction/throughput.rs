//! An app's throughput (work units per second) over its GPU count and
//! placement: measured points, linear in between, extrapolated past the
//! largest measured count with the scaling of the last doubling.
//!
//! `packed` are measurements with all GPUs on one node, `spread` with them
//! over several (Gavel's `*_unconsolidated`); the spread curve starts from
//! the one-GPU packed value (one GPU is never spread), and an app with no
//! spread measurement runs spread at [`ASSUMED_SPREAD_RATIO`] of packed.

use serde::{Deserialize, Serialize};

use super::gpu::Placement;
use super::AuctionError;

/// Scaling exponent past the largest measured count when only one count is
/// measured: throughput ∝ GPUs^0.8 (an assumption, not a measurement).
pub const ASSUMED_SCALING_EXPONENT: f64 = 0.8;
/// Spread/packed throughput ratio when no count is measured both ways (assumed).
pub const ASSUMED_SPREAD_RATIO: f64 = 0.9;

/// Measured throughputs of one app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ThroughputModel {
    /// `(gpus, work/s)` on one node, gpus ascending, at least one point.
    packed: Vec<(u32, f64)>,
    /// `(gpus, work/s)` spread over nodes, gpus ascending (may be empty).
    spread: Vec<(u32, f64)>,
}

impl ThroughputModel {
    /// A model from measured points (any order); errors on no packed point, a
    /// zero GPU count, or a throughput that is not finite and > 0.
    pub fn new(mut packed: Vec<(u32, f64)>, mut spread: Vec<(u32, f64)>) -> Result<ThroughputModel, AuctionError> {
        if packed.is_empty() {
            return Err(AuctionError::Throughput("no packed measurement".into()));
        }
        for &(g, t) in packed.iter().chain(&spread) {
            if g == 0 || !t.is_finite() || t <= 0.0 {
                return Err(AuctionError::Throughput(format!("bad point ({g} GPUs, {t} work/s)")));
            }
        }
        packed.sort_by_key(|p| p.0);
        packed.dedup_by_key(|p| p.0);
        spread.sort_by_key(|p| p.0);
        spread.dedup_by_key(|p| p.0);
        Ok(ThroughputModel { packed, spread })
    }

    /// The same model, checked as [`ThroughputModel::new`] checks it (one
    /// that came over the wire or from etcd, deserialised unchecked).
    pub fn checked(self) -> Result<ThroughputModel, AuctionError> {
        ThroughputModel::new(self.packed, self.spread)
    }

    /// Linear scaling from one GPU's throughput (synthetic apps, tests).
    pub fn linear(one_gpu: f64, spread_ratio: f64) -> ThroughputModel {
        let packed = (0..7).map(|i| (1u32 << i, one_gpu * f64::from(1u32 << i))).collect::<Vec<_>>();
        let spread = packed.iter().skip(1).map(|&(g, t)| (g, t * spread_ratio)).collect();
        ThroughputModel { packed, spread }
    }

    /// Work per second on `gpus` GPUs (fractional: a time share) placed as `placement`.
    pub fn rate(&self, gpus: f64, placement: Placement) -> f64 {
        if gpus <= 0.0 {
            return 0.0;
        }
        let packed = interpolate(&self.packed, gpus);
        if placement == Placement::Packed || gpus <= 1.0 {
            return packed;
        }
        if self.spread.is_empty() {
            return packed * ASSUMED_SPREAD_RATIO;
        }
        // One GPU is the same spread or packed: anchor the spread curve there.
        let mut pts = Vec::with_capacity(self.spread.len() + 1);
        if self.spread[0].0 > 1 {
            pts.push((1, interpolate(&self.packed, 1.0)));
        }
        pts.extend_from_slice(&self.spread);
        interpolate(&pts, gpus)
    }
}

/// Piecewise linear through (0, 0) and `pts`; past the last point, the last
/// doubling's scaling exponent (or [`ASSUMED_SCALING_EXPONENT`]) continued.
fn interpolate(pts: &[(u32, f64)], g: f64) -> f64 {
    let mut prev = (0.0, 0.0);
    for &(x, y) in pts {
        let x = f64::from(x);
        if g <= x {
            return prev.1 + (y - prev.1) * (g - prev.0) / (x - prev.0);
        }
        prev = (x, y);
    }
    let (xn, yn) = prev;
    let e = match pts.len() {
        0 | 1 => ASSUMED_SCALING_EXPONENT,
        n => {
            let (xa, ya) = (f64::from(pts[n - 2].0), pts[n - 2].1);
            ((yn / ya).ln() / (xn / xa).ln()).clamp(0.0, 1.0)
        }
    };
    yn * (g / xn).powf(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_and_extrapolates() {
        let m = ThroughputModel::new(vec![(1, 10.0), (2, 18.0), (4, 30.0)], vec![(2, 12.0), (4, 20.0)]).unwrap();
        assert!((m.rate(0.5, Placement::Packed) - 5.0).abs() < 1e-9);
        assert!((m.rate(3.0, Placement::Packed) - 24.0).abs() < 1e-9);
        assert!((m.rate(3.0, Placement::Spread) - 16.0).abs() < 1e-9);
        // Past 4: exponent log(30/18)/log 2.
        let e = (30.0f64 / 18.0).ln() / 2f64.ln();
        assert!((m.rate(8.0, Placement::Packed) - 30.0 * 2f64.powf(e)).abs() < 1e-9);
        assert!(m.rate(8.0, Placement::Spread) < m.rate(8.0, Placement::Packed));
        assert_eq!(m.rate(0.0, Placement::Packed), 0.0);
    }

    #[test]
    fn rejects_bad_points() {
        assert!(ThroughputModel::new(vec![], vec![]).is_err());
        assert!(ThroughputModel::new(vec![(0, 1.0)], vec![]).is_err());
        assert!(ThroughputModel::new(vec![(1, f64::NAN)], vec![]).is_err());
    }
}
