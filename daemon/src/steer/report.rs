//! `gatictl steer`: the steering status from Health as a few lines of text.

use std::fmt::Write;

use serde_json::Value;

/// Renders Health's `steer` object (mode and why, table, per-SGS load, counters).
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    if s.is_null() {
        return "steering: not reported by this daemon\n".into();
    }
    let mode = s["mode"].as_str().unwrap_or("?");
    let _ = write!(out, "mode: {mode} (configured: {})", s["configured"].as_str().unwrap_or("?"));
    if let Some(why) = s["why"].as_str() {
        let _ = write!(out, "  why: {why}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "udp: {}  build: {}", s["udp"].as_str().unwrap_or("off"), s["build"].as_str().unwrap_or("?"));
    let _ = writeln!(out, "routes (DAG id -> SGS:weight):");
    for d in s["table"].as_array().into_iter().flatten() {
        let routes: Vec<String> =
            d["routes"].as_array().into_iter().flatten().map(|r| format!("{}:{}", r["sgs"], r["weight"])).collect();
        let _ = writeln!(out, "  {:>10} -> {}", d["dag"], routes.join(" "));
    }
    let _ = writeln!(out, "load (SGS: queued / idle workers):");
    for l in s["load"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  sgs {}: {} / {}", l["sgs"], l["queued"], l["idle"]);
    }
    let counters = |out: &mut String, title: &str, c: &Value| {
        let names = ["steered", "fallback", "other", "malformed", "dropped"];
        let vals: Vec<String> = names.iter().map(|n| format!("{n} {}", c[*n].as_u64().unwrap_or(0))).collect();
        let _ = writeln!(out, "{title:>8}: {}", vals.join("  "));
    };
    counters(&mut out, "kernel", &s["kernel_counters"]);
    counters(&mut out, "udp I/O", &s["udp_counters"]);
    let u = &s["unix"];
    if !u.is_null() {
        let _ = write!(out, "unix: {}", u["mode"].as_str().unwrap_or("?"));
        if let Some(why) = u["why"].as_str() {
            let _ = write!(out, "  why: {why}");
        }
        let _ = writeln!(out, "  connections adopted: {}", u["adopted"].as_u64().unwrap_or(0));
        counters(&mut out, "verdict", &u["kernel_counters"]);
        counters(&mut out, "unix SGS", &u["sgs_counters"]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_mode_routes_and_counters() {
        let s = serde_json::json!({
            "mode": "userspace", "configured": "auto", "why": "no BTF", "udp": "127.0.0.1:9", "build": "ok",
            "table": [{ "dag": 42, "routes": [{ "sgs": 0, "weight": 1 }, { "sgs": 1, "weight": 1 }] }],
            "load": [{ "sgs": 0, "queued": 3, "idle": 1 }],
            "kernel_counters": { "steered": 0 }, "udp_counters": { "steered": 7, "malformed": 1 },
            "unix": { "mode": "kernel", "why": null, "adopted": 2,
                      "kernel_counters": { "steered": 5, "malformed": 2 }, "sgs_counters": { "steered": 5 } },
        });
        let t = render(&s);
        assert!(t.contains("mode: userspace (configured: auto)  why: no BTF"), "{t}");
        assert!(t.contains("42 -> 0:1 1:1"), "{t}");
        assert!(t.contains("sgs 0: 3 / 1"), "{t}");
        assert!(t.contains("steered 7  fallback 0"), "{t}");
        assert!(t.contains("unix: kernel  connections adopted: 2"), "{t}");
        assert!(t.contains("verdict: steered 5  fallback 0  other 0  malformed 2"), "{t}");
        assert_eq!(render(&Value::Null), "steering: not reported by this daemon\n");
    }
}
