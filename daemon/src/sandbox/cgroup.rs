//! Per-sandbox cgroups: CPU quota, memory limit and a pids limit.
//!
//! Owns the `gati/<sandbox>` groups under the daemon's own cgroup. Both
//! hierarchies are supported and detected once:
//! - **v2** (systemd hosts): one group with `cpu.max`, `memory.max`,
//!   `memory.swap.max = 0`, `pids.max`; the controllers are enabled in the
//!   parents' `cgroup.subtree_control` (needs a delegated subtree).
//! - **v1** (hybrid hosts): one group per controller under `/sys/fs/cgroup/cpu`,
//!   `memory` and `pids`, with `cpu.cfs_quota_us`, `memory.limit_in_bytes`
//!   (+ `memory.memsw.limit_in_bytes` where swap accounting exists), `pids.max`.
//!
//! When neither is writable (unprivileged, no delegation) [`Cgroup::create`]
//! says why; the caller records the sandbox as running without a cgroup.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use super::Limits;

const ROOT: &str = "/sys/fs/cgroup";
const CFS_PERIOD_US: u64 = 100_000;

/// Which cgroup hierarchy a sandbox's limits live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Why a cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where new groups go: one base per controller (v1) or one base (v2).
#[derive(Debug)]
struct Hierarchy {
    version: CgroupVersion,
    /// `(controller, base dir)`; v2 has a single entry with controller "".
    bases: Vec<(&'static str, PathBuf)>,
}

/// One sandbox's group(s). Removed by [`Cgroup::remove`] (also on drop).
#[derive(Debug)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<(&'static str, PathBuf)>,
}

impl Cgroup {
    /// Creates the groups for `name` and writes `limits` into them.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        let hierarchy = hierarchy().as_ref().map_err(|reason| CgroupError::Unavailable(reason.clone()))?;
        let mut group = Cgroup { version: hierarchy.version, dirs: Vec::new() };
        for (controller, base) in &hierarchy.bases {
            let dir = base.join(name);
            fs::create_dir(&dir).map_err(|source| CgroupError::Io { op: "mkdir", path: dir.clone(), source })?;
            group.dirs.push((controller, dir));
        }
        // On error `group` is dropped, which removes what was created.
        let quota = ((limits.cpu_cores.max(0.01) as f64) * CFS_PERIOD_US as f64).round() as u64;
        let memory = limits.memory_bytes.to_string();
        let pids = limits.pids.max(1).to_string();
        for (controller, dir) in &group.dirs {
            match (group.version, *controller) {
                (CgroupVersion::V2, _) => {
                    write(dir, "cpu.max", &format!("{} {CFS_PERIOD_US}", quota.max(1000)))?;
                    write(dir, "memory.max", &memory)?;
                    if dir.join("memory.swap.max").exists() {
                        write(dir, "memory.swap.max", "0")?;
                    }
                    write(dir, "pids.max", &pids)?;
                }
                (CgroupVersion::V1, "cpu") => {
                    write(dir, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &quota.max(1000).to_string())?;
                }
                (CgroupVersion::V1, "memory") => {
                    write(dir, "memory.limit_in_bytes", &memory)?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(dir, "memory.memsw.limit_in_bytes", &memory)?;
                    }
                }
                (CgroupVersion::V1, _) => write(dir, "pids.max", &pids)?,
            }
        }
        Ok(group)
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Moves process `pid` into the group(s).
    pub fn add(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer has killed something in this group.
    pub fn oom_killed(&self) -> bool {
        let file = match self.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        self.dirs
            .iter()
            .filter(|(c, _)| self.version == CgroupVersion::V2 || *c == "memory")
            .filter_map(|(_, dir)| fs::read_to_string(dir.join(file)).ok())
            .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
            .any(|line| line.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0) > 0)
    }

    /// Removes the group(s). Processes still leaving a dying pid namespace can
    /// keep a group busy for a moment, so `rmdir` is retried briefly.
    pub fn remove(&mut self) {
        for (_, dir) in self.dirs.drain(..) {
            for attempt in 0..50 {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 49 => {
                        tracing::warn!(path = %dir.display(), error = %e, "sandbox cgroup left behind");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    fs::write(&path, value).map_err(|source| CgroupError::Io { op: "write", path, source })
}

/// Detected once per process.
fn hierarchy() -> &'static Result<Hierarchy, String> {
    static HIERARCHY: OnceLock<Result<Hierarchy, String>> = OnceLock::new();
    HIERARCHY.get_or_init(|| {
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let root = Path::new(ROOT);
        if root.join("cgroup.controllers").exists() {
            detect_v2(root, &own)
        } else {
            detect_v1(root, &own)
        }
    })
}

fn detect_v2(root: &Path, own: &str) -> Result<Hierarchy, String> {
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no v2 entry in /proc/self/cgroup")?;
    let mut dir = root.join(path.trim_start_matches('/'));
    let enable = "+cpu +memory +pids";
    for level in ["", "gati"] {
        if !level.is_empty() {
            dir = dir.join(level);
            if let Err(e) = fs::create_dir(&dir) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(format!("cgroup v2: mkdir {}: {e}", dir.display()));
                }
            }
        }
        let control = dir.join("cgroup.subtree_control");
        fs::write(&control, enable).map_err(|e| {
            format!(
                "cgroup v2: enabling cpu, memory, pids in {}: {e} (needs root or a delegated subtree)",
                control.display()
            )
        })?;
    }
    Ok(Hierarchy { version: CgroupVersion::V2, bases: vec![("", dir)] })
}

/// This process's group in the cgroup-v1 hierarchy of `controller`, from the
/// text of `/proc/self/cgroup` (`"/"` when it is not listed).
pub(crate) fn v1_own_path<'a>(own: &'a str, controller: &str) -> &'a str {
    own.lines()
        .filter_map(|l| l.split_once(':').and_then(|(_, rest)| rest.split_once(':')))
        .find(|(controllers, _)| controllers.split(',').any(|c| c == controller))
        .map_or("/", |(_, path)| path)
}

fn detect_v1(root: &Path, own: &str) -> Result<Hierarchy, String> {
    let mut bases = Vec::new();
    for controller in ["cpu", "memory", "pids"] {
        let mount = root.join(controller);
        if !mount.join("cgroup.procs").exists() {
            return Err(format!("cgroup v1: controller {controller} is not mounted at {}", mount.display()));
        }
        let path = v1_own_path(own, controller);
        let base = mount.join(path.trim_start_matches('/')).join("gati");
        if let Err(e) = fs::create_dir(&base) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(format!("cgroup v1: mkdir {}: {e} (needs root)", base.display()));
            }
        }
        bases.push((controller, base));
    }
    Ok(Hierarchy { version: CgroupVersion::V1, bases })
}
