//! GPU device rules: an app's processes can open only their granted GPUs'
//! device nodes (NVIDIA: character devices major 195, minor = GPU index,
//! `/dev/nvidia<i>`), on top of `CUDA_VISIBLE_DEVICES`.
//!
//! Decided once per node, at start ([`Devices::detect`], `[cluster]
//! gpu_devices`): each app gets a group of its own that its process joins
//! between fork and exec, so it never runs a moment outside its rules —
//! with the cgroup-v1 `devices` controller where it is mounted ([`v1`]), on a
//! pure cgroup-v2 host a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to
//! the group ([`v2`]); both need root. Otherwise (`env`, or `auto` without
//! either) apps run with `CUDA_VISIBLE_DEVICES` only; the reason is logged
//! once, shown in `gatictl apps` and Health, and in the
//! `gati_cluster_gpu_device_rules` gauge.
//!
//! The rules cover the GPU minors `0..=MAX_GPU_MINOR` of the configured
//! major; the control nodes (`/dev/nvidiactl` 195:255, `nvidia-modeset`
//! 195:254, `/dev/nvidia-uvm*` on their own major) stay open to every app.

pub mod v1;
pub mod v2;

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::app::AppId;
use super::gpu::NodeId;
use crate::config::{ClusterConfig, GpuDevicesMode};
use crate::telemetry::names;

/// Highest minor that is a GPU (NVIDIA: 254 is `nvidia-modeset`, 255 `nvidiactl`).
pub const MAX_GPU_MINOR: u32 = 253;

/// Why device rules could not be set.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("device rules: {0}")]
    Rules(String),
}

/// What the rules are made of (from `[cluster]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    pub mode: GpuDevicesMode,
    pub major: u32,
    /// GPU `i`'s node is `<dir>/nvidia<i>`.
    pub dir: PathBuf,
    /// GPUs this node declares (their nodes are checked at start).
    pub gpus: u32,
}

impl Default for DeviceSpec {
    fn default() -> DeviceSpec {
        DeviceSpec { mode: GpuDevicesMode::Auto, major: 195, dir: PathBuf::from("/dev"), gpus: 0 }
    }
}

impl DeviceSpec {
    pub fn of(cfg: &ClusterConfig) -> DeviceSpec {
        DeviceSpec {
            mode: cfg.gpu_devices,
            major: cfg.gpu_device_major,
            dir: cfg.gpu_device_dir.clone(),
            gpus: cfg.gpus,
        }
    }

    /// GPU `gpu`'s device node.
    pub fn node_path(&self, gpu: u32) -> PathBuf {
        self.dir.join(format!("nvidia{gpu}"))
    }
}

/// How this node keeps apps to their GPUs (Health, `gatictl apps`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    /// `[cluster] gpu_devices`: auto, cgroup or env.
    pub configured: &'static str,
    /// In use: `cgroup-v1`, `cgroup-v2` (device rules) or `env` (`CUDA_VISIBLE_DEVICES` only).
    pub mode: &'static str,
    /// Why there are no device rules, when there are none.
    pub reason: Option<String>,
    pub major: u32,
    pub dir: String,
    /// Where the apps' groups are (with rules).
    pub cgroup_base: Option<String>,
}

/// One app's rules, as `gatictl apps` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppDevices {
    /// `cgroup-v1`, `cgroup-v2` or `env`.
    pub rules: &'static str,
    pub cgroup: Option<String>,
    /// GPUs (local indices) its group may open now.
    pub allowed: Vec<u32>,
}

/// Where the rules live.
#[derive(Debug)]
enum Backend {
    V1(v1::Base),
    V2(v2::Base),
}

impl Backend {
    fn dir(&self) -> &Path {
        match self {
            Backend::V1(b) => b.dir(),
            Backend::V2(b) => b.dir(),
        }
    }

    fn mode(&self) -> &'static str {
        match self {
            Backend::V1(_) => "cgroup-v1",
            Backend::V2(_) => "cgroup-v2",
        }
    }

    fn group(&self, app: AppId) -> Result<Group, DeviceError> {
        Ok(match self {
            Backend::V1(b) => Group::V1(b.group(app)?),
            Backend::V2(b) => Group::V2(b.group(app)?),
        })
    }
}

