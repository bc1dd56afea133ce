//! The `[cluster]` section: this node's part in cluster-wide GPU auctions
//! (Themis, `docs/peer-protocol.md`). Absent: the node runs alone and starts
//! no peer service.
//!
//! The key file is read and checked at load (missing, shorter than 16 bytes,
//! or readable by others: refused), so a node that starts has a usable key.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::validate::{Lines, Seg};
use super::{Config, ConfigIssue};

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id in the cluster (unique, small integer; names its GPUs).
    pub node_id: u32,
    /// TCP address the peer service listens on.
    pub listen: SocketAddr,
    /// The cluster key (≥ 16 bytes, mode 0600 or stricter), shared by every node.
    pub key_file: PathBuf,
    /// The other nodes' peer addresses (informational for a static arbiter;
    /// the arbiter learns nodes from their `join`).
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// A static arbiter's peer address: this node's `listen` or a peer's.
    /// Exactly one of `arbiter` and `etcd`.
    #[serde(default)]
    pub arbiter: Option<SocketAddr>,
    /// etcd endpoints (`http://host:port`): membership and arbiter election
    /// on etcd (`docs/peer-protocol.md`, "On etcd"). Exactly one of `arbiter` and `etcd`.
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd (several clusters can share one etcd).
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// GPUs this node declares (for nodes without NVIDIA hardware: the
    /// protocol runs on CPU machines). Indices 0..gpus.
    #[serde(default)]
    pub gpus: u32,
    /// Lease length, seconds.
    #[serde(default = "default_lease_s")]
    pub lease_s: f64,
    /// Seconds between the arbiter's lease rounds.
    #[serde(default = "default_round_s")]
    pub round_s: f64,
    /// How long a round waits for the offered agents' bids, seconds (an
    /// agent that has not bid by then takes no part in that round's
    /// auction). Less than `round_s`; default [`ClusterConfig::bid_deadline_s`].
    #[serde(default)]
    pub bid_deadline_s: Option<f64>,
    /// Themis's f: the share of apps (best ρ first) left out of each auction.
    #[serde(default = "default_f")]
    pub f: f64,
    /// Seconds between a lease's end (SIGTERM, the checkpoint signal) and SIGKILL.
    #[serde(default = "default_grace_s")]
    pub grace_s: f64,
    /// How an app is kept to its GPUs: `cgroup` (device rules in a cgroup of
    /// its own, else the app does not start), `env` (`CUDA_VISIBLE_DEVICES`
    /// only) or `auto` (cgroup where the node allows it, else env; the default).
    /// See `docs/auction.md`, "GPU device rules".
    #[serde(default)]
    pub gpu_devices: GpuDevicesMode,
    /// Character-device major of the GPUs' device nodes (NVIDIA: 195).
    #[serde(default = "default_gpu_device_major")]
    pub gpu_device_major: u32,
    /// Directory of the GPUs' device nodes: GPU `i` is `<dir>/nvidia<i>`
    /// (minor `i`). A test points it at a temp dir of `mknod`ed nodes.
    #[serde(default = "default_gpu_device_dir")]
    pub gpu_device_dir: PathBuf,
}

/// `[cluster] gpu_devices`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuDevicesMode {
    /// Device rules where the node allows them, else `CUDA_VISIBLE_DEVICES` only.
    #[default]
    Auto,
    /// Device rules required: an app whose rules cannot be set does not start.
    Cgroup,
    /// `CUDA_VISIBLE_DEVICES` only.
    Env,
}

impl GpuDevicesMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuDevicesMode::Auto => "auto",
            GpuDevicesMode::Cgroup => "cgroup",
            GpuDevicesMode::Env => "env",
        }
    }
}

fn default_gpu_device_major() -> u32 {
    195
}
fn default_gpu_device_dir() -> PathBuf {
    PathBuf::from("/dev")
}

fn default_lease_s() -> f64 {
    60.0
}
fn default_round_s() -> f64 {
    5.0
}
fn default_f() -> f64 {
    0.8
}
fn default_grace_s() -> f64 {
    10.0
}
fn default_etcd_prefix() -> String {
    "/gati/".into()
}

impl ClusterConfig {
    /// Whether this node is the static arbiter (with etcd: never; the
    /// arbiter is elected).
    pub fn is_arbiter(&self) -> bool {
        self.arbiter == Some(self.listen)
    }

    /// The bid deadline: as configured, else a quarter of `round_s`,
    /// between 50 ms and 2 s.
    pub fn bid_deadline_s(&self) -> f64 {
        self.bid_deadline_s.unwrap_or((0.25 * self.round_s).clamp(0.05, 2.0).min(0.5 * self.round_s))
    }

