//! Turns the Prometheus text the daemon exports into the summary `gatictl
//! stats` prints (so both show the same numbers from one source).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::names;
use super::table::{Align::Left, Align::Right, Table};

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
                "count": number(count),
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

/// A count as a JSON integer (Prometheus exports every value as a float);
/// anything that is not a whole number stays a float.
fn number(x: f64) -> Value {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The summary shown by `gatictl stats` (latencies in ms, batch sizes in
/// rows; counts are integers).
pub fn summarize(text: &str) -> Value {
    let samples = parse(text);
    let rows = |name: &str, keys: &[&str], value: fn(f64) -> Value| -> Vec<Value> {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| {
                let mut v = json!({ "count": value(s.value) });
                for k in keys {
                    v[*k] = json!(s.labels.get(*k).cloned().unwrap_or_default());
                }
                v
            })
            .collect()
    };
    let counts = |name: &str, keys: &[&str]| rows(name, keys, number);
    let total = |name: &str| number(samples.iter().filter(|s| s.name == name).map(|s| s.value).sum::<f64>());
    json!({
        "requests": counts(names::REQUESTS_TOTAL, &["model", "status"]),
        "latency_ms": histograms(&samples, names::REQUEST_DURATION_SECONDS, &["model"], 1e3),
        "stage_ms": histograms(&samples, names::STAGE_DURATION_SECONDS, &["model", "stage"], 1e3),
        "batch_rows": histograms(&samples, names::BATCH_ROWS, &["model"], 1.0),
        "queue_rows": counts(names::QUEUE_ROWS, &["model"]),
        "inflight": total(names::INFLIGHT_REQUESTS),
        "connections": total(names::CONNECTIONS),
        "refused": counts(names::CONNECTIONS_REFUSED_TOTAL, &["reason"]),
        "control": counts(names::CONTROL_REQUESTS_TOTAL, &["kind"]),
        "exits": counts(names::EXITS_TOTAL, &["model", "stage"]),
        "cache_live_disagreement": rows(names::CACHE_LIVE_DISAGREEMENT, &["model"], |x| json!(x)),
        "cache_memory_bytes": counts(names::CACHE_MEMORY_BYTES, &["model"]),
        "cache_cuts": cut_rows(&samples),
        "dags": dag_rows(&samples),
        "dag_latency_ms": histograms(&samples, names::DAG_REQUEST_DURATION_SECONDS, &["dag"], 1e3),
        "function_workers": counts(names::SCHED_FUNCTION_WORKERS, &["function"]),
        "cold_starts": total(names::SCHED_COLD_STARTS_TOTAL),
        "prestarts": total(names::SCHED_PRESTARTS_TOTAL),
    })
}

/// Per model and cut: the cut's current state and expected exit share.
fn cut_rows(samples: &[Sample]) -> Vec<Value> {
    let mut rows: BTreeMap<(String, u64), Value> = BTreeMap::new();
    for s in samples {
        let (Some(model), Some(cut)) = (s.labels.get("model"), s.labels.get("cut").and_then(|c| c.parse::<u64>().ok()))
        else {
            continue;
        };
        let row = rows.entry((model.clone(), cut)).or_insert_with(|| json!({ "model": model, "cut": cut.to_string() }));
        match s.name.as_str() {
            names::CACHE_CUT_STATE if s.value == 1.0 => row["state"] = json!(s.labels.get("state")),
            names::CACHE_CUT_EXIT_SHARE => row["exit_share"] = json!(s.value),
            _ => {}
        }
    }
    rows.into_values().filter(|r| r.get("state").is_some()).collect()
}

/// Per DAG: deadline met / missed / failed (scheduler counters) and SGSs serving it.
fn dag_rows(samples: &[Sample]) -> Vec<Value> {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    for s in samples {
        let field = match s.name.as_str() {
            names::DAG_DEADLINE_MET_TOTAL => "met",
            names::DAG_DEADLINE_MISSED_TOTAL => "missed",
            names::DAG_FAILED_TOTAL => "failed",
            names::DAG_SGS => "sgs",
            _ => continue,
        };
        let Some(dag) = s.labels.get("dag") else { continue };
        rows.entry(dag.clone()).or_insert_with(|| json!({ "dag": dag }))[field] = number(s.value);
    }
    rows.into_values().collect()
}

/// A summary field as table text: integers without a fraction, `-` when absent.
fn count(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    }
}

