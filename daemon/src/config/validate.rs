//! Collects every problem in a config file: syntax, unknown keys, wrong types,
//! and semantic checks, each with its key path and line.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use toml_edit::{ImDocument, Item, Value as EditValue};

use super::dag::{DagConfig, FunctionConfig};
use super::model::{CacheKind, CacheSelector, Config, Cuts, MetricsConfig, ModelConfig, RuntimeConfig, ServerConfig};
use super::ConfigIssue;

/// Deserializes section by section so one bad section does not hide the others.
/// Unknown keys are reported and dropped, then deserialization is retried, so every
/// unknown key and every later type error is listed.
pub(super) fn deserialize_all(text: &str) -> Result<(Config, Vec<ConfigIssue>), Vec<ConfigIssue>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        vec![ConfigIssue {
            key: "<file>".into(),
            line: e.span().map(|s| line_at(text, s.start)),
            message: e.message().trim().to_string(),
        }]
    })?;
    let lines = Lines::new(text);
    let mut issues = Vec::new();
    for key in table.keys() {
        if !["server", "runtime", "metrics", "models", "functions", "dags", "dispatch", "steer", "cluster"]
            .contains(&key.as_str())
        {
            issues.push(lines.issue(
                &[Seg::Key(key)],
                format!(
                    "unknown section `{key}` (expected server, runtime, metrics, models, functions, dags, dispatch, steer, cluster)"
                ),
            ));
        }
    }
    let server = section::<ServerConfig>(&table, "server", &lines, &mut issues).unwrap_or_default();
    let runtime = section::<RuntimeConfig>(&table, "runtime", &lines, &mut issues).unwrap_or_default();
    let metrics = section::<MetricsConfig>(&table, "metrics", &lines, &mut issues).unwrap_or_default();
    let models = array::<ModelConfig>(&table, "models", &lines, &mut issues);
    let functions = array::<FunctionConfig>(&table, "functions", &lines, &mut issues);
    let dags = array::<DagConfig>(&table, "dags", &lines, &mut issues);
    let dispatch = section::<super::DispatchConfig>(&table, "dispatch", &lines, &mut issues).unwrap_or_default();
    if dispatch.shed && !(dispatch.core_budget && dispatch.order == super::DispatchOrder::LeastSlack) {
        let path = [Seg::Key("dispatch"), Seg::Key("shed")];
        issues.push(lines.issue(&path, "shed = true needs core_budget = true and order = \"least_slack\"".into()));
    }
    let steer = section::<super::SteerConfig>(&table, "steer", &lines, &mut issues).unwrap_or_default();
    let cluster = section::<super::ClusterConfig>(&table, "cluster", &lines, &mut issues);
    Ok((Config { server, runtime, metrics, models, functions, dags, dispatch, steer, cluster }, issues))
}

/// An array of tables (`[[key]]`), entry by entry.
fn array<T: DeserializeOwned>(table: &toml::Table, key: &str, lines: &Lines, issues: &mut Vec<ConfigIssue>) -> Vec<T> {
    let mut out = Vec::new();
    match table.get(key) {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let path = [Seg::Key(key), Seg::Index(i)];
                if let Some(m) = de_value::<T>(item.clone(), &path, lines, issues) {
                    out.push(m);
                }
            }
        }
        Some(_) => issues.push(lines.issue(&[Seg::Key(key)], format!("must be an array of tables ([[{key}]])"))),
    }
    out
}

fn section<T: DeserializeOwned>(
    table: &toml::Table,
    key: &str,
    lines: &Lines,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    let value = table.get(key)?.clone();
    de_value(value, &[Seg::Key(key)], lines, issues)
}

fn de_value<T: DeserializeOwned>(
    mut value: toml::Value,
    path: &[Seg],
    lines: &Lines,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    // Bounded: each retry removes one key.
    for _ in 0..64 {
        match value.clone().try_into::<T>() {
            Ok(t) => return Some(t),
            Err(e) => {
                let msg = e.message().trim().to_string();
                if let Some(field) = unknown_field(&msg) {
                    if let Some(sub) = remove_key(&mut value, &field) {
                        let mut p = path.to_vec();
                        p.extend(sub.iter().map(|s| Seg::Owned(s.clone())));
                        issues.push(lines.issue(&p, msg));
                        continue;
                    }
                }
                let mut p = path.to_vec();
                p.extend(culprit::<T>(&value).map(Seg::Owned));
                issues.push(lines.issue(&p, msg));
                return None;
            }
        }
    }
    None
}

/// The key of table `value` that a (non-unknown-field) error is about: the
/// one whose removal makes `value` parse, or leaves only "missing field" for
/// that key. serde names the type, not the key, in "invalid type: string
/// \"many\", expected usize"; an operator needs to know which key.
fn culprit<T: DeserializeOwned>(value: &toml::Value) -> Option<String> {
    let toml::Value::Table(t) = value else { return None };
    t.keys().find_map(|k| {
        let mut without = t.clone();
        without.remove(k);
        match toml::Value::Table(without).try_into::<T>() {
            Ok(_) => Some(k.clone()),
            Err(e) if e.message().trim() == format!("missing field `{k}`") => Some(k.clone()),
            Err(_) => None,
        }
    })
}

