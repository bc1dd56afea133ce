//! The table's checks: every metric the sources record is described, with its type,
//! under the Prometheus naming rules, and the exporter renders each HELP line.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;

/// `pub const NAME: &str = "value";` lines of this file: constant → metric name.
fn constants() -> BTreeMap<String, String> {
    include_str!("../names.rs")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const ")?.split_once(": &str = \""))
        .map(|(ident, rest)| (ident.to_string(), rest.trim_end_matches("\";").to_string()))
        .collect()
}

/// Every `counter!`/`gauge!`/`histogram!` in `src`: (file:line, kind, first argument).
fn recorded(src: &Path) -> Vec<(String, Kind, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            // These tests record from the table itself (the exporter test).
            if path.extension().is_none_or(|e| e != "rs")
                || path.ends_with("telemetry/names.rs")
                || path.ends_with("telemetry/names/tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (at, kind, arg) in macro_calls(&text) {
                let line = text[..at].matches('\n').count() + 1;
                out.push((format!("{}:{line}", path.display()), kind, arg));
            }
        }
    }
    out
}

/// (byte offset, kind, first argument) of each metric macro call in `text`,
/// outside `//` comments; `describe_counter!` and the like are not calls.
fn macro_calls(text: &str) -> Vec<(usize, Kind, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let code = line.find("//").map_or(line, |i| &line[..i]);
        for (mac, kind) in [("counter!(", Kind::Counter), ("gauge!(", Kind::Gauge), ("histogram!(", Kind::Histogram)] {
            for (i, _) in code.match_indices(mac) {
                let before = code[..i].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = text[offset + i + mac.len()..].trim_start();
                let arg = match rest.strip_prefix('"') {
                    Some(lit) => format!("\"{}\"", &lit[..lit.find('"').unwrap_or(0)]),
                    None => rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect(),
                };
                out.push((offset + i, kind, arg));
            }
        }
        offset += line.len();
    }
    out
}

#[test]
fn every_recorded_family_is_described_with_its_type() {
    let consts = constants();
    let table: BTreeMap<&str, &Family> = FAMILIES.iter().map(|f| (f.name, f)).collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let calls = recorded(&src);
    assert!(calls.len() >= FAMILIES.len(), "the scan found only {} metric calls", calls.len());
    let mut problems = Vec::new();
    for (at, kind, arg) in &calls {
        let name = match arg.strip_prefix('"') {
            Some(lit) => lit.trim_end_matches('"').to_string(),
            None => match consts.get(arg.rsplit("::").next().unwrap_or(arg)) {
                Some(v) => v.clone(),
                None => {
                    problems.push(format!(
                        "{at}: metric name `{arg}` is neither a literal nor a telemetry::names constant"
                    ));
                    continue;
                }
            },
        };
        match table.get(name.as_str()) {
            None => problems.push(format!("{at}: `{name}` has no entry (HELP text) in telemetry::names::FAMILIES")),
            Some(f) if f.kind != *kind => {
                problems.push(format!("{at}: `{name}` is recorded as a {kind:?} but described as a {:?}", f.kind))
            }
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "undescribed metrics:\n{}", problems.join("\n"));
}

#[test]
fn the_scan_sees_literals_constants_and_skips_describes_and_comments() {
    let text = "counter!(\"gati_a_total\", \"k\" => v).increment(1);\n\
        gauge!(\n    names::QUEUE_ROWS).set(1.0);\n\
        metrics::histogram!(BATCH_ROWS).record(1.0);\n\
        describe_counter!(\"gati_b_total\", \"x\");\n\
        // counter!(\"gati_c_total\")\n";
    let calls: Vec<(Kind, String)> = macro_calls(text).into_iter().map(|(_, k, a)| (k, a)).collect();
    assert_eq!(
        calls,
        vec![
            (Kind::Counter, "\"gati_a_total\"".to_string()),
            (Kind::Gauge, "names::QUEUE_ROWS".to_string()),
            (Kind::Histogram, "BATCH_ROWS".to_string()),
        ]
    );
    assert_eq!(constants().get("QUEUE_ROWS").map(String::as_str), Some("gati_queue_rows"));
    assert_eq!(constants().len(), FAMILIES.len(), "one constant per family");
}

#[test]
fn names_follow_the_prometheus_conventions() {
    let mut seen = std::collections::BTreeSet::new();
    for f in FAMILIES {
        assert!(seen.insert(f.name), "{} described twice", f.name);
        assert!(f.name.starts_with("gati_"), "{}", f.name);
        assert!(f.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{}", f.name);
        assert_eq!(f.kind == Kind::Counter, f.name.ends_with("_total"), "{}: only counters end in _total", f.name);
        assert!(f.help.len() > 20 && f.help.ends_with('.'), "{}: HELP `{}`", f.name, f.help);
        if f.name.ends_with("_seconds") {
            assert_eq!(f.unit, Some(Unit::Seconds), "{}", f.name);
        }
        if f.name.ends_with("_bytes") {
            assert_eq!(f.unit, Some(Unit::Bytes), "{}", f.name);
        }
    }
}

#[test]
fn the_exporter_renders_help_for_every_family() {
    let recorder = crate::telemetry::builder().unwrap().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        describe_all();
        for f in FAMILIES {
            match f.kind {
                Kind::Counter => metrics::counter!(f.name, "model" => "m").increment(1),
                Kind::Gauge => metrics::gauge!(f.name, "model" => "m").set(1.0),
                Kind::Histogram => metrics::histogram!(f.name, "model" => "m").record(1.0),
            }
        }
    });
    let text = handle.render();
    for f in FAMILIES {
        let kind = format!("{:?}", f.kind).to_lowercase();
        assert!(text.contains(&format!("# HELP {} {}\n", f.name, f.help)), "no HELP for {}:\n{text}", f.name);
        assert!(text.contains(&format!("# TYPE {} {kind}\n", f.name)), "no TYPE for {}:\n{text}", f.name);
    }
}