/// Milliseconds (or mean rows) with three decimals, `-` when absent.
fn millis(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.3}"))
}

/// The string field `key` of a summary row.
fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or("").to_string()
}

/// The rows of summary list `key`.
fn list<'a>(s: &'a Value, key: &str) -> &'a [Value] {
    s[key].as_array().map_or(&[][..], Vec::as_slice)
}

/// The first row of list `key` whose `field` is `value`.
fn find<'a>(s: &'a Value, key: &str, field: &str, value: &str) -> Option<&'a Value> {
    list(s, key).iter().find(|r| r[field] == value)
}

/// The DAG section of [`render`] (empty without DAGs).
fn render_dags(s: &Value, out: &mut String) {
    let mut t = Table::new(&[
        ("dag", Left),
        ("met", Right),
        ("missed", Right),
        ("failed", Right),
        ("met %", Right),
        ("sgs", Right),
        ("p50 ms", Right),
        ("p99 ms", Right),
    ]);
    for d in list(s, "dags") {
        let name = text(d, "dag");
        let n = |k: &str| d[k].as_f64().unwrap_or(0.0);
        let total = n("met") + n("missed") + n("failed");
        let lat = find(s, "dag_latency_ms", "dag", &name);
        let q = |k: &str| lat.map_or("-".into(), |l| millis(&l[k]));
        t.row(vec![
            name.clone(),
            count(&d["met"]),
            count(&d["missed"]),
            count(&d["failed"]),
            if total > 0.0 { format!("{:.2}", 100.0 * n("met") / total) } else { "-".into() },
            count(&d["sgs"]),
            q("p50"),
            q("p99"),
        ]);
    }
    if t.is_empty() {
        return;
    }
    out.push('\n');
    t.render(out);
    let workers: Vec<String> = list(s, "function_workers")
        .iter()
        .map(|w| format!("{}={}", w["function"].as_str().unwrap_or("?"), count(&w["count"])))
        .collect();
    out.push_str(&format!(
        "workers: {}  cold starts: {}  prestarts: {}\n",
        workers.join(" "),
        count(&s["cold_starts"]),
        count(&s["prestarts"])
    ));
}

/// The cache section of [`render`] (empty without caches).
fn render_caches(s: &Value, out: &mut String) {
    let mut exits = Table::new(&[("exits", Left), ("stage", Right), ("rows", Right)]);
    for r in list(s, "exits") {
        exits.row(vec![text(r, "model"), text(r, "stage"), count(&r["count"])]);
    }
    if exits.is_empty() {
        return;
    }
    out.push_str("\n(exit stage 0 = the input cut; the last stage = the full model)\n");
    exits.render(out);
    let mut caches = Table::new(&[("caches", Left), ("live disagreement", Right), ("memory bytes", Right)]);
    for r in list(s, "cache_live_disagreement") {
        let model = text(r, "model");
        let mem = find(s, "cache_memory_bytes", "model", &model).map_or("-".into(), |m| count(&m["count"]));
        caches.row(vec![model, r["count"].as_f64().map_or("-".into(), |x| format!("{x:.4}")), mem]);
    }
    if !caches.is_empty() {
        out.push('\n');
        caches.render(out);
    }
    let mut cuts = Table::new(&[("cuts", Left), ("cut", Right), ("state", Left), ("expected exits", Right)]);
    for r in list(s, "cache_cuts") {
        let share = r["exit_share"].as_f64().map_or("-".into(), |x| format!("{:.1} %", x * 100.0));
        cuts.row(vec![text(r, "model"), text(r, "cut"), text(r, "state"), share]);
    }
    if !cuts.is_empty() {
        out.push_str("\n(state: why a cut answers or not; see docs/operations.md, Caches)\n");
        cuts.render(out);
    }
}

