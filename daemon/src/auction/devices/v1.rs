//! The cgroup-v1 `devices` controller: one group per app under
//! `<devices mount>/<gatid's group>/gati/node-<id>/app-<app>`, whose rules
//! let it open only its granted GPUs' device nodes.
//!
//! The v1 controller keeps a default (allow or deny, inherited from the
//! parent) and a list of exceptions that only ever match exactly: an `allow`
//! of `c 195:1` does not punch a hole in a `deny` of `c 195:*`. So the rules
//! are written minor by minor, every GPU minor `0..=MAX_GPU_MINOR` of the
//! major, each time in full (idempotent, whatever the group held before):
//! - under a default-allow parent (the usual host): `deny` of every minor not
//!   granted, `allow` of the granted (which removes an earlier deny);
//! - under an allow-list parent (a container): the same, after a `deny` of
//!   `c <major>:*` (which removes a wildcard entry the group inherited); the
//!   control nodes (minors above `MAX_GPU_MINOR`) are allowed again if the
//!   parent allows them, and the resulting `devices.list` is checked.
//!
//! Every other device (`/dev/null`, the UVM and InfiniBand nodes, ...) is left
//! as the parent has it.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{DeviceError, MAX_GPU_MINOR};
use crate::auction::app::AppId;
use crate::auction::gpu::NodeId;

/// Where hosts mount the controller.
pub const MOUNT: &str = "/sys/fs/cgroup/devices";

/// Where this node's app groups go.
#[derive(Debug, Clone)]
pub struct Base {
    dir: PathBuf,
}

impl Base {
    /// Finds the devices controller and creates `gati/node-<node>` under
    /// gatid's own group; `Err` says why there is none (not mounted, not
    /// root). Empty `app-*` groups a previous run of this node left are removed.
    pub fn detect(mount: &Path, node: NodeId) -> Result<Base, String> {
        if !mount.join("devices.allow").exists() {
            return Err(format!("no cgroup-v1 devices controller at {}", mount.display()));
        }
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let path = crate::sandbox::cgroup::v1_own_path(&own, "devices");
        let gati = mount.join(path.trim_start_matches('/')).join("gati");
        let dir = gati.join(format!("node-{node}"));
        for d in [&gati, &dir] {
            if let Err(e) = fs::create_dir(d) {
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(format!("cgroup v1 devices: mkdir {}: {e} (needs root)", d.display()));
                }
            }
        }
        super::remove_empty_app_groups(&dir);
        Ok(Base { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The group of `app` (created, or reused when it exists).
    pub fn group(&self, app: AppId) -> Result<Group, DeviceError> {
        let dir = self.dir.join(format!("app-{app}"));
        if let Err(source) = fs::create_dir(&dir) {
            if source.kind() != io::ErrorKind::AlreadyExists {
                return Err(DeviceError::Io { op: "mkdir", path: dir, source });
            }
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| DeviceError::Rules(format!("{} holds a NUL byte", dir.display())))?;
        Ok(Group { dir, procs })
    }
}

/// One app's group.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for the child between fork and exec.
    procs: CString,
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
        let list = self.read("devices.list")?;
        let default_allow = list.lines().any(|l| l.trim() == "a *:* rwm");
        if !default_allow {
            self.write("devices.deny", &format!("c {major}:* rwm"))?;
        }
        for minor in 0..=MAX_GPU_MINOR {
            let (file, rule) =
                if allowed.contains(&minor) { ("devices.allow", "rwm") } else { ("devices.deny", "rwm") };
            self.write(file, &format!("c {major}:{minor} {rule}"))?;
        }
        if default_allow {
            return Ok(());
        }
        // Allow-list: the control nodes back (where the parent allows them), then check.
        for minor in MAX_GPU_MINOR + 1..=255 {
            let _ = self.write("devices.allow", &format!("c {major}:{minor} rwm"));
        }
        let list = self.read("devices.list")?;
        if let Some(bad) = list.lines().find(|l| grants_other(l, major, allowed)) {
            return Err(DeviceError::Rules(format!("{} still lists `{bad}`", self.dir.join("devices.list").display())));
        }
        Ok(())
    }

    /// Removes the group; `false` while processes keep it busy.
    pub fn try_remove(&mut self) -> bool {
        super::rmdir(&self.dir)
    }

