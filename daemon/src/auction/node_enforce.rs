//! Enforcement on the node: an app whose lease has GPUs on this node runs its
//! command here with only those GPUs visible (`CUDA_VISIBLE_DEVICES` = their
//! local indices) and, where the node allows it, only those GPUs' device
//! nodes openable (a cgroup of its own with device rules, [`super::devices`],
//! joined before exec); when its GPUs here or its gang change or its lease
//! ends, the process group gets SIGTERM (the checkpoint signal) and, `grace`
//! later, SIGKILL (with whatever else is left in its cgroup).
//!
//! [`Enforcer::reconcile`] is called on a short tick with the node's view of
//! the leases; it is idempotent. A change must persist for [`SETTLE`] before
//! the process is signalled: a renewal arrives as `revoke` + `grant` of the
//! same GPUs, and a tick between the two must not stop the app. At the
//! SIGTERM the rules narrow to the GPUs it keeps (files it has open stay
//! usable for the checkpoint; it cannot open a revoked GPU again); the next
//! process starts with the rules of its new GPUs. An app's process that exits
//! on its own is not restarted until its GPUs here change. Its cgroup is
//! removed when the app neither runs nor is leased GPUs here any more.
//!
//! Each process is told its place in the app's gang ([`super::gang`]):
//! `GATI_RANK`, `GATI_WORLD_SIZE`, `GATI_NODES`, ... (`docs/auction.md`).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::app::AppId;
use super::devices::{self, AppDevices, DeviceSpec, Devices, Group};
use super::gang::{Want, WantKey};
use super::gpu::NodeId;
use super::node::ClusterNode;
use crate::telemetry::names;

/// How long an app's GPUs here must stay changed before its process is stopped.
pub const SETTLE: Duration = Duration::from_millis(250);

/// One app's process on this node.
#[derive(Debug)]
struct Running {
    child: Child,
    key: WantKey,
    /// Since when its desired GPUs differ from `key`.
    changed_at: Option<Instant>,
    term_at: Option<Instant>,
}

/// The processes of the apps leased GPUs on this node.
#[derive(Debug)]
pub struct Enforcer {
    node: NodeId,
    grace: Duration,
    settle: Duration,
    devices: Devices,
    /// The running node, told of the device rules (absent in tests).
    publish: Option<Arc<ClusterNode>>,
    running: HashMap<AppId, Running>,
    /// Apps whose process exited on its own, with what it had.
    exited: HashMap<AppId, WantKey>,
    /// Each app's cgroup, while it runs or is leased GPUs here.
    groups: HashMap<AppId, (Group, Vec<u32>)>,
    /// Groups still busy (processes leaving) when their app ended.
    leftover: Vec<Group>,
    published: BTreeMap<AppId, AppDevices>,
}

/// What each app should have on this node.
pub type Desired = BTreeMap<AppId, Want>;

impl Enforcer {
    /// The enforcer of the running node `node` (its `[cluster]` device
    /// settings, from [`super::node::current`]; the defaults without one).
    pub fn new(node: NodeId, grace: Duration) -> Enforcer {
        let current = super::node::current().filter(|n| n.id() == node);
        let spec = current.as_ref().map_or_else(DeviceSpec::default, |n| DeviceSpec::of(&n.cfg));
        let mut e = Enforcer::with_devices(node, grace, Devices::detect(node, spec));
        if let Some(n) = &current {
            n.set_devices(e.devices.status());
        }
        e.publish = current;
        e
    }