/// Human-readable tables of a summary.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!("connections: {}  in flight: {}", count(&s["connections"]), count(&s["inflight"])));
    let refused: Vec<String> =
        list(s, "refused").iter().map(|r| format!("{}={}", text(r, "reason"), count(&r["count"]))).collect();
    if !refused.is_empty() {
        out.push_str(&format!("  refused: {}", refused.join(" ")));
    }
    out.push_str("\n\n");

    let mut requests = Table::new(&[("model", Left), ("status", Left), ("requests", Right)]);
    for r in list(s, "requests") {
        requests.row(vec![text(r, "model"), text(r, "status"), count(&r["count"])]);
    }
    requests.render(&mut out);

    let mut latency = Table::new(&[
        ("latency (ms)", Left),
        ("stage", Right),
        ("count", Right),
        ("mean", Right),
        ("p50", Right),
        ("p99", Right),
    ]);
    let all = list(s, "latency_ms").iter().map(|r| (r, "all".to_string()));
    for (r, stage) in all.chain(list(s, "stage_ms").iter().map(|r| (r, text(r, "stage")))) {
        latency.row(vec![
            text(r, "model"),
            stage,
            count(&r["count"]),
            millis(&r["mean"]),
            millis(&r["p50"]),
            millis(&r["p99"]),
        ]);
    }
    out.push('\n');
    latency.render(&mut out);

    let mut batches = Table::new(&[("batches", Left), ("count", Right), ("mean rows", Right), ("queued rows", Right)]);
    for r in list(s, "batch_rows") {
        let model = text(r, "model");
        let queued = find(s, "queue_rows", "model", &model).map_or("0".into(), |q| count(&q["count"]));
        batches.row(vec![model, count(&r["count"]), millis(&r["mean"]), queued]);
    }
    out.push('\n');
    batches.render(&mut out);

    render_caches(s, &mut out);
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

    #[test]
    fn counts_render_as_integers_in_aligned_columns() {
        let text = "gati_requests_total{model=\"m\",status=\"ok\"} 12\n\
            gati_requests_total{model=\"a-much-longer-model-name\",status=\"deadline_unmeetable\"} 3\n\
            gati_connections 2\n\
            gati_inflight_requests 0\n\
            gati_batch_rows_bucket{model=\"m\",le=\"1\"} 4\n\
            gati_batch_rows_bucket{model=\"m\",le=\"+Inf\"} 4\n\
            gati_batch_rows_sum{model=\"m\"} 4\n\
            gati_batch_rows_count{model=\"m\"} 4\n\
            gati_queue_rows{model=\"m\"} 0\n";
        let s = summarize(text);
        assert!(s["requests"][0]["count"].is_u64() && s["connections"].is_u64(), "{s}");
        assert!(s["batch_rows"][0]["count"].is_u64(), "{s}");
        let r = render(&s);
        assert!(!r.contains(".0 ") && !r.contains(".0\n"), "a count printed as a float:\n{r}");
        assert!(r.starts_with("connections: 2  in flight: 0\n"), "{r}");
        let lines: Vec<&str> = r.lines().skip_while(|l| !l.starts_with("model")).take(3).collect();
        let end = lines[0].len();
        assert!(lines.iter().all(|l| l.len() == end), "requests column not aligned:\n{r}");
        assert!(lines[1].ends_with(" 12") && lines[2].ends_with(" 3"), "{r}");
        assert_eq!(lines[0].find("status"), lines[2].find("deadline_unmeetable"), "{r}");
    }
}
