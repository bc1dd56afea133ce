//! Gavel's Philly-derived job traces and measured throughputs
//! (`shared/data/gavel/`, see its README): each trace line is a job
//! (type, …, total steps, arrival s, scale factor = GPUs); the throughput
//! table gives steps/s per (type, GPUs) packed (`v100`) and spread
//! (`v100_unconsolidated`). The simulated cluster is homogeneous V100s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::auction::app::AppSpec;
use crate::auction::throughput::ThroughputModel;

/// Errors reading the Gavel files.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {why}")]
    Parse { path: String, why: String },
}

/// Throughput models per job type, from `simulation_throughputs.json`.
pub type Throughputs = HashMap<String, Arc<ThroughputModel>>;

/// Parses a key of the table: `('ResNet-50 (batch size 128)', 4)`.
fn parse_key(k: &str) -> Option<(String, u32)> {
    let inner = k.strip_prefix('(')?.strip_suffix(')')?;
    let comma = inner.rfind(',')?;
    let name = inner[..comma].trim().trim_matches(|c| c == '\'' || c == '"').to_string();
    let gpus = inner[comma + 1..].trim().parse().ok()?;
    Some((name, gpus))
}

/// The packed (`worker`) and spread (`worker_unconsolidated`) models of every job type.
pub fn load_throughputs(path: &Path, worker: &str) -> Result<Throughputs, TraceError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: p.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| TraceError::Parse { path: p.clone(), why: e.to_string() })?;
    let table = |w: &str| -> HashMap<String, Vec<(u32, f64)>> {
        let mut out: HashMap<String, Vec<(u32, f64)>> = HashMap::new();
        if let Some(obj) = v.get(w).and_then(|x| x.as_object()) {
            for (k, entry) in obj {
                if let (Some((name, gpus)), Some(t)) = (parse_key(k), entry.get("null").and_then(|x| x.as_f64())) {
                    out.entry(name).or_default().push((gpus, t));
                }
            }
        }
        out
    };
    let packed = table(worker);
    let mut spread = table(&format!("{worker}_unconsolidated"));
    if packed.is_empty() {
        return Err(TraceError::Parse { path: p, why: format!("no `{worker}` throughputs") });
    }
    let mut out = Throughputs::new();
    for (name, pts) in packed {
        let s = spread.remove(&name).unwrap_or_default();
        let m = ThroughputModel::new(pts, s)
            .map_err(|e| TraceError::Parse { path: p.clone(), why: format!("{name}: {e}") })?;
        out.insert(name, Arc::new(m));
    }
    Ok(out)
}

/// The jobs of a Gavel trace whose type has a throughput model (first `limit` lines if given);
/// returns them and how many lines were skipped for an unknown type.
pub fn load_trace(
    path: &Path,
    models: &Throughputs,
    limit: Option<usize>,
) -> Result<(Vec<AppSpec>, usize), TraceError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: p.clone(), source })?;
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).take(limit.unwrap_or(usize::MAX)).enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let bad = |why: &str| TraceError::Parse { path: p.clone(), why: format!("line {}: {why}", n + 1) };
        if f.len() < 7 {
            return Err(bad("fewer than 7 fields"));
        }
        let steps: f64 = f[4].trim().parse().map_err(|_| bad("total_steps"))?;
        let arrival: f64 = f[5].trim().parse().map_err(|_| bad("arrival_time"))?;
        let gpus: u32 = f[6].trim().parse().map_err(|_| bad("scale_factor"))?;
        let Some(model) = models.get(f[0].trim()) else {
            skipped += 1;
            continue;
        };
        jobs.push(AppSpec {
            id: n as u64,
            name: f[0].trim().to_string(),
            demand: gpus.max(1),
            total_work: steps.max(1.0),
            model: Arc::clone(model),
            arrival,
        });
    }
    Ok((jobs, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_table_keys() {
        assert_eq!(parse_key("('ResNet-50 (batch size 128)', 4)"), Some(("ResNet-50 (batch size 128)".into(), 4)));
        assert_eq!(parse_key("('A3C', 1)"), Some(("A3C".into(), 1)));
        assert_eq!(parse_key("nonsense"), None);
    }
}
