//! Node configuration: parsing, validation, and every error reported at once.
//!
//! Owns the TOML schema ([`Config`]). [`load`] is the only way in: the daemon's
//! start, `check-config` and SIGHUP reload all go through it, so a file the
//! daemon accepts once it accepts always. Relative paths are resolved against
//! the directory of the config file.

mod backend;
mod cluster;
mod dag;
mod dispatch;
mod model;
mod steer;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use backend::{Backend, Fallback};
pub use cluster::{check_key_file, ClusterConfig, GpuDevicesMode, MAX_NODE_GPUS};
pub use dag::{DagConfig, FunctionConfig, FunctionKind};
pub use dispatch::{DispatchConfig, DispatchOrder, PoolMode};
pub use model::{
    CacheConfig, CacheKind, CacheSelector, Config, Cuts, InputConfig, Layout, MetricsConfig, ModelConfig, OutputKind,
    Resize, RuntimeConfig, ServerConfig,
};
pub use steer::{SteerConfig, SteerMode, UnixSteerMode};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Key path, e.g. `models[1].input.std`.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} error(s) in {}:\n{}", .issues.len(), .path.display(), list(.issues))]
    Invalid { path: PathBuf, issues: Vec<ConfigIssue> },
}

fn list(issues: &[ConfigIssue]) -> String {
    issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n")
}

impl ConfigError {
    /// The individual problems (empty for read errors).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { issues, .. } => issues,
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &base).map_err(|issues| ConfigError::Invalid { path: path.to_owned(), issues })
}

/// Parses and validates config text; relative paths are joined to `base`.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
    let (mut config, mut issues) = validate::deserialize_all(text)?;
    for m in &mut config.models {
        if m.path.is_relative() {
            m.path = base.join(&m.path);
        }
    }
    for f in &mut config.functions {
        if let Some(p) = f.program.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    }
    if config.runtime.state_dir.is_none() {
        config.runtime.state_dir = std::env::var_os("STATE_DIRECTORY")
            .and_then(|v| std::env::split_paths(&v).next())
            .filter(|p| p.is_absolute());
    }
    if let Some(dir) = &mut config.runtime.state_dir {
        if dir.is_relative() {
            *dir = base.join(&*dir);
        }
    }
    for m in &mut config.models {
        let file = config.runtime.state_dir.as_ref().map(|d| d.join("caches").join(format!("{}.bin", m.name)));
        if let Some(c) = &mut m.cache {
            c.state_file = file;
        }
    }
    if let Some(lib) = &mut config.runtime.ort_library {
        if lib.is_relative() {
            *lib = base.join(&*lib);
        }
    }
    if let Some(k) = config.cluster.as_mut().map(|c| &mut c.key_file).filter(|p| p.is_relative()) {
        *k = base.join(&*k);
    }
    if config.server.socket.is_relative() {
        config.server.socket = base.join(&config.server.socket);
    }
    issues.extend(validate::check(&config, text));
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(issues)
    }
}

impl ServerConfig {
    /// The socket mode as a number (validated by [`load`]).
    pub fn socket_mode_bits(&self) -> u32 {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
socket = "/tmp/x.sock"

[[models]]
name = "m"
path = "Cargo.toml"
input = { layout = "NHWC", height = 32, width = 32, channels = 3 }
"#;

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.server.socket_mode_bits(), 0o660);
    }

    #[test]
    fn all_errors_reported_with_lines() {
        let text = r#"
[server]
socket = "/tmp/x.sock"
io_threads = 0
bogus = 1

[[models]]
name = "a"
path = "/nonexistent/a.onnx"
max_batch = 0
input = { layout = "NHWC", height = 32, width = 32, channels = 3, mean = [1.0] }

[[models]]
name = "a"
path = "/dev/null"
colour = "red"
input = { layout = "NCHW", height = 28, width = 28, channels = 1 }
"#;
        let issues = parse(text, Path::new("/")).unwrap_err();
        let all = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(all.contains("bogus"), "{all}");
        assert!(all.contains("colour"), "{all}");
        // Semantic errors in other sections are still reported although serde failed.
        assert!(issues.iter().any(|i| i.key.starts_with("models[0]")), "{all}");
        assert!(issues.iter().any(|i| i.line == Some(5)), "unknown key `bogus` is on line 5: {all}");
    }

    #[test]
    fn cache_selector_parses_and_bad_ones_are_refused() {
        let with = |cache: &str| format!("{GOOD}cache = {{ {cache} }}\n");
        let selector = |cache: &str| {
            parse(&with(cache), Path::new(env!("CARGO_MANIFEST_DIR"))).map(|c| {
                let cache = c.models[0].cache.clone().unwrap();
                cache.selector
            })
        };
        assert_eq!(selector(r#"kind = "learned""#), Ok(CacheSelector::Softmax));
        assert_eq!(selector(r#"kind = "learned", selector = "softmax""#), Ok(CacheSelector::Softmax));
        assert_eq!(selector(r#"kind = "learned", selector = "learned""#), Ok(CacheSelector::Learned));
        let issues = selector(r#"kind = "learned", selector = "mlp""#).unwrap_err();
        let all = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(all.contains("models[0]") && all.contains("unknown variant `mlp`"), "{all}");
        assert!(all.contains("`softmax`") && all.contains("`learned`"), "the accepted values are named: {all}");
        // Reported at the key that holds the bad value, with its line.
        assert_eq!(issues[0].key, "models[0].cache", "{all}");
        assert_eq!(issues[0].line, Some(9), "{all}");
        let issues = selector(r#"kind = "knn", selector = "learned""#).unwrap_err();
        let all = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(all.contains(r#"selector = "learned" works only with kind = "learned""#), "{all}");
    }

    #[test]
    fn dispatch_shedding_needs_the_core_budget() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let with = |dispatch: &str| parse(&format!("{GOOD}\n[dispatch]\n{dispatch}\n"), base);
        let c = with("core_budget = true\nshed = true\ncores = 2").unwrap();
        assert!(c.dispatch.shed && c.dispatch.core_leases() == Some(2));
        for bad in ["shed = true", "shed = true\ncore_budget = true\norder = \"fifo\""] {
            let issues = with(bad).unwrap_err();
            let all = issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
            assert!(all.contains("dispatch.shed") && all.contains("needs core_budget = true"), "{bad}: {all}");
        }
        // A wrong type names the key, not just the section.
        let issues = with("cores = \"many\"").unwrap_err();
        assert_eq!(issues[0].key, "dispatch.cores", "{issues:?}");
    }

    /// Seen with the wire fuzz target: `mean = [nan]` was accepted and turned
    /// every image into NaN rows.
    #[test]
    fn non_finite_mean_is_refused() {
        for mean in ["nan", "inf", "-inf"] {
            let text = GOOD.replace("channels = 3 }", &format!("channels = 3, mean = [0.0, {mean}, 0.0] }}"));
            let issues = parse(&text, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap_err();
            assert!(issues.iter().any(|i| i.key == "models[0].input.mean"), "{mean}: {issues:?}");
        }
    }

    #[test]
    fn syntax_error_has_line() {
        let issues = parse("[server\nsocket=1", Path::new("/")).unwrap_err();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].line, Some(1));
    }
}
