//! DAG deployments: the `[[functions]]` and `[[dags]]` schema and its checks.
//!
//! A function is either a model function (a `[[models]]` entry run by the
//! inference executor, caches included) or an exec function (a user program
//! run in a worker process). A DAG names functions, joins them with edges (or
//! a chain) into one graph with exactly one sink, and carries a deadline.
//! [`check`] reports every problem: unknown names, cycles (named), ambiguous
//! sinks, impossible deadlines and bad limits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::model::Config;
use super::validate::{Lines, Seg};
use super::ConfigIssue;
use crate::sandbox::Sched;
use crate::sched::dag::Graph;

/// How a function runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// A user program in a worker process.
    Exec,
    /// A served model (`model = "<[[models]] name>"`).
    Model,
}

/// One `[[functions]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    pub name: String,
    pub kind: FunctionKind,
    /// Exec only: the program (relative to the config file's directory).
    #[serde(default)]
    pub program: Option<PathBuf>,
    /// Exec only: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Model only: the `[[models]]` entry it runs.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_cores")]
    pub cpu_cores: f32,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// One invocation may take this long before the worker is killed.
    #[serde(default = "default_time_limit_ms")]
    pub time_limit_ms: u64,
    #[serde(default = "default_message_kb")]
    pub max_message_kb: u64,
    #[serde(default = "default_pids")]
    pub pids: u32,
    /// Prior of the execution-time estimator; also used to check DAG deadlines.
    #[serde(default)]
    pub expected_ms: Option<f64>,
    /// Warm workers kept per SGS even without traffic.
    #[serde(default)]
    pub min_warm: usize,
    /// Most workers per SGS (warm + busy).
    #[serde(default = "default_max_warm")]
    pub max_warm: usize,
    /// An idle worker above the pool's target is retired after this long.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// Extra share of warm workers over rate × execution time.
    #[serde(default = "default_headroom")]
    pub headroom: f32,
    /// Exec only: the workers' CPU scheduling policy.
    #[serde(default)]
    pub sched: Sched,
}

/// One `[[dags]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagConfig {
    pub name: String,
    /// Default end-to-end deadline of a request (a request may carry its own).
    pub deadline_ms: f64,
    /// `[from, to]` pairs of function names.
    #[serde(default)]
    pub edges: Vec<(String, String)>,
    /// Shorthand for edges along a list; a single name is a one-function DAG.
    #[serde(default)]
    pub chain: Vec<String>,
    /// SGSs the load balancer keeps for this DAG at least / at most.
    #[serde(default = "default_min_sgs")]
    pub min_sgs: usize,
    #[serde(default = "default_max_sgs")]
    pub max_sgs: usize,
}

impl DagConfig {
    /// Function names in first-mention order, and edges as index pairs into it.
    pub fn graph_parts(&self) -> (Vec<&str>, Vec<(usize, usize)>) {
        fn index<'a>(n: &'a str, nodes: &mut Vec<&'a str>) -> usize {
            match nodes.iter().position(|x| *x == n) {
                Some(i) => i,
                None => {
                    nodes.push(n);
                    nodes.len() - 1
                }
            }
        }
        let mut nodes: Vec<&str> = Vec::new();
        let mut edges = Vec::new();
        for (a, b) in &self.edges {
            let (i, j) = (index(a, &mut nodes), index(b, &mut nodes));
            edges.push((i, j));
        }
        for (k, n) in self.chain.iter().enumerate() {
            let j = index(n, &mut nodes);
            if k > 0 {
                edges.push((index(&self.chain[k - 1], &mut nodes), j));
            }
        }
        (nodes, edges)
    }

    /// The default deadline; out-of-range values (refused by [`check`]) are
    /// clamped to `0..=`[`MAX_DEADLINE_MS`] rather than panicking.
    pub fn deadline(&self) -> Duration {
        let ms = if self.deadline_ms > 0.0 { self.deadline_ms.min(MAX_DEADLINE_MS) } else { 0.0 };
        Duration::from_secs_f64(ms / 1e3)
    }
}

/// Longest DAG deadline a config may carry (1 h): a request's deadline is its
/// receipt time plus this, which must stay a representable `Instant`.
pub const MAX_DEADLINE_MS: f64 = 3_600_000.0;

impl FunctionConfig {
    /// `expected_ms` when it passes [`check`]'s range (finite, 0..=time_limit_ms,
    /// time_limit_ms itself in range); `None` otherwise.
    fn valid_expected_ms(&self) -> Option<f64> {
        self.expected_ms.filter(|&e| {
            e.is_finite() && e >= 0.0 && e <= self.time_limit_ms as f64 && (1..=60_000).contains(&self.time_limit_ms)
        })
    }
}

