//! Enforcement on the node: an app whose lease has GPUs on this node runs its
//! command here with only those GPUs visible (`CUDA_VISIBLE_DEVICES` = their
//! local indices); when its GPUs here change or its lease ends, the process
//! group gets SIGTERM (the checkpoint signal) and, `grace` later, SIGKILL.
//!
//! [`Enforcer::reconcile`] is called on a short tick with the node's view of
//! the leases; it is idempotent. A change must persist for [`SETTLE`] before
//! the process is signalled: a renewal arrives as `revoke` + `grant` of the
//! same GPUs, and a tick between the two must not stop the app. An app's
//! process that exits on its own is not restarted until its GPUs here change.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::app::AppId;
use super::gpu::NodeId;

/// How long an app's GPUs here must stay changed before its process is stopped.
pub const SETTLE: Duration = Duration::from_millis(250);

/// One app's process on this node.
#[derive(Debug)]
struct Running {
    child: Child,
    gpus: Vec<u32>,
    /// Since when its desired GPUs differ from `gpus`.
    changed_at: Option<Instant>,
    term_at: Option<Instant>,
}

/// The processes of the apps leased GPUs on this node.
#[derive(Debug)]
pub struct Enforcer {
    node: NodeId,
    grace: Duration,
    settle: Duration,
    running: HashMap<AppId, Running>,
    /// Apps whose process exited on its own, with the GPUs it had.
    exited: HashMap<AppId, Vec<u32>>,
}

/// What an app should have on this node: its local GPU indices and command.
pub type Desired = BTreeMap<AppId, (Vec<u32>, Vec<String>)>;

impl Enforcer {
    pub fn new(node: NodeId, grace: Duration) -> Enforcer {
        Enforcer { node, grace, settle: SETTLE, running: HashMap::new(), exited: HashMap::new() }
    }

    /// Processes running (pid per app).
    pub fn pids(&self) -> BTreeMap<AppId, u32> {
        self.running.iter().map(|(&a, r)| (a, r.child.id())).collect()
    }

    /// Brings the processes in line with `desired`.
    pub fn reconcile(&mut self, desired: &Desired) {
        let now = Instant::now();
        // Reap and signal.
        let mut gone = Vec::new();
        for (&app, r) in &mut self.running {
            if let Ok(Some(status)) = r.child.try_wait() {
                tracing::info!(app, %status, "app process exited");
                if r.term_at.is_none() {
                    self.exited.insert(app, r.gpus.clone());
                }
                gone.push(app);
                continue;
            }
            let keep = desired.get(&app).is_some_and(|(g, _)| *g == r.gpus);
            r.changed_at = if keep { None } else { r.changed_at.or(Some(now)) };
            let settled = r.changed_at.is_some_and(|t| now.duration_since(t) >= self.settle);
            match r.term_at {
                None if settled => {
                    tracing::info!(app, "lease ended here: SIGTERM (checkpoint)");
                    signal(&r.child, libc::SIGTERM);
                    r.term_at = Some(now);
                }
                Some(t) if now.duration_since(t) >= self.grace => signal(&r.child, libc::SIGKILL),
                _ => {}
            }
        }
        for app in gone {
            self.running.remove(&app);
        }
        self.exited.retain(|app, gpus| desired.get(app).is_some_and(|(g, _)| g == gpus));
        // Start what should run and does not.
        for (&app, (gpus, command)) in desired {
            if self.running.contains_key(&app) || self.exited.contains_key(&app) || command.is_empty() {
                continue;
            }
            match spawn(self.node, app, gpus, command) {
                Ok(child) => {
                    tracing::info!(app, pid = child.id(), ?gpus, "app started");
                    self.running.insert(app, Running { child, gpus: gpus.clone(), changed_at: None, term_at: None });
                }
                Err(e) => {
                    tracing::error!(app, error = %e, "app command did not start");
                    self.exited.insert(app, gpus.clone());
                }
            }
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
        for r in self.running.values_mut() {
            signal(&r.child, libc::SIGKILL);
            let _ = r.child.wait();
        }
        self.running.clear();
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        for r in self.running.values_mut() {
            signal(&r.child, libc::SIGKILL);
            let _ = r.child.wait();
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

fn spawn(node: NodeId, app: AppId, gpus: &[u32], command: &[String]) -> std::io::Result<Child> {
    let visible = gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("CUDA_VISIBLE_DEVICES", visible)
        .env("GATI_APP_ID", app.to_string())
        .env("GATI_NODE_ID", node.to_string())
        .stdin(Stdio::null())
        .process_group(0);
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

    fn poll(what: &str, mut f: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < until, "{what}: not within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_app_sees_its_gpus_survives_a_renewal_and_is_terminated_then_killed() {
        let dir = std::env::temp_dir().join(format!("gati-enforce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seen = dir.join("seen");
        // Ignores SIGTERM: only SIGKILL stops it.
        let script = format!(
            "trap '' TERM; echo \"$CUDA_VISIBLE_DEVICES $GATI_APP_ID\" > {}; while :; do sleep 0.05; done",
            seen.display()
        );
        let cmd = vec!["sh".to_string(), "-c".into(), script];
        let mut e = Enforcer::new(3, Duration::from_millis(200));
        let mut want = Desired::new();
        want.insert(7, (vec![2, 3], cmd.clone()));
        e.reconcile(&want);
        let pid = e.pids()[&7];
        poll("the app wrote what it sees", || std::fs::read_to_string(&seen).is_ok_and(|s| s.trim() == "2,3 7"));
        // A one-tick gap (revoke, then the renewal's grant) does not stop it.
        e.reconcile(&Desired::new());
        e.reconcile(&want);
        std::thread::sleep(SETTLE + Duration::from_millis(50));
        e.reconcile(&want);
        assert_eq!(e.pids().get(&7), Some(&pid), "renewed app kept running");
        // The lease ends: SIGTERM (ignored), then SIGKILL after the grace period.
        poll("the app was stopped", || {
            e.reconcile(&Desired::new());
            e.pids().is_empty()
        });
        // Exited because we stopped it: started again when it is leased again.
        e.reconcile(&want);
        assert_eq!(e.pids().len(), 1);
        e.stop_all();
        assert!(e.pids().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