/// `unknown field `x`, expected ...` → `x`.
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Removes the first key named `name` (breadth-first) and returns its path below `value`.
fn remove_key(value: &mut toml::Value, name: &str) -> Option<Vec<String>> {
    let toml::Value::Table(t) = value else {
        return None;
    };
    if t.remove(name).is_some() {
        return Some(vec![name.to_string()]);
    }
    for (k, v) in t.iter_mut() {
        if let Some(mut sub) = remove_key(v, name) {
            sub.insert(0, k.clone());
            return Some(sub);
        }
    }
    None
}

/// Semantic checks on a deserialized config.
pub(super) fn check(c: &Config, text: &str) -> Vec<ConfigIssue> {
    let lines = Lines::new(text);
    let mut out = Vec::new();
    let mut bad = |path: &[Seg], msg: String| out.push(lines.issue(path, msg));
    let s = &c.server;
    let sk = |k: &'static str| [Seg::Key("server"), Seg::Key(k)];
    if u32::from_str_radix(s.socket_mode.trim_start_matches("0o"), 8).map_or(true, |m| m > 0o777) {
        bad(&sk("socket_mode"), format!("`{}` is not an octal file mode like \"0660\"", s.socket_mode));
    }
    if !(1..=64).contains(&s.io_threads) {
        bad(&sk("io_threads"), format!("must be 1..=64, got {}", s.io_threads));
    }
    if !(1024..=(1 << 30)).contains(&s.max_frame_bytes) {
        bad(&sk("max_frame_bytes"), format!("must be 1 KiB..=1 GiB, got {}", s.max_frame_bytes));
    }
    if s.max_inflight_per_conn == 0 {
        bad(&sk("max_inflight_per_conn"), "must be at least 1".into());
    }
    if s.busy_poll_us > 1000 {
        bad(&sk("busy_poll_us"), format!("must be at most 1000 us, got {}", s.busy_poll_us));
    }
    if s.max_queued_bytes < u64::from(s.max_frame_bytes) || s.max_queued_bytes > (1 << 40) {
        bad(
            &sk("max_queued_bytes"),
            format!(
                "must be at least max_frame_bytes ({}) and at most 1 TiB, got {}",
                s.max_frame_bytes, s.max_queued_bytes
            ),
        );
    }
    if s.max_connections == 0 {
        bad(&sk("max_connections"), "must be at least 1".into());
    }
    if s.socket.as_os_str().len() >= 108 {
        bad(&sk("socket"), "path longer than 107 bytes does not fit a sockaddr_un".into());
    }
    if let Some(addr) = c.metrics.listen {
        if !addr.ip().is_loopback() {
            bad(&[Seg::Key("metrics"), Seg::Key("listen")], format!("{addr} is not a loopback address"));
        }
    }
    if let Some(lib) = &c.runtime.ort_library {
        if !lib.is_file() {
            bad(&[Seg::Key("runtime"), Seg::Key("ort_library")], format!("{} does not exist", lib.display()));
        }
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut ids: HashMap<u32, &str> = HashMap::new();
    for (i, m) in c.models.iter().enumerate() {
        let at = |k: &'static str| [Seg::Key("models"), Seg::Index(i), Seg::Key(k)];
        let at_in = |k: &'static str| [Seg::Key("models"), Seg::Index(i), Seg::Key("input"), Seg::Key(k)];
        check_model(m, &mut |k, nested, msg| {
            if nested {
                bad(&at_in(k), msg)
            } else {
                bad(&at(k), msg)
            }
        });
        if let Some(prev) = names.insert(&m.name, i) {
            bad(&at("name"), format!("duplicate model name `{}` (also models[{prev}])", m.name));
        } else if let Some(other) = ids.insert(crate::id::model_id(&m.name), &m.name) {
            bad(&at("name"), format!("model id of `{}` collides with `{other}`; rename one", m.name));
        }
    }
    super::dag::check(c, &lines, &mut out);
    super::cluster::check(c, &lines, &mut out);
    out
}

fn check_model(m: &ModelConfig, bad: &mut dyn FnMut(&'static str, bool, String)) {
    let valid_name = !m.name.is_empty()
        && m.name.len() <= 64
        && m.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if !valid_name {
        bad("name", false, format!("`{}` must be 1-64 chars of [A-Za-z0-9._-]", m.name));
    }
    if !m.path.is_file() {
        bad("path", false, format!("model file {} does not exist", m.path.display()));
    }
    if let Cuts::Mode(mode) = &m.cuts {
        if mode != "auto" && mode != "none" {
            bad("cuts", false, format!("`{mode}`: expected \"auto\", \"none\" or a list of tensor names"));
        }
    }
    if !(1..=4096).contains(&m.max_batch) {
        bad("max_batch", false, format!("must be 1..=4096, got {}", m.max_batch));
    }
    if let Some(q) = m.max_queue_rows.filter(|&q| q < m.max_batch || q > 1 << 20) {
        bad("max_queue_rows", false, format!("must be max_batch ({})..=1048576, got {q}", m.max_batch));
    }
    if m.max_queue_delay_us > 1_000_000 {
        bad("max_queue_delay_us", false, format!("must be at most 1 s, got {} us", m.max_queue_delay_us));
    }
    if !(1..=64).contains(&m.intra_threads) {
        bad("intra_threads", false, format!("must be 1..=64, got {}", m.intra_threads));
    }
    super::backend::check(m.backend, m.device, m.fallback, &mut |k, msg| bad(k, false, msg));
    if let Some(c) = &m.cache {
        if !(0.0..=0.5).contains(&c.budget) {
            bad("cache", false, format!("budget must be in 0..=0.5, got {}", c.budget));
        }
        if !(0.01..=1.0).contains(&c.trainer_cpu_share) {
            bad("cache", false, format!("trainer_cpu_share must be in 0.01..=1, got {}", c.trainer_cpu_share));
        }
        if !(0.0..=1.0).contains(&c.shadow_fraction) {
            bad("cache", false, format!("shadow_fraction must be in 0..=1, got {}", c.shadow_fraction));
        }
        if c.window < 16 || c.min_samples < 8 || c.retrain_every == 0 || c.min_samples > c.window {
            bad("cache", false, "need window >= 16, 8 <= min_samples <= window, retrain_every >= 1".into());
        }
        if c.hidden > 1024 {
            bad("cache", false, format!("hidden must be at most 1024, got {}", c.hidden));
        }
        if c.max_memory_bytes < 1024 {
            bad("cache", false, format!("max_memory_bytes must be at least 1024, got {}", c.max_memory_bytes));
        }
        if c.selector == CacheSelector::Learned && c.kind != CacheKind::Learned {
            bad("cache", false, "selector = \"learned\" works only with kind = \"learned\"".into());
        }
    }
    let inp = &m.input;
    for (k, v) in [("height", inp.height), ("width", inp.width)] {
        if !(1..=8192).contains(&v) {
            bad(k, true, format!("must be 1..=8192, got {v}"));
        }
    }
    if !(1..=4).contains(&inp.channels) {
        bad("channels", true, format!("must be 1..=4, got {}", inp.channels));
    }
    if !inp.scale.is_finite() || inp.scale == 0.0 {
        bad("scale", true, format!("must be finite and non-zero, got {}", inp.scale));
    }
    for (k, v) in [("mean", &inp.mean), ("std", &inp.std)] {
        if !v.is_empty() && v.len() != inp.channels {
            bad(k, true, format!("has {} values for {} channels", v.len(), inp.channels));
        }
    }
    if inp.mean.iter().any(|m| !m.is_finite()) {
        bad("mean", true, "values must be finite".into());
    }
    if inp.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
        bad("std", true, "values must be finite and non-zero".into());
    }
}

/// One step of a key path.
#[derive(Debug, Clone)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Owned(String),
    Index(usize),
}