fn default_cores() -> f32 {
    1.0
}
fn default_memory_mb() -> u64 {
    256
}
fn default_time_limit_ms() -> u64 {
    1000
}
fn default_message_kb() -> u64 {
    1024
}
fn default_pids() -> u32 {
    16
}
fn default_max_warm() -> usize {
    4
}
fn default_keep_alive_ms() -> u64 {
    10_000
}
fn default_headroom() -> f32 {
    0.25
}
fn default_min_sgs() -> usize {
    1
}
fn default_max_sgs() -> usize {
    2
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
}

/// Semantic checks of `[[functions]]` and `[[dags]]`.
pub(super) fn check(c: &Config, lines: &Lines, out: &mut Vec<ConfigIssue>) {
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, f) in c.functions.iter().enumerate() {
        let mut bad = |k: &'static str, msg: String| {
            out.push(lines.issue(&[Seg::Key("functions"), Seg::Index(i), Seg::Key(k)], msg));
        };
        check_function(c, f, &mut bad);
        if !valid_name(&f.name) {
            bad("name", format!("`{}` must be 1-64 chars of [A-Za-z0-9._-]", f.name));
        } else if let Some(prev) = by_name.get(f.name.as_str()) {
            bad("name", format!("duplicate function name `{}` (also functions[{prev}])", f.name));
        } else {
            by_name.insert(&f.name, i);
        }
    }
    let mut dag_names: HashMap<&str, usize> = HashMap::new();
    for (i, d) in c.dags.iter().enumerate() {
        let mut bad = |k: &'static str, msg: String| {
            out.push(lines.issue(&[Seg::Key("dags"), Seg::Index(i), Seg::Key(k)], msg));
        };
        if !valid_name(&d.name) {
            bad("name", format!("`{}` must be 1-64 chars of [A-Za-z0-9._-]", d.name));
        } else if let Some(prev) = dag_names.get(d.name.as_str()) {
            bad("name", format!("duplicate DAG name `{}` (also dags[{prev}])", d.name));
        } else if c.models.iter().any(|m| m.name == d.name) {
            bad("name", format!("`{}` is also a model name; invocations would be ambiguous", d.name));
        }
        dag_names.entry(&d.name).or_insert(i);
        if !(d.deadline_ms.is_finite() && d.deadline_ms > 0.0) {
            bad("deadline_ms", format!("impossible deadline: must be > 0, got {}", d.deadline_ms));
        } else if d.deadline_ms > MAX_DEADLINE_MS {
            bad("deadline_ms", format!("must be at most 1 h ({MAX_DEADLINE_MS} ms), got {}", d.deadline_ms));
        }
        if d.min_sgs == 0 || d.min_sgs > d.max_sgs || d.max_sgs > 64 {
            bad("max_sgs", format!("need 1 <= min_sgs <= max_sgs <= 64, got {}..={}", d.min_sgs, d.max_sgs));
        }
        check_graph(d, &c.functions, &by_name, &mut bad);
    }
}