    /// Whether membership and the arbiter come from etcd.
    pub fn uses_etcd(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// The TTL of this node's etcd lease, whole seconds: four heartbeat
    /// periods, at least [`MIN_ETCD_TTL_S`] (etcd's own floor).
    pub fn etcd_ttl_s(&self) -> i64 {
        let hb = (self.round_s / 2.0).clamp(0.05, 1.0);
        ((4.0 * hb).ceil() as i64).max(MIN_ETCD_TTL_S)
    }
}

/// The shortest etcd lease TTL gati asks for (etcd raises shorter ones to
/// about 1.5 × its election timeout, 2 s with its defaults).
pub const MIN_ETCD_TTL_S: i64 = 2;

/// Most GPUs one node may declare.
pub const MAX_NODE_GPUS: u32 = 1024;

/// Largest character-device major Linux has (12 bits).
pub const MAX_DEVICE_MAJOR: u32 = 4095;

/// Why a key file is refused.
pub fn check_key_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    if meta.len() > 4096 {
        return Err(format!("{} is {} bytes; a key is at most 4096", path.display(), meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key: Vec<u8> = bytes.trim_ascii().to_vec();
    if key.len() < 16 {
        return Err(format!("{} holds {} bytes; the cluster key needs at least 16", path.display(), key.len()));
    }
    Ok(key)
}

/// Semantic checks of `[cluster]`.
pub(super) fn check(c: &Config, lines: &Lines, out: &mut Vec<ConfigIssue>) {
    let Some(cl) = &c.cluster else { return };
    let mut bad = |k: &'static str, msg: String| out.push(lines.issue(&[Seg::Key("cluster"), Seg::Key(k)], msg));
    if let Err(e) = check_key_file(&cl.key_file) {
        bad("key_file", e);
    }
    if cl.gpus > MAX_NODE_GPUS {
        bad("gpus", format!("must be at most {MAX_NODE_GPUS}, got {}", cl.gpus));
    }
    let pos = |v: f64| v.is_finite() && v > 0.0;
    if !pos(cl.lease_s) {
        bad("lease_s", format!("must be a positive number of seconds, got {}", cl.lease_s));
    }
    if !pos(cl.round_s) || cl.round_s > cl.lease_s {
        bad("round_s", format!("must be positive and at most lease_s ({}), got {}", cl.lease_s, cl.round_s));
    }
    if let Some(d) = cl.bid_deadline_s {
        if !pos(d) || d >= cl.round_s {
            bad("bid_deadline_s", format!("must be positive and below round_s ({}), got {d}", cl.round_s));
        }
    }
    if !(0.0..=1.0).contains(&cl.f) {
        bad("f", format!("must be in [0, 1], got {}", cl.f));
    }
    if cl.gpu_device_major == 0 || cl.gpu_device_major > MAX_DEVICE_MAJOR {
        bad("gpu_device_major", format!("must be in 1..={MAX_DEVICE_MAJOR}, got {}", cl.gpu_device_major));
    }
    if !cl.gpu_device_dir.is_absolute() {
        bad("gpu_device_dir", format!("must be an absolute path, got `{}`", cl.gpu_device_dir.display()));
    }
    if cl.gpu_devices != GpuDevicesMode::Env && cl.gpus > crate::auction::devices::MAX_GPU_MINOR + 1 {
        bad(
            "gpus",
            format!(
                "at most {} GPUs can have device rules (minors 0..={}); set gpu_devices = \"env\" for more, got {}",
                crate::auction::devices::MAX_GPU_MINOR + 1,
                crate::auction::devices::MAX_GPU_MINOR,
                cl.gpus
            ),
        );
    }
    if !cl.grace_s.is_finite() || cl.grace_s < 0.0 {
        bad("grace_s", format!("must be a non-negative number of seconds, got {}", cl.grace_s));
    }
    match (cl.arbiter, cl.uses_etcd()) {
        (Some(_), true) => bad("etcd", "set either `arbiter` (static) or `etcd` (elected), not both".into()),
        (None, false) => bad("arbiter", "missing: set `arbiter` (a static arbiter) or `etcd` (endpoints)".into()),
        (Some(a), false) if a != cl.listen && !cl.peers.contains(&a) => {
            bad("arbiter", format!("{a} is neither `listen` nor one of `peers`"));
        }
        _ => {}
    }
    if cl.uses_etcd() {
        for e in &cl.etcd {
            let hostport = e.strip_prefix("http://").unwrap_or("");
            if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
                bad("etcd", format!("endpoint `{e}` must be http://host:port (TLS is not supported)"));
            }
        }
        let p = &cl.etcd_prefix;
        if !p.starts_with('/') || !p.ends_with('/') || p.len() > 128 {
            bad("etcd_prefix", format!("`{p}` must start and end with `/` (at most 128 bytes)"));
        }
        // Failover fits in a lease: the old arbiter's etcd lease expires
        // (TTL), a new one is elected and runs its first round (round_s).
        let ttl = cl.etcd_ttl_s() as f64;
        if pos(cl.lease_s) && cl.lease_s < 2.0 * ttl + cl.round_s {
            bad(
                "lease_s",
                format!(
                    "with etcd must be at least 2 × the etcd TTL ({ttl} s) + round_s ({}) so that failover fits in one lease, got {}",
                    cl.round_s, cl.lease_s
                ),
            );
        }
    }
    if cl.peers.contains(&cl.listen) {
        bad("peers", format!("lists this node's own address {}", cl.listen));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn key(dir: &Path, mode: u32, bytes: &[u8]) -> PathBuf {
        let p = dir.join(format!("key-{mode:o}-{}", bytes.len()));
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn text(key: &Path, extra: &str) -> String {
        format!(
            "[server]\nsocket = \"/tmp/x.sock\"\n[cluster]\nnode_id = 1\nlisten = \"127.0.0.1:7001\"\nkey_file = \"{}\"\narbiter = \"127.0.0.1:7001\"\ngpus = 4\n{extra}",
            key.display()
        )
    }

    #[test]
    fn cluster_section_parses_and_bad_keys_and_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("gati-cluster-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = key(&dir, 0o600, &[b'k'; 32]);
        let c = crate::config::parse(&text(&good, ""), &dir).unwrap();
        let cl = c.cluster.unwrap();
        assert!(cl.is_arbiter());
        assert_eq!((cl.gpus, cl.lease_s, cl.round_s, cl.f), (4, 60.0, 5.0, 0.8));
        assert_eq!(cl.bid_deadline_s(), 1.25, "a quarter of round_s by default");
        assert!(crate::config::parse("[server]\nsocket = \"/tmp/x.sock\"\n", &dir).unwrap().cluster.is_none());
        let errs = |t: String| {
            crate::config::parse(&t, &dir).unwrap_err().iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        };
        let e = errs(text(&key(&dir, 0o644, &[b'k'; 32]), ""));
        assert!(e.contains("cluster.key_file") && e.contains("readable by group or others"), "{e}");
        let e = errs(text(&key(&dir, 0o600, b"short"), ""));
        assert!(e.contains("at least 16"), "{e}");
        let e = errs(text(&dir.join("missing"), ""));
        assert!(e.contains("cannot read"), "{e}");
        let e = errs(text(&good, "f = 1.5\nround_s = 100.0\n"));
        assert!(e.contains("cluster.f") && e.contains("cluster.round_s"), "{e}");
        let e = errs(text(&good, "bid_deadline_s = 5.0\n"));
        assert!(e.contains("cluster.bid_deadline_s"), "{e}");
        let e = errs(text(&good, "").replace("arbiter = \"127.0.0.1:7001\"", "arbiter = \"127.0.0.1:9\""));
        assert!(e.contains("neither `listen` nor one of `peers`"), "{e}");
        let e = errs(text(&good, "etcd = [\"http://127.0.0.1:2379\"]\n"));
        assert!(e.contains("not both"), "{e}");
        let e = errs(text(&good, "").replace("arbiter = \"127.0.0.1:7001\"\n", ""));
        assert!(e.contains("cluster.arbiter") && e.contains("missing"), "{e}");
        let etcd = |extra: &str| text(&good, extra).replace("arbiter = \"127.0.0.1:7001\"\n", "");
        let cl = crate::config::parse(&etcd("etcd = [\"http://127.0.0.1:2379\"]\n"), &dir).unwrap().cluster.unwrap();
        assert!(cl.uses_etcd() && !cl.is_arbiter());
        assert_eq!((cl.etcd_prefix.as_str(), cl.etcd_ttl_s()), ("/gati/", 4));
        let e = errs(etcd("etcd = [\"127.0.0.1:2379\"]\netcd_prefix = \"gati\"\nlease_s = 4.0\nround_s = 1.0\n"));
        assert!(
            e.contains("http://host:port") && e.contains("cluster.etcd_prefix") && e.contains("cluster.lease_s"),
            "{e}"
        );
        assert_eq!((cl.gpu_devices, cl.gpu_device_major), (GpuDevicesMode::Auto, 195));
        assert_eq!(cl.gpu_device_dir, Path::new("/dev"));
        let cl = crate::config::parse(
            &text(&good, "gpu_devices = \"cgroup\"\ngpu_device_major = 240\ngpu_device_dir = \"/tmp/g\"\n"),
            &dir,
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!((cl.gpu_devices, cl.gpu_device_major), (GpuDevicesMode::Cgroup, 240));
        let e = errs(text(&good, "gpu_device_major = 5000\ngpu_device_dir = \"dev\"\n"));
        assert!(e.contains("cluster.gpu_device_major") && e.contains("cluster.gpu_device_dir"), "{e}");
        let e = errs(text(&good, "gpu_devices = \"bpf\"\n"));
        assert!(e.contains("gpu_devices"), "{e}");
        let e = errs(text(&good, "bogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