/// Which hierarchy [`Devices::detect_at`] looks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    /// The v1 `devices` controller mounted here.
    V1(&'static str),
    /// The v2 hierarchy mounted here.
    V2(&'static str),
}

/// One app's group, in either hierarchy.
#[derive(Debug)]
pub enum Group {
    V1(v1::Group),
    V2(v2::Group),
}

impl Group {
    pub fn dir(&self) -> &Path {
        match self {
            Group::V1(g) => g.dir(),
            Group::V2(g) => g.dir(),
        }
    }

    /// `cgroup-v1` or `cgroup-v2`.
    pub fn kind(&self) -> &'static str {
        match self {
            Group::V1(_) => "cgroup-v1",
            Group::V2(_) => "cgroup-v2",
        }
    }

    fn procs_path(&self) -> &CString {
        match self {
            Group::V1(g) => g.procs_path(),
            Group::V2(g) => g.procs_path(),
        }
    }

    /// Lets the group open exactly the GPU minors `allowed` of `major`.
    pub fn set_rules(&self, major: u32, allowed: &[u32]) -> Result<(), DeviceError> {
        match self {
            Group::V1(g) => g.set_rules(major, allowed),
            Group::V2(g) => g.set_rules(major, allowed),
        }
    }

    /// Pids in the group.
    pub fn pids(&self) -> Vec<libc::pid_t> {
        std::fs::read_to_string(self.dir().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process left in the group.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            // SAFETY: kill(2) of a process in this app's own group, which only
            // gatid's enforcer puts processes into.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Removes the group; `false` while processes keep it busy.
    pub fn try_remove(&mut self) -> bool {
        match self {
            Group::V1(g) => g.try_remove(),
            Group::V2(g) => g.try_remove(),
        }
    }
}

/// `rmdir`; `true` when the directory is gone.
fn rmdir(dir: &Path) -> bool {
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Removes the empty `app-*` groups an earlier run of this node left in
/// `dir` (busy ones stay; they are reused if their app comes back).
fn remove_empty_app_groups(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().as_encoded_bytes().starts_with(b"app-") {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// The device control of one node.
#[derive(Debug)]
pub struct Devices {
    spec: DeviceSpec,
    base: Option<Backend>,
    reason: Option<String>,
}

impl Devices {
    /// Detects what the node allows, says it once in the log and in the gauge:
    /// the v2 hierarchy on a pure v2 host, else the v1 devices controller, else
    /// (a hybrid host without it) the v2 mount at `/sys/fs/cgroup/unified`.
    pub fn detect(node: NodeId, spec: DeviceSpec) -> Devices {
        let order: &[Hierarchy] = if Path::new(v2::MOUNT).join("cgroup.controllers").exists() {
            &[Hierarchy::V2(v2::MOUNT)]
        } else {
            &[Hierarchy::V1(v1::MOUNT), Hierarchy::V2(v2::HYBRID_MOUNT)]
        };
        Devices::detect_at(order, node, spec)
    }

    /// As [`Devices::detect`], trying these hierarchies in order.
    pub fn detect_at(order: &[Hierarchy], node: NodeId, spec: DeviceSpec) -> Devices {
        let (base, reason) = match spec.mode {
            GpuDevicesMode::Env => (None, Some("gpu_devices = \"env\"".to_string())),
            GpuDevicesMode::Auto | GpuDevicesMode::Cgroup => {
                let mut why = Vec::new();
                let mut found = None;
                for h in order {
                    let r = match *h {
                        Hierarchy::V1(m) => v1::Base::detect(Path::new(m), node).map(Backend::V1),
                        Hierarchy::V2(m) => v2::Base::detect(Path::new(m), node, spec.major).map(Backend::V2),
                    };
                    match r {
                        Ok(b) => {
                            found = Some(b);
                            break;
                        }
                        Err(e) => why.push(e),
                    }
                }
                let reason = if found.is_none() { Some(why.join("; ")) } else { None };
                (found, reason)
            }
        };
        let d = Devices { spec, base, reason };
        match (&d.base, &d.reason) {
            (Some(b), _) => {
                tracing::info!(base = %b.dir().display(), major = d.spec.major, mode = b.mode(), "GPU device rules")
            }
            (None, Some(why)) if d.spec.mode == GpuDevicesMode::Cgroup => {
                tracing::error!(reason = %why, "gpu_devices = \"cgroup\" but no device rules can be set: apps will not start");
            }
            (None, why) if d.spec.mode == GpuDevicesMode::Env => {
                tracing::info!(reason = ?why, "no GPU device rules: apps run with CUDA_VISIBLE_DEVICES only");
            }
            (None, why) => {
                tracing::warn!(reason = ?why, "no GPU device rules: apps run with CUDA_VISIBLE_DEVICES only")
            }
        }
        metrics::gauge!(names::CLUSTER_GPU_DEVICE_RULES, "mode" => d.mode()).set(1.0);
        if d.base.is_some() {
            d.check_nodes();
        }
        d
    }

    /// A node without rules (the enforcer's tests).
    pub fn env_only() -> Devices {
        Devices {
            spec: DeviceSpec { mode: GpuDevicesMode::Env, ..DeviceSpec::default() },
            base: None,
            reason: Some("gpu_devices = \"env\"".into()),
        }
    }

    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    /// `cgroup-v1`, `cgroup-v2` or `env`.
    pub fn mode(&self) -> &'static str {
        self.base.as_ref().map_or("env", Backend::mode)
    }

    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            configured: self.spec.mode.as_str(),
            mode: self.mode(),
            reason: self.reason.clone(),
            major: self.spec.major,
            dir: self.spec.dir.display().to_string(),
            cgroup_base: self.base.as_ref().map(|b| b.dir().display().to_string()),
        }
    }

    /// The group of `app` (`reuse`d, or created) with rules for `gpus`:
    /// `Ok(None)` without rules (env, or auto without the controller); `Err`
    /// when they are required (`cgroup`) but unavailable, or setting them
    /// failed (with the group, if there is one, for the caller to remove).
    pub fn confine(
        &self,
        app: AppId,
        gpus: &[u32],
        reuse: Option<Group>,
    ) -> Result<Option<Group>, (DeviceError, Option<Group>)> {
        let Some(base) = &self.base else {
            if self.spec.mode == GpuDevicesMode::Cgroup {
                let why = self.reason.as_deref().unwrap_or("no controller");
                return Err((DeviceError::Rules(format!("gpu_devices = \"cgroup\" but {why}")), reuse));
            }
            return Ok(None);
        };
        let group = match reuse {
            Some(g) => g,
            None => base.group(app).map_err(|e| (e, None))?,
        };
        match group.set_rules(self.spec.major, gpus) {
            Ok(()) => Ok(Some(group)),
            Err(e) => Err((e, Some(group))),
        }
    }

    /// Removes this node's (empty) base group; at the enforcer's end.
    pub fn remove_base(&self) {
        if let Some(b) = &self.base {
            let _ = std::fs::remove_dir(b.dir());
        }
    }

    /// Whether a failure to confine an app keeps it from starting.
    pub fn required(&self) -> bool {
        self.spec.mode == GpuDevicesMode::Cgroup
    }

    /// `GATI_GPU_DEVICES`: the granted GPUs' device nodes, comma-separated.
    pub fn paths(&self, gpus: &[u32]) -> String {
        gpus.iter().map(|&g| self.spec.node_path(g).display().to_string()).collect::<Vec<_>>().join(",")
    }

    /// Warns (once) of declared GPUs whose node is missing or not the
    /// expected character device (the rules go by major:minor, not by path).
    fn check_nodes(&self) {
        let odd: Vec<u32> = (0..self.spec.gpus)
            .filter(|&g| {
                !std::fs::metadata(self.spec.node_path(g)).is_ok_and(|m| {
                    let rdev = m.rdev();
                    m.file_type().is_char_device() && libc::major(rdev) == self.spec.major && libc::minor(rdev) == g
                })
            })
            .collect();
        if !odd.is_empty() {
            tracing::warn!(
                dir = %self.spec.dir.display(),
                major = self.spec.major,
                gpus = ?odd,
                "declared GPUs without their device node <dir>/nvidia<i> (c major:i); rules still apply by major:minor"
            );
        }
    }
}

/// Makes the child of `cmd` join `group` between fork and exec.
pub fn join_before_exec(cmd: &mut Command, group: &Group) {
    let procs: CString = group.procs_path().clone();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes open(2), write(2) and close(2) calls on a path prepared before
    // the fork (no allocation); writing "0" to cgroup.procs moves the caller.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}