    /// An enforcer with these device rules, reporting to no node.
    pub fn with_devices(node: NodeId, grace: Duration, devices: Devices) -> Enforcer {
        Enforcer {
            node,
            grace,
            settle: SETTLE,
            devices,
            publish: None,
            running: HashMap::new(),
            exited: HashMap::new(),
            groups: HashMap::new(),
            leftover: Vec::new(),
            published: BTreeMap::new(),
        }
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Processes running (pid per app).
    pub fn pids(&self) -> BTreeMap<AppId, u32> {
        self.running.iter().map(|(&a, r)| (a, r.child.id())).collect()
    }

    /// Each app's device rules now.
    pub fn app_devices(&self) -> BTreeMap<AppId, AppDevices> {
        self.running
            .keys()
            .map(|&app| {
                let d = match self.groups.get(&app) {
                    Some((g, allowed)) => AppDevices {
                        rules: g.kind(),
                        cgroup: Some(g.dir().display().to_string()),
                        allowed: allowed.clone(),
                    },
                    None => AppDevices { rules: "env", cgroup: None, allowed: Vec::new() },
                };
                (app, d)
            })
            .collect()
    }

    /// Brings the processes in line with `desired`.
    pub fn reconcile(&mut self, desired: &Desired) {
        let now = Instant::now();
        let major = self.devices.spec().major;
        // Reap and signal.
        let mut gone = Vec::new();
        for (&app, r) in &mut self.running {
            if let Ok(Some(status)) = r.child.try_wait() {
                tracing::info!(app, %status, "app process exited");
                if r.term_at.is_none() {
                    self.exited.insert(app, r.key.clone());
                }
                gone.push(app);
                continue;
            }
            let want = desired.get(&app);
            let keep = want.is_some_and(|w| w.key() == r.key);
            r.changed_at = if keep { None } else { r.changed_at.or(Some(now)) };
            let settled = r.changed_at.is_some_and(|t| now.duration_since(t) >= self.settle);
            match r.term_at {
                None if settled => {
                    // First the rules, then the signal: the checkpoint already runs under them.
                    if let Some((g, allowed)) = self.groups.get_mut(&app) {
                        // The GPUs it keeps, only: revoked ones cannot be opened again.
                        let still: &[u32] = want.map_or(&[][..], |w| &w.gpus[..]);
                        let kept: Vec<u32> = r.key.gpus().iter().copied().filter(|x| still.contains(x)).collect();
                        match g.set_rules(major, &kept) {
                            Ok(()) => *allowed = kept,
                            Err(e) => tracing::error!(app, error = %e, "narrowing the device rules failed"),
                        }
                    }
                    tracing::info!(app, "lease changed or ended here: SIGTERM (checkpoint)");
                    signal(&r.child, libc::SIGTERM);
                    r.term_at = Some(now);
                }
                Some(t) if now.duration_since(t) >= self.grace => {
                    signal(&r.child, libc::SIGKILL);
                    if let Some((g, _)) = self.groups.get(&app) {
                        g.kill_all();
                    }
                }
                _ => {}
            }
        }
        for app in gone {
            self.running.remove(&app);
        }
        self.exited.retain(|app, key| desired.get(app).is_some_and(|w| w.key() == *key));
        // Start what should run and does not.
        for (&app, want) in desired {
            if self.running.contains_key(&app) || self.exited.contains_key(&app) || want.command.is_empty() {
                continue;
            }
            self.start(app, want);
        }
        // Remove the groups of apps that neither run nor wait here.
        let idle: Vec<AppId> = self
            .groups
            .keys()
            .filter(|a| !self.running.contains_key(a) && !self.exited.contains_key(a))
            .copied()
            .collect();
        for app in idle {
            if let Some((mut g, _)) = self.groups.remove(&app) {
                g.kill_all();
                if !g.try_remove() {
                    self.leftover.push(g);
                }
            }
        }
        self.leftover.retain_mut(|g| {
            g.kill_all();
            !g.try_remove()
        });
        self.publish_devices();
    }

    fn start(&mut self, app: AppId, want: &Want) {
        let reuse = self.groups.remove(&app).map(|(g, _)| g);
        let group = match self.devices.confine(app, &want.gpus, reuse) {
            Ok(g) => g,
            Err((e, group)) => {
                // An empty group whose rules did not take is removed.
                self.leftover.extend(group);
                metrics::counter!(names::CLUSTER_GPU_DEVICE_RULE_FAILURES_TOTAL).increment(1);
                if self.devices.required() {
                    tracing::error!(app, error = %e, "device rules could not be set: app not started");
                    self.exited.insert(app, want.key());
                    return;
                }
                tracing::warn!(app, error = %e, "device rules could not be set: app started with CUDA_VISIBLE_DEVICES only");
                None
            }
        };
        let unix_clock = self.publish.as_ref().is_some_and(|n| n.cfg.uses_etcd());
        let rules = group.as_ref().map_or("env", Group::kind);
        let started = spawn(self.node, app, want, &self.devices, group.as_ref(), unix_clock);
        if let Some(g) = group {
            self.groups.insert(app, (g, want.gpus.clone()));
        }
        match started {
            Ok(child) => {
                tracing::info!(app, pid = child.id(), gpus = ?want.gpus, rank = want.gang.rank, rules, "app started");
                self.running.insert(app, Running { child, key: want.key(), changed_at: None, term_at: None });
            }
            Err(e) => {
                tracing::error!(app, error = %e, "app command did not start");
                self.exited.insert(app, want.key());
            }
        }
    }

    fn publish_devices(&mut self) {
        let Some(node) = &self.publish else { return };
        let now = self.app_devices();
        if now != self.published {
            node.set_app_devices(now.clone());
            self.published = now;
        }
    }

    /// Stops every process: SIGTERM, then SIGKILL after the grace period (bounded wait).
    pub fn stop_all(&mut self) {
        self.settle = Duration::ZERO;
        let empty = Desired::new();
        let until = Instant::now() + self.grace + Duration::from_secs(1);
        while !self.running.is_empty() && Instant::now() < until {
            self.reconcile(&empty);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_all();
    }

    /// SIGKILLs and reaps every process; removes every group (bounded retries).
    fn kill_all(&mut self) {
        for r in self.running.values_mut() {
            signal(&r.child, libc::SIGKILL);
            let _ = r.child.wait();
        }
        self.running.clear();
        self.exited.clear();
        self.leftover.extend(self.groups.drain().map(|(_, (g, _))| g));
        for _ in 0..50 {
            self.leftover.retain_mut(|g| {
                g.kill_all();
                !g.try_remove()
            });
            if self.leftover.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for g in &self.leftover {
            tracing::warn!(path = %g.dir().display(), "app cgroup left behind");
        }
        self.publish_devices();
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        self.kill_all();
        if self.leftover.is_empty() {
            self.devices.remove_base();
        }
    }
}

/// Signals the child's process group (its command and what it started).
fn signal(child: &Child, sig: i32) {
    let pid = child.id() as i32;
    // SAFETY: kill(2) on the process group this enforcer created for its own child.
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn spawn(
    node: NodeId,
    app: AppId,
    want: &Want,
    devices: &Devices,
    group: Option<&Group>,
    unix_clock: bool,
) -> std::io::Result<Child> {
    let command = &want.command;
    let visible = want.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("CUDA_VISIBLE_DEVICES", visible)
        // CUDA's indices in PCI order, as nvidia-smi's and the device nodes' minors.
        .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        .env("GATI_APP_ID", app.to_string())
        .env("GATI_NODE_ID", node.to_string())
        .env("GATI_GPU_DEVICES", devices.paths(&want.gpus))
        .env("GATI_GPU_DEVICE_RULES", group.map_or("env", Group::kind))
        .envs(want.gang.env(unix_clock))
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(g) = group {
        devices::join_before_exec(&mut cmd, g);
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // The app dies with the daemon's peer thread (even if the daemon is SIGKILLed).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auction::gang::Gang;
    use crate::config::GpuDevicesMode;

    fn poll(what: &str, mut f: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < until, "{what}: not within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn want(gpus: &[u32], nodes: &[NodeId], rank: usize, command: &[String]) -> Want {
        let gang = Gang { nodes: nodes.to_vec(), node_gpus: vec![gpus.len() as u32; nodes.len()], rank, expiry: 12.5 };
        Want { gpus: gpus.to_vec(), command: command.to_vec(), gang }
    }

    #[test]
    fn an_app_sees_its_gpus_and_gang_survives_a_renewal_and_is_terminated_then_killed() {
        let dir = std::env::temp_dir().join(format!("gati-enforce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seen = dir.join("seen");
        // Ignores SIGTERM: only SIGKILL stops it.
        let script = format!(
            "trap '' TERM; echo \"$CUDA_VISIBLE_DEVICES $GATI_APP_ID $GATI_RANK/$GATI_WORLD_SIZE $GATI_NODES $GATI_LEASE_EXPIRY $GATI_GPU_DEVICE_RULES\" > {}; while :; do sleep 0.05; done",
            seen.display()
        );
        let cmd = vec!["sh".to_string(), "-c".into(), script];
        let mut e = Enforcer::with_devices(3, Duration::from_millis(200), Devices::env_only());
        let mut want_now = Desired::new();
        want_now.insert(7, want(&[2, 3], &[1, 3], 1, &cmd));
        e.reconcile(&want_now);
        let pid = e.pids()[&7];
        poll("the app wrote what it sees", || {
            std::fs::read_to_string(&seen).is_ok_and(|s| s.trim() == "2,3 7 1/2 1,3 12.500 env")
        });
        assert_eq!(e.app_devices()[&7].rules, "env");
        // A one-tick gap (revoke, then the renewal's grant) does not stop it; nor does a new expiry.
        e.reconcile(&Desired::new());
        want_now.get_mut(&7).unwrap().gang.expiry = 99.0;
        e.reconcile(&want_now);
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        e.reconcile(&want_now);
        assert_eq!(e.pids().get(&7), Some(&pid), "renewed app kept running");
        // The gang changes (node 1 leaves it): the process is stopped, then restarted as rank 0 of 1.
        let mut solo = Desired::new();
        solo.insert(7, want(&[2, 3], &[3], 0, &cmd));
        poll("the rank restarted", || {
            e.reconcile(&solo);
            e.pids().get(&7).is_some_and(|&p| p != pid)
        });
        poll("the new rank wrote what it sees", || {
            std::fs::read_to_string(&seen).is_ok_and(|s| s.trim() == "2,3 7 0/1 3 12.500 env")
        });
        // The lease ends: SIGTERM (ignored), then SIGKILL after the grace period.
        poll("the app was stopped", || {
            e.reconcile(&Desired::new());
            e.pids().is_empty()
        });
        // Exited because we stopped it: started again when it is leased again.
        e.reconcile(&solo);
        assert_eq!(e.pids().len(), 1);
        e.stop_all();
        assert!(e.pids().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_devices_controller_auto_runs_on_the_env_and_cgroup_refuses_to_start() {
        let nowhere = &[devices::Hierarchy::V1("/nonexistent/devices"), devices::Hierarchy::V2("/nonexistent/v2")][..];
        let spec = |mode| DeviceSpec { mode, ..DeviceSpec::default() };
        let auto = Devices::detect_at(nowhere, 4, spec(GpuDevicesMode::Auto));
        let st = auto.status();
        assert_eq!((st.configured, st.mode), ("auto", "env"));
        assert!(st.reason.as_deref().is_some_and(|r| r.contains("no cgroup-v1 devices controller")), "{st:?}");
        let cmd = vec!["sleep".to_string(), "30".into()];
        let mut desired = Desired::new();
        desired.insert(1, want(&[0], &[4], 0, &cmd));
        let mut e = Enforcer::with_devices(4, Duration::from_millis(100), auto);
        e.reconcile(&desired);
        assert_eq!(e.pids().len(), 1, "auto: started without rules");
        assert_eq!(e.app_devices()[&1].rules, "env");
        e.stop_all();

        let required = Devices::detect_at(nowhere, 4, spec(GpuDevicesMode::Cgroup));
        assert_eq!(required.mode(), "env");
        let mut e = Enforcer::with_devices(4, Duration::from_millis(100), required);
        e.reconcile(&desired);
        e.reconcile(&desired);
        assert!(e.pids().is_empty(), "cgroup required but unavailable: not started");
        let env = Devices::detect_at(nowhere, 4, spec(GpuDevicesMode::Env));
        assert_eq!(env.status().reason.as_deref(), Some("gpu_devices = \"env\""));
    }
}
