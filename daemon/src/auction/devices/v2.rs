//! cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program (`ebpf/devices.bpf.c`)
//! attached to each app's group `<v2 mount>/<gatid's group>/gati/node-<id>/app-<app>`,
//! and one map of allowed GPU minors per group, keyed by the group's id (the
//! inode number of its directory, what `bpf_get_current_cgroup_id` returns).
//!
//! The program is loaded once per node (root: CAP_BPF + CAP_SYS_ADMIN);
//! each group gets its own link (fd-based: it goes with gatid). A process in
//! a group below an app's (which has no entry of its own) can open no GPU.
//! On a hybrid host (v1 controllers and a v2 mount at `/sys/fs/cgroup/unified`)
//! the program applies too: the kernel runs it before the v1 rules.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::cgroup_device::CgroupDeviceLinkId;
use aya::programs::{CgroupAttachMode, CgroupDevice};
use aya::{Ebpf, EbpfLoader};

use super::{DeviceError, MAX_GPU_MINOR};
use crate::auction::app::AppId;
use crate::auction::gpu::NodeId;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/devices.bpf.o"));
const PROGRAM: &str = "gati_dev";
const MAP: &str = "gati_dev_rules";
/// Most app groups with rules (`GATI_DEV_MAX_GROUPS`).
pub const MAX_GROUPS: usize = 1024;

/// Where a pure cgroup-v2 host mounts the hierarchy.
pub const MOUNT: &str = "/sys/fs/cgroup";
/// Where a hybrid host mounts it.
pub const HYBRID_MOUNT: &str = "/sys/fs/cgroup/unified";

/// `struct gati_dev_rules` (ebpf/devices.h).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DevRules {
    pub major: u32,
    pub pad: u32,
    /// Bit `m`: minor `m` may be opened.
    pub allowed: [u64; 4],
}

// SAFETY: plain integers, no padding (40 bytes = 2 × u32 + 4 × u64), any bit pattern is valid.
unsafe impl aya::Pod for DevRules {}

impl DevRules {
    pub fn of(major: u32, allowed: &[u32]) -> DevRules {
        let mut r = DevRules { major, ..DevRules::default() };
        for &m in allowed.iter().filter(|&&m| m <= MAX_GPU_MINOR) {
            r.allowed[(m / 64) as usize] |= 1 << (m % 64);
        }
        r
    }
}

/// The loaded program and its map.
struct Kernel {
    ebpf: Ebpf,
    rules: BpfHashMap<MapData, u64, DevRules>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernel(gati_dev)")
    }
}

type Shared = Arc<Mutex<Kernel>>;

fn lock(k: &Shared) -> MutexGuard<'_, Kernel> {
    k.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Kernel {
    fn program(&mut self) -> Result<&mut CgroupDevice, DeviceError> {
        let p = self.ebpf.program_mut(PROGRAM).ok_or_else(|| DeviceError::Rules(format!("no program {PROGRAM}")))?;
        p.try_into().map_err(|e| DeviceError::Rules(format!("{PROGRAM}: {e}")))
    }
}

/// Where this node's app groups go, and the program they get.
#[derive(Debug, Clone)]
pub struct Base {
    dir: PathBuf,
    kernel: Shared,
}

