//! Turns the Prometheus text the daemon exports into the summary `gatictl
//! stats` prints (so both show the same numbers from one source).

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One sample line: metric name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut map = BTreeMap::new();
        for pair in split_labels(labels) {
            if let Some((k, v)) = pair.split_once('=') {
                map.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
            }
        }
        out.push(Sample { name: name.to_string(), labels: map, value });
    }
    out
}

/// The value of metric `name` labelled `model="<model>"` in Prometheus `text`.
pub fn model_value(text: &str, name: &str, model: &str) -> Option<f64> {
    parse(text)
        .into_iter()
        .find(|s| s.name == name && s.labels.get("model").is_some_and(|m| m == model))
        .map(|s| s.value)
}

/// Splits `a="x",b="y,z"` at commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, ch) in s.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        parts.push(&s[start..]);
    }
    parts
}

/// Quantile from cumulative histogram buckets (linear inside a bucket).
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().find(|(le, _)| le.is_infinite())?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_c) = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let frac = if c > prev_c { (rank - prev_c) / (c - prev_c) } else { 1.0 };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_c) = (le, c);
    }
    None
}

/// Cumulative buckets (le, count), sum, count.
type Histogram = (Vec<(f64, f64)>, f64, f64);

/// Histograms of `name` grouped by the given label keys: (labels, mean, p50, p99, count).
fn histograms(samples: &[Sample], name: &str, keys: &[&str], scale: f64) -> Vec<Value> {
    let mut groups: BTreeMap<Vec<String>, Histogram> = BTreeMap::new();
    for s in samples {
        let key: Vec<String> = keys.iter().map(|k| s.labels.get(*k).cloned().unwrap_or_default()).collect();
        if s.name == format!("{name}_bucket") {
            let le = s.labels.get("le").map_or(f64::INFINITY, |v| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap_or(f64::INFINITY)
                }
            });
            groups.entry(key).or_default().0.push((le, s.value));
        } else if s.name == format!("{name}_sum") {
            groups.entry(key).or_default().1 = s.value;
        } else if s.name == format!("{name}_count") {
            groups.entry(key).or_default().2 = s.value;
        }
    }
    groups
        .into_iter()
        .map(|(key, (mut buckets, sum, count))| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut v = json!({
                "count": count,
                "mean": if count > 0.0 { sum / count * scale } else { 0.0 },
                "p50": quantile(&buckets, 0.5).map(|x| x * scale),
                "p99": quantile(&buckets, 0.99).map(|x| x * scale),
            });
            for (k, val) in keys.iter().zip(key) {
                v[*k] = json!(val);
            }
            v
        })
        .collect()
}

/// The summary shown by `gatictl stats` (latencies in ms, batch sizes in rows).
pub fn summarize(text: &str) -> Value {
    let samples = parse(text);
    let counters = |name: &str, keys: &[&str]| -> Vec<Value> {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| {
                let mut v = json!({ "count": s.value });
                for k in keys {
                    v[*k] = json!(s.labels.get(*k).cloned().unwrap_or_default());
                }
                v
            })
            .collect()
    };
    let gauge = |name: &str| samples.iter().filter(|s| s.name == name).map(|s| s.value).sum::<f64>();
    json!({
        "requests": counters("gati_requests_total", &["model", "status"]),
        "latency_ms": histograms(&samples, "gati_request_duration_seconds", &["model"], 1e3),
        "stage_ms": histograms(&samples, "gati_stage_duration_seconds", &["model", "stage"], 1e3),
        "batch_rows": histograms(&samples, "gati_batch_rows", &["model"], 1.0),
        "queue_rows": counters("gati_queue_rows", &["model"]),
        "inflight": gauge("gati_inflight_requests"),
        "connections": gauge("gati_connections"),
        "control": counters("gati_control_requests_total", &["kind"]),
        "exits": counters("gati_exits_total", &["model", "stage"]),
        "cache_live_disagreement": counters("gati_cache_live_disagreement", &["model"]),
        "cache_memory_bytes": counters("gati_cache_memory_bytes", &["model"]),
        "dags": dag_rows(&samples),
        "dag_latency_ms": histograms(&samples, "gati_dag_request_duration_seconds", &["dag"], 1e3),
        "function_workers": counters("gati_sched_function_workers", &["function"]),
        "cold_starts": gauge("gati_sched_cold_starts_total"),
        "prestarts": gauge("gati_sched_prestarts_total"),
    })
}

/// Per DAG: deadline met / missed / failed (scheduler counters) and SGSs serving it.
fn dag_rows(samples: &[Sample]) -> Vec<Value> {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    for s in samples {
        let field = match s.name.as_str() {
            "gati_dag_deadline_met_total" => "met",
            "gati_dag_deadline_missed_total" => "missed",
            "gati_dag_failed_total" => "failed",
            "gati_dag_sgs" => "sgs",
            _ => continue,
        };
        let Some(dag) = s.labels.get("dag") else { continue };
        rows.entry(dag.clone()).or_insert_with(|| json!({ "dag": dag }))[field] = json!(s.value);
    }
    rows.into_values().collect()
}

