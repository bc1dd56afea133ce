//! GPU device rules: an app's processes can open only their granted GPUs'
//! device nodes (NVIDIA: character devices major 195, minor = GPU index,
//! `/dev/nvidia<i>`), on top of `CUDA_VISIBLE_DEVICES`.
//!
//! Decided once per node, at start ([`Devices::detect`], `[cluster]
//! gpu_devices`): with the cgroup-v1 `devices` controller mounted and gatid
//! root, each app gets a group of its own ([`v1`]) that its process joins
//! between fork and exec, so it never runs a moment outside its rules.
//! Otherwise (`env`, or `auto` without the controller) apps run with
//! `CUDA_VISIBLE_DEVICES` only; the reason is logged once, shown in `gatictl
//! apps` and Health, and in the `gati_cluster_gpu_device_rules` gauge.
//!
//! The rules cover the GPU minors `0..=MAX_GPU_MINOR` of the configured
//! major; the control nodes (`/dev/nvidiactl` 195:255, `nvidia-modeset`
//! 195:254, `/dev/nvidia-uvm*` on their own major) stay open to every app.

pub mod v1;

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
    /// In use: `cgroup-v1` (device rules) or `env` (`CUDA_VISIBLE_DEVICES` only).
    pub mode: &'static str,
    /// Why there are no device rules, when there are none.
    pub reason: Option<String>,
    pub major: u32,
    pub dir: String,
    /// Where the apps' groups are (cgroup-v1).
    pub cgroup_base: Option<String>,
}

/// One app's rules, as `gatictl apps` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppDevices {
    /// `cgroup-v1` or `env`.
    pub rules: &'static str,
    pub cgroup: Option<String>,
    /// GPUs (local indices) its group may open now.
    pub allowed: Vec<u32>,
}

/// The device control of one node.
#[derive(Debug)]
pub struct Devices {
    spec: DeviceSpec,
    base: Option<v1::Base>,
    reason: Option<String>,
}

impl Devices {
    /// Detects what the node allows, says it once in the log and in the gauge.
    pub fn detect(node: NodeId, spec: DeviceSpec) -> Devices {
        Devices::detect_at(Path::new(v1::MOUNT), node, spec)
    }

    /// As [`Devices::detect`], with the devices controller looked for at `mount`.
    pub fn detect_at(mount: &Path, node: NodeId, spec: DeviceSpec) -> Devices {
        let (base, reason) = match spec.mode {
            GpuDevicesMode::Env => (None, Some("gpu_devices = \"env\"".to_string())),
            GpuDevicesMode::Auto | GpuDevicesMode::Cgroup => match v1::Base::detect(mount, node) {
                Ok(b) => (Some(b), None),
                Err(why) => (None, Some(why)),
            },
        };
        let d = Devices { spec, base, reason };
        match (&d.base, &d.reason) {
            (Some(b), _) => {
                tracing::info!(base = %b.dir().display(), major = d.spec.major, "GPU device rules: cgroup v1")
            }
            (None, Some(why)) if d.spec.mode == GpuDevicesMode::Cgroup => {
                tracing::error!(reason = %why, "gpu_devices = \"cgroup\" but no device rules can be set: apps will not start");
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

    /// `cgroup-v1` or `env`.
    pub fn mode(&self) -> &'static str {
        if self.base.is_some() {
            "cgroup-v1"
        } else {
            "env"
        }
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
        reuse: Option<v1::Group>,
    ) -> Result<Option<v1::Group>, (DeviceError, Option<v1::Group>)> {
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

    /// Whether a failure to confine an app keeps it from starting.
    pub fn required(&self) -> bool {
        self.spec.mode == GpuDevicesMode::Cgroup
    }

    /// `GATI_GPU_DEVICES`: the granted GPUs' device nodes, comma-separated.
    pub fn paths(&self, gpus: &[u32]) -> String {
        gpus.iter().map(|&g| self.spec.node_path(g).display().to_string()).collect::<Vec<_>>().join(",")
    }

    /// Warns of declared GPUs whose node is missing or not the expected
    /// character device (the rules go by major:minor, not by path).
    fn check_nodes(&self) {
        for g in 0..self.spec.gpus {
            let path = self.spec.node_path(g);
            let ok = std::fs::metadata(&path).is_ok_and(|m| {
                let rdev = m.rdev();
                m.file_type().is_char_device() && libc::major(rdev) == self.spec.major && libc::minor(rdev) == g
            });
            if !ok {
                tracing::warn!(path = %path.display(), major = self.spec.major, minor = g, "declared GPU has no such device node");
            }
        }
    }
}

/// Makes the child of `cmd` join `group` between fork and exec.
pub fn join_before_exec(cmd: &mut Command, group: &v1::Group) {
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