impl Base {
    /// Finds the v2 hierarchy at `mount`, creates `gati/node-<node>` under
    /// gatid's own group and loads the program; `Err` says why not.
    pub fn detect(mount: &Path, node: NodeId, major: u32) -> Result<Base, String> {
        let built = env!("GATI_DEV_BPF_BUILD");
        if built != "ok" {
            return Err(format!("the cgroup-v2 device program was not built: {built}"));
        }
        if !mount.join("cgroup.controllers").exists() {
            return Err(format!("no cgroup v2 hierarchy at {}", mount.display()));
        }
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no v2 entry in /proc/self/cgroup")?;
        let gati = mount.join(path.trim_start_matches('/')).join("gati");
        let dir = gati.join(format!("node-{node}"));
        for d in [&gati, &dir] {
            if let Err(e) = fs::create_dir(d) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(format!("cgroup v2: mkdir {}: {e} (needs root or a delegated subtree)", d.display()));
                }
            }
        }
        super::remove_empty_app_groups(&dir);
        let mut ebpf = EbpfLoader::new()
            .override_global("gati_dev_major", &major, true)
            .load(OBJECT)
            .map_err(|e| format!("loading the device program: {e}"))?;
        let prog: &mut CgroupDevice = ebpf
            .program_mut(PROGRAM)
            .ok_or("the device object has no gati_dev")?
            .try_into()
            .map_err(|e| format!("gati_dev: {e}"))?;
        prog.load().map_err(|e| format!("the kernel refused the device program: {}", chain(&e)))?;
        let map = ebpf.take_map(MAP).ok_or("the device object has no gati_dev_rules")?;
        let rules = BpfHashMap::try_from(map).map_err(|e| format!("gati_dev_rules: {e}"))?;
        Ok(Base { dir, kernel: Arc::new(Mutex::new(Kernel { ebpf, rules })) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The group of `app`, created (or reused when it exists) with the program attached.
    pub fn group(&self, app: AppId) -> Result<Group, DeviceError> {
        let dir = self.dir.join(format!("app-{app}"));
        if let Err(source) = fs::create_dir(&dir) {
            if source.kind() != io::ErrorKind::AlreadyExists {
                return Err(DeviceError::Io { op: "mkdir", path: dir, source });
            }
        }
        let io = |op, source| DeviceError::Io { op, path: dir.clone(), source };
        let id = fs::metadata(&dir).map_err(|e| io("stat", e))?.ino();
        let fd = fs::File::open(&dir).map_err(|e| io("open", e))?;
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| DeviceError::Rules(format!("{} holds a NUL byte", dir.display())))?;
        let mut k = lock(&self.kernel);
        // No GPU until the rules are written.
        k.rules.insert(id, DevRules::of(0, &[]), 0).map_err(|e| DeviceError::Rules(format!("{MAP}: {e}")))?;
        let link = match k.program()?.attach(&fd, CgroupAttachMode::Single) {
            Ok(l) => l,
            Err(e) => {
                let _ = k.rules.remove(&id);
                return Err(DeviceError::Rules(format!("attaching {PROGRAM} to {}: {}", dir.display(), chain(&e))));
            }
        };
        drop(k);
        Ok(Group { dir, procs, id, link: Some(link), kernel: Arc::clone(&self.kernel) })
    }
}

/// One app's group.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    procs: CString,
    /// The group's cgroup id (its inode): the map key.
    id: u64,
    link: Option<CgroupDeviceLinkId>,
    kernel: Shared,
}

impl Group {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn procs_path(&self) -> &CString {
        &self.procs
    }

    /// Lets the group open exactly the GPU minors `allowed` of `major`.
    pub fn set_rules(&self, major: u32, allowed: &[u32]) -> Result<(), DeviceError> {
        lock(&self.kernel)
            .rules
            .insert(self.id, DevRules::of(major, allowed), 0)
            .map_err(|e| DeviceError::Rules(format!("{MAP}: {e}")))
    }

    /// Removes the group; `false` while processes keep it busy. Its link
    /// and map entry go with it.
    pub fn try_remove(&mut self) -> bool {
        if !super::rmdir(&self.dir) {
            return false;
        }
        let mut k = lock(&self.kernel);
        let _ = k.rules.remove(&self.id);
        if let Some(link) = self.link.take() {
            if let Ok(p) = k.program() {
                let _ = p.detach(link);
            }
        }
        true
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_set_one_bit_per_allowed_minor() {
        let r = DevRules::of(195, &[0, 1, 63, 64, 253, 254, 255]);
        assert_eq!(r.major, 195);
        assert_eq!(r.allowed, [1 | 2 | 1 << 63, 1, 0, 1 << (253 - 192)]);
    }

    #[cfg(gati_steer_layout)]
    #[test]
    fn rust_mirror_agrees_with_devices_h() {
        use std::mem::{offset_of, size_of};
        mod c {
            include!(concat!(env!("OUT_DIR"), "/devices_layout.rs"));
        }
        assert_eq!(c::GATI_DEV_MAX_GROUPS, MAX_GROUPS);
        assert_eq!(c::GATI_DEV_MAX_GPU_MINOR, MAX_GPU_MINOR as usize);
        assert_eq!(c::SIZEOF_GATI_DEV_RULES, size_of::<DevRules>());
        assert_eq!(c::OFFSETOF_GATI_DEV_RULES_MAJOR, offset_of!(DevRules, major));
        assert_eq!(c::OFFSETOF_GATI_DEV_RULES_ALLOWED, offset_of!(DevRules, allowed));
    }
}