fn check_function(c: &Config, f: &FunctionConfig, bad: &mut dyn FnMut(&'static str, String)) {
    match f.kind {
        FunctionKind::Exec => {
            if f.model.is_some() {
                bad("model", "only model functions name a model".into());
            }
            match &f.program {
                None => bad("program", "exec functions need a program".into()),
                Some(p) => {
                    use std::os::unix::fs::PermissionsExt;
                    match std::fs::metadata(p) {
                        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                        Ok(_) => bad("program", format!("{} is not an executable file", p.display())),
                        Err(e) => bad("program", format!("{}: {e}", p.display())),
                    }
                }
            }
        }
        FunctionKind::Model => {
            if f.program.is_some() || !f.args.is_empty() {
                bad("program", "model functions run a [[models]] entry, not a program".into());
            }
            match &f.model {
                None => bad("model", "model functions need `model = \"<[[models]] name>\"`".into()),
                Some(m) if !c.models.iter().any(|x| &x.name == m) => {
                    bad("model", format!("unknown model `{m}` (not a [[models]] name)"))
                }
                Some(_) => {}
            }
        }
    }
    if !(f.cpu_cores > 0.0 && f.cpu_cores <= 64.0) {
        bad("cpu_cores", format!("must be in (0, 64], got {}", f.cpu_cores));
    }
    if !(1..=65_536).contains(&f.memory_mb) {
        bad("memory_mb", format!("must be 1..=65536, got {}", f.memory_mb));
    }
    if !(1..=60_000).contains(&f.time_limit_ms) {
        bad("time_limit_ms", format!("must be 1..=60000, got {}", f.time_limit_ms));
    }
    if !(1..=(1 << 20)).contains(&f.max_message_kb) {
        bad("max_message_kb", format!("must be 1..=1048576, got {}", f.max_message_kb));
    }
    if !(1..=4096).contains(&f.pids) {
        bad("pids", format!("must be 1..=4096, got {}", f.pids));
    }
    if let Some(e) = f.expected_ms {
        if !(e.is_finite() && e >= 0.0 && e <= f.time_limit_ms as f64) {
            bad("expected_ms", format!("must be in 0..=time_limit_ms ({}), got {e}", f.time_limit_ms));
        }
    }
    if f.max_warm == 0 || f.min_warm > f.max_warm || f.max_warm > 1024 {
        bad(
            "max_warm",
            format!("need min_warm <= max_warm, 1 <= max_warm <= 1024, got {}..={}", f.min_warm, f.max_warm),
        );
    }
    if !(f.headroom.is_finite() && (0.0..=10.0).contains(&f.headroom)) {
        bad("headroom", format!("must be in 0..=10, got {}", f.headroom));
    }
    if f.keep_alive_ms > 3_600_000 {
        bad("keep_alive_ms", format!("must be at most 1 h, got {}", f.keep_alive_ms));
    }
}

fn check_graph(
    d: &DagConfig,
    functions: &[FunctionConfig],
    by_name: &HashMap<&str, usize>,
    bad: &mut dyn FnMut(&'static str, String),
) {
    let (nodes, edges) = d.graph_parts();
    let key = if d.edges.is_empty() { "chain" } else { "edges" };
    if nodes.is_empty() {
        bad("edges", "a DAG needs `edges` or `chain`".into());
        return;
    }
    for n in nodes.iter().filter(|n| !by_name.contains_key(*n)) {
        bad(key, format!("unknown function `{n}` (not a [[functions]] name)"));
    }
    if let Some((a, _)) = edges.iter().find(|(a, b)| a == b) {
        bad(key, format!("self-loop on `{}`", nodes[*a]));
        return;
    }
    let graph = Graph::new(nodes.len(), &edges);
    if let Some(cycle) = graph.find_cycle() {
        let names: Vec<&str> = cycle.iter().map(|&i| nodes[i]).collect();
        bad(key, format!("cycle {}", names.join(" → ")));
        return;
    }
    let sinks = graph.sinks();
    if sinks.len() > 1 {
        let names: Vec<&str> = sinks.iter().map(|&i| nodes[i]).collect();
        bad(
            key,
            format!("{} sinks ({}): a DAG needs exactly one sink (is it disconnected?)", sinks.len(), names.join(", ")),
        );
        return;
    }
    if !(d.deadline_ms.is_finite() && d.deadline_ms > 0.0 && d.deadline_ms <= MAX_DEADLINE_MS) {
        return;
    }
    // Only functions with a valid `expected_ms` count: model times are only
    // known once loaded (unknown functions and out-of-range values, already
    // reported, count 0 too).
    let cost = |i: usize| {
        let ms = by_name.get(nodes[i]).and_then(|&f| functions[f].valid_expected_ms()).unwrap_or(0.0);
        Duration::from_secs_f64(ms / 1e3)
    };
    let Some(topo) = graph.topo_order() else { return };
    let (len, path) = graph.critical_path(&topo, cost);
    if len > d.deadline() {
        let names: Vec<&str> = path.iter().map(|&i| nodes[i]).collect();
        bad(
            "deadline_ms",
            format!(
                "impossible deadline: {} ms is shorter than the critical path of expected_ms, {:.3} ms ({})",
                d.deadline_ms,
                len.as_secs_f64() * 1e3,
                names.join(" → ")
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::parse;
    use crate::sandbox::Sched;

    const MODEL: &str = r#"
[[models]]
name = "cnn"
path = "Cargo.toml"
input = { layout = "NHWC", height = 32, width = 32, channels = 3 }
"#;

    #[test]
    fn good_dag_parses_and_resolves_program() {
        let text = format!(
            r#"{MODEL}
[[functions]]
name = "pre"
kind = "exec"
program = "/bin/sh"
args = ["-c", "exec cat"]
expected_ms = 2

[[functions]]
name = "infer"
kind = "model"
model = "cnn"

[[dags]]
name = "classify"
deadline_ms = 30
chain = ["pre", "infer"]
"#
        );
        let c = parse(&text, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(c.dags[0].graph_parts(), (vec!["pre", "infer"], vec![(0, 1)]));
        assert_eq!(c.functions[1].max_warm, 4, "defaults apply");
        assert_eq!(c.functions[0].sched, Sched::Batch, "workers default to SCHED_BATCH");
        let normal = text.replace("expected_ms = 2\n", "expected_ms = 2\nsched = \"normal\"\n");
        let c = parse(&normal, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(c.functions[0].sched, Sched::Normal);
        let fifo = text.replace("expected_ms = 2\n", "expected_ms = 2\nsched = \"fifo\"\n");
        let all = parse(&fifo, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap_err();
        let all = all.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(all.contains("functions[0]") && all.contains("unknown variant `fifo`"), "{all}");
    }

    #[test]
    fn every_dag_problem_is_reported_with_key_and_line() {
        let text = format!(
            r#"{MODEL}
[[functions]]
name = "a"
kind = "exec"
program = "/bin/sh"
expected_ms = 20

[[functions]]
name = "b"
kind = "exec"
program = "Cargo.toml"
time_limit_ms = 0

[[functions]]
name = "m"
kind = "model"
model = "resnet"

[[functions]]
name = "a"
kind = "exec"

[[dags]]
name = "cyclic"
deadline_ms = 10
edges = [["a", "b"], ["b", "m"], ["m", "a"]]

[[dags]]
name = "unknown"
deadline_ms = 10
chain = ["a", "nope"]

[[dags]]
name = "forked"
deadline_ms = 10
edges = [["a", "b"], ["a", "m"]]

[[dags]]
name = "tight"
deadline_ms = 15
chain = ["a", "b"]

[[dags]]
name = "zero"
deadline_ms = 0
chain = ["b"]
"#
        );
        let issues = parse(&text, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap_err();
        let all = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        let has = |key: &str, what: &str| issues.iter().any(|i| i.key == key && i.message.contains(what));
        assert!(has("functions[1].program", "not an executable"), "{all}");
        assert!(has("functions[1].time_limit_ms", "1..=60000"), "{all}");
        assert!(has("functions[2].model", "unknown model `resnet`"), "{all}");
        assert!(has("functions[3].name", "duplicate function name `a`"), "{all}");
        assert!(has("functions[3].program", "need a program"), "{all}");
        assert!(has("dags[0].edges", "cycle a → b → m → a"), "{all}");
        assert!(has("dags[1].chain", "unknown function `nope`"), "{all}");
        assert!(has("dags[2].edges", "2 sinks (b, m)"), "{all}");
        assert!(has("dags[3].deadline_ms", "impossible deadline: 15 ms"), "{all}");
        assert!(has("dags[3].deadline_ms", "(a → b)"), "{all}");
        assert!(has("dags[4].deadline_ms", "must be > 0"), "{all}");
        // Lines point at the entries' keys.
        let line = |key: &str| issues.iter().find(|i| i.key == key).and_then(|i| i.line);
        assert_eq!(line("dags[0].edges"), Some(text.lines().position(|l| l.contains(r#"["m", "a"]"#)).unwrap() + 1));
        assert_eq!(
            line("functions[2].model"),
            Some(text.lines().position(|l| l == r#"model = "resnet""#).unwrap() + 1)
        );
    }

    /// Found by fuzzing (fuzz/ `config`): a negative, NaN or huge `expected_ms`,
    /// and a huge `deadline_ms`, made the deadline check panic in
    /// `Duration::from_secs_f64` instead of being reported.
    #[test]
    fn out_of_range_times_are_reported_not_panics() {
        let dag = |expected: &str, deadline: &str| {
            format!(
                r#"
[[functions]]
name = "f"
kind = "exec"
program = "/bin/sh"
expected_ms = {expected}

[[dags]]
name = "d"
deadline_ms = {deadline}
chain = ["f"]
"#
            )
        };
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        for expected in ["-1.0", "nan", "inf", "1e300"] {
            let issues = parse(&dag(expected, "50"), base).unwrap_err();
            assert!(issues.iter().any(|i| i.key == "functions[0].expected_ms"), "{expected}: {issues:?}");
        }
        for deadline in ["1e300", "inf", "3600000.5"] {
            let issues = parse(&dag("1.0", deadline), base).unwrap_err();
            assert!(issues.iter().any(|i| i.key == "dags[0].deadline_ms"), "{deadline}: {issues:?}");
        }
        let c = parse(&dag("1.0", "3600000"), base).unwrap();
        assert_eq!(c.dags[0].deadline(), Duration::from_secs(3600));
    }
}