/// The DAG section of [`render`] (empty without DAGs).
fn render_dags(s: &Value, out: &mut String) {
    let dags = s["dags"].as_array().map_or(&[][..], Vec::as_slice);
    if dags.is_empty() {
        return;
    }
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    out.push_str(&format!(
        "\n{:<16} {:>10} {:>10} {:>8} {:>8} {:>5} {:>10} {:>10}\n",
        "dag", "met", "missed", "failed", "met %", "sgs", "p50 ms", "p99 ms"
    ));
    for d in dags {
        let name = d["dag"].as_str().unwrap_or("");
        let (met, missed, failed) = (n(&d["met"]), n(&d["missed"]), n(&d["failed"]));
        let total = met + missed + failed;
        let lat = s["dag_latency_ms"].as_array().into_iter().flatten().find(|l| l["dag"] == name);
        let q = |k: &str| lat.and_then(|l| l[k].as_f64()).map_or("-".to_string(), |x| format!("{x:.3}"));
        out.push_str(&format!(
            "{name:<16} {met:>10} {missed:>10} {failed:>8} {:>8} {:>5} {:>10} {:>10}\n",
            if total > 0.0 { format!("{:.2}", 100.0 * met / total) } else { "-".into() },
            n(&d["sgs"]),
            q("p50"),
            q("p99")
        ));
    }
    let workers: Vec<String> = s["function_workers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| format!("{}={}", w["function"].as_str().unwrap_or("?"), w["count"]))
        .collect();
    out.push_str(&format!(
        "workers: {}  cold starts: {}  prestarts: {}\n",
        workers.join(" "),
        s["cold_starts"],
        s["prestarts"]
    ));
}

/// Human-readable table of a summary.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    out.push_str(&format!("connections: {}  in flight: {}\n\n", s["connections"], s["inflight"]));
    out.push_str(&format!("{:<16} {:<22} {:>10}\n", "model", "status", "requests"));
    for r in s["requests"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:<22} {:>10}\n",
            r["model"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["count"]
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
        "latency (ms)", "stage", "count", "mean", "p50", "p99"
    ));
    for r in s["latency_ms"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
            r["model"].as_str().unwrap_or(""),
            "all",
            r["count"],
            f(&r["mean"]),
            f(&r["p50"]),
            f(&r["p99"])
        ));
    }
    for r in s["stage_ms"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
            r["model"].as_str().unwrap_or(""),
            r["stage"].as_str().unwrap_or(""),
            r["count"],
            f(&r["mean"]),
            f(&r["p50"]),
            f(&r["p99"])
        ));
    }
    out.push_str(&format!("\n{:<16} {:>10} {:>10} {:>10}\n", "batches", "count", "mean rows", "queued"));
    for r in s["batch_rows"].as_array().into_iter().flatten() {
        let model = r["model"].as_str().unwrap_or("");
        let queued = s["queue_rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["model"] == model)
            .map_or(json!(0), |q| q["count"].clone());
        out.push_str(&format!("{:<16} {:>10} {:>10} {:>10}\n", model, r["count"], f(&r["mean"]), queued));
    }
    let exits = s["exits"].as_array().map_or(&[][..], Vec::as_slice);
    if !exits.is_empty() {
        out.push_str(&format!(
            "\n{:<16} {:>6} {:>10}   (stage 0 = input cut; the last stage = full model)\n",
            "exits", "stage", "rows"
        ));
        for r in exits {
            out.push_str(&format!(
                "{:<16} {:>6} {:>10}\n",
                r["model"].as_str().unwrap_or(""),
                r["stage"].as_str().unwrap_or(""),
                r["count"]
            ));
        }
        for r in s["cache_live_disagreement"].as_array().into_iter().flatten() {
            let model = r["model"].as_str().unwrap_or("");
            let mem = s["cache_memory_bytes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["model"] == model)
                .map_or(json!(0), |m| m["count"].clone());
            out.push_str(&format!(
                "{model:<16} live disagreement {:.4}, cache memory {mem} bytes\n",
                r["count"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    render_dags(s, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_histogram_quantiles() {
        let text = "# TYPE x histogram\n\
            gati_request_duration_seconds_bucket{model=\"m\",le=\"0.001\"} 50\n\
            gati_request_duration_seconds_bucket{model=\"m\",le=\"0.002\"} 100\n\
            gati_request_duration_seconds_bucket{model=\"m\",le=\"+Inf\"} 100\n\
            gati_request_duration_seconds_sum{model=\"m\"} 0.15\n\
            gati_request_duration_seconds_count{model=\"m\"} 100\n\
            gati_requests_total{model=\"m\",status=\"ok\"} 100\n";
        let s = summarize(text);
        let l = &s["latency_ms"][0];
        assert_eq!(l["model"], "m");
        assert!((l["p50"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert!((l["mean"].as_f64().unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(s["requests"][0]["count"], 100.0);
    }

    #[test]
    fn dag_section_from_scheduler_counters() {
        let text = "gati_dag_deadline_met_total{dag=\"classify\"} 99\n\
            gati_dag_deadline_missed_total{dag=\"classify\"} 1\n\
            gati_dag_failed_total{dag=\"classify\"} 0\n\
            gati_dag_sgs{dag=\"classify\"} 2\n\
            gati_sched_function_workers{function=\"preprocess\"} 3\n\
            gati_sched_cold_starts_total 4\n";
        let s = summarize(text);
        assert_eq!(s["dags"][0]["dag"], "classify");
        assert_eq!(s["dags"][0]["met"], 99.0);
        assert_eq!(s["cold_starts"], 4.0);
        let r = render(&s);
        assert!(r.contains("classify") && r.contains("99.00") && r.contains("preprocess=3"), "{r}");
    }
}