    fn read(&self, file: &str) -> Result<String, DeviceError> {
        let path = self.dir.join(file);
        fs::read_to_string(&path).map_err(|source| DeviceError::Io { op: "read", path, source })
    }

    fn write(&self, file: &str, rule: &str) -> Result<(), DeviceError> {
        let path = self.dir.join(file);
        fs::write(&path, rule).map_err(|source| DeviceError::Io { op: "write", path, source })
    }
}

/// Whether a `devices.list` line lets the group open a GPU minor of `major`
/// outside `allowed` (a wildcard on the major or on everything counts).
fn grants_other(line: &str, major: u32, allowed: &[u32]) -> bool {
    let mut it = line.split_whitespace();
    let (Some(kind), Some(numbers), Some(access)) = (it.next(), it.next(), it.next()) else { return false };
    if !access.contains(['r', 'w']) {
        return false; // `m` only: mknod, not open
    }
    if kind == "a" {
        return true;
    }
    if kind != "c" {
        return false;
    }
    let Some((maj, min)) = numbers.split_once(':') else { return false };
    if maj != "*" && maj.parse::<u32>().ok() != Some(major) {
        return false;
    }
    match min.parse::<u32>() {
        Ok(m) => m <= MAX_GPU_MINOR && !allowed.contains(&m),
        Err(_) => true, // `*`
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under a parent that is an allow-list (as in a container: `a` denied,
    /// `c 195:*` and a few others allowed) the group ends up allowing the
    /// granted minor and the control minors, nothing else of 195, and a
    /// process in it opens exactly that.
    #[test]
    #[cfg_attr(gati_unprivileged, ignore = "needs root: the cgroup-v1 devices controller")]
    fn under_an_allow_list_parent_only_the_granted_minor_and_the_control_nodes_stay() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root; rebuild as the user who runs it");
        let mount = Path::new(MOUNT);
        assert!(mount.join("devices.allow").exists(), "no cgroup-v1 devices controller at {MOUNT}");
        let parent = mount.join("gati").join(format!("test-allow-list-{}", std::process::id()));
        fs::create_dir_all(&parent).unwrap();
        for (file, rule) in [("devices.deny", "a"), ("devices.allow", "c 195:* rwm"), ("devices.allow", "c 1:3 rwm")] {
            fs::write(parent.join(file), rule).unwrap();
        }
        let base = Base { dir: parent.clone() };
        let group = base.group(7).unwrap();
        group.set_rules(195, &[1]).unwrap();
        let list = fs::read_to_string(group.dir().join("devices.list")).unwrap();
        let mut lines: Vec<&str> = list.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["c 195:1 rwm", "c 195:254 rwm", "c 195:255 rwm", "c 1:3 rwm"], "{list}");
        // A process in the group: 195:1 is allowed (ENXIO: no driver), 195:0 is not (EPERM).
        let dev = std::env::temp_dir().join(format!("gati-allow-list-{}", std::process::id()));
        fs::create_dir_all(&dev).unwrap();
        for m in [0, 1] {
            let st = std::process::Command::new("mknod")
                .arg(dev.join(format!("g{m}")))
                .args(["c", "195", &m.to_string()])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(format!(
            "for m in 0 1; do e=$( {{ head -c0 < {}/g$m; }} 2>&1 ); case \"$e\" in *'not permitted'*) echo $m:denied;; *) echo $m:open;; esac; done",
            dev.display()
        ));
        super::super::join_before_exec(&mut cmd, &super::super::Group::V1(base.group(7).unwrap()));
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "0:denied\n1:open\n");
        let mut g = group;
        assert!(g.try_remove());
        fs::remove_dir(&parent).unwrap();
        let _ = fs::remove_dir_all(&dev);
    }

    #[test]
    fn a_list_line_that_lets_other_gpus_through_is_found() {
        assert!(grants_other("a *:* rwm", 195, &[1]));
        assert!(grants_other("c 195:* rwm", 195, &[1]));
        assert!(grants_other("c *:* rwm", 195, &[1]));
        assert!(!grants_other("c *:* m", 195, &[1]));
        assert!(grants_other("c 195:0 rw", 195, &[1]));
        assert!(!grants_other("c 195:1 rwm", 195, &[1]));
        assert!(!grants_other("c 195:255 rwm", 195, &[1]));
        assert!(!grants_other("c 1:3 rwm", 195, &[1]));
        assert!(!grants_other("b 195:0 rwm", 195, &[1]));
    }
}