/// Maps key paths to line numbers with a span-keeping parse of the same text.
pub(super) struct Lines<'t> {
    text: &'t str,
    doc: Option<ImDocument<&'t str>>,
}

impl<'t> Lines<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Self { text, doc: ImDocument::parse(text).ok() }
    }

    pub(super) fn issue(&self, path: &[Seg], message: String) -> ConfigIssue {
        ConfigIssue { key: render(path), line: self.line(path), message }
    }

    /// Line of the deepest key of `path` that exists in the document.
    fn line(&self, path: &[Seg]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut span = None;
        for seg in path {
            let next = match (seg, node) {
                (Seg::Index(i), Node::Item(Item::ArrayOfTables(a))) => a.get(*i).map(|t| (t.span(), Node::Table(t))),
                (Seg::Key(_) | Seg::Owned(_), _) => {
                    let k = match seg {
                        Seg::Key(k) => *k,
                        Seg::Owned(k) => k.as_str(),
                        Seg::Index(_) => unreachable!("matched above"),
                    };
                    let kv = match node {
                        Node::Table(t) | Node::Item(Item::Table(t)) => t.get_key_value(k),
                        Node::Item(Item::Value(EditValue::InlineTable(t))) => t.get_key_value(k),
                        Node::Item(_) => None,
                    };
                    kv.map(|(key, item)| (key.span(), Node::Item(item)))
                }
                _ => None,
            };
            let Some((s, n)) = next else { break };
            span = s.map(|r| r.start).or(span);
            node = n;
        }
        span.map(|s| line_at(self.text, s))
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
}

fn render(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => push_key(&mut s, k),
            Seg::Owned(k) => push_key(&mut s, k),
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn push_key(s: &mut String, k: &str) {
    if !s.is_empty() {
        s.push('.');
    }
    s.push_str(k);
}

fn line_at(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}
