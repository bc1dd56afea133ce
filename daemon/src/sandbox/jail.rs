//! Starting a function in its jail: prepare a [`Plan`] (everything the child
//! needs, allocated up front), `clone3` into new namespaces with a pidfd, let
//! the parent place the child in its cgroup (and write user-namespace id maps
//! when unprivileged), then release it to run the jailer steps
//! (`child.rs`) and `execve`.
//!
//! As root: pid, mount, net, ipc and uts namespaces, a per-sandbox uid/gid.
//! Unprivileged: the same plus a user namespace mapping the daemon's ids to 0.
//! If the kernel refuses namespaces, the function runs without them and
//! [`Isolation`] says so; nothing is claimed that was not applied.

use std::ffi::{c_int, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::cgroup::Cgroup;
use super::child::{self, CStrings, ChildPipes, Step};
use super::{rootfs, seccomp, FunctionSpec, Isolation, SandboxError};

/// First uid/gid given to sandboxes when the daemon runs as root; each
/// sandbox gets its own (mod [`SANDBOX_ID_SPAN`]), so per-uid limits and
/// signals never reach another sandbox.
pub const SANDBOX_ID_BASE: u32 = 1_700_000_000;
pub const SANDBOX_ID_SPAN: u32 = 1_000_000;

/// Descriptors and limits to jail with.
pub struct JailRequest<'a> {
    pub spec: &'a FunctionSpec,
    /// memfd, request eventfd, response eventfd (in the daemon).
    pub fds: [RawFd; 3],
    pub cgroup: Option<&'a Cgroup>,
    /// Address-space limit to set when there is no memory cgroup.
    pub address_space_limit: Option<u64>,
    /// Where the function's stderr goes (a pipe's write end, see
    /// [`super::stderr`]); `None` keeps the daemon's.
    pub stderr: Option<RawFd>,
}

/// A started (exec'd) process.
pub struct Jailed {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub isolation: Isolation,
}

/// Everything the child reads; built before `clone3`.
pub struct Plan {
    pub root: Option<RootPlan>,
    pub hostname: Option<CString>,
    pub devnull: RawFd,
    pub fds: [RawFd; 3],
    /// The function's stderr (the daemon's own when `-1`).
    pub stderr: RawFd,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// Run as `SCHED_BATCH` ([`super::Sched::Batch`]).
    pub batch: bool,
    pub ids: Option<(u32, u32)>,
    pub drop_bounding_set: bool,
    pub cap_last: u32,
    /// Seccomp programs, in install order (see [`seccomp::compile`]).
    pub filters: Vec<Vec<libc::sock_filter>>,
    pub exec: CString,
    pub argv: CStrings,
    pub env: CStrings,
}

/// How the private root is assembled (host paths of the tmpfs mount point).
pub struct RootPlan {
    pub dir: CString,
    pub mkdirs: Vec<CString>,
    pub binds: Vec<(CString, CString)>,
    pub proc_dir: Option<CString>,
    pub old: CString,
}

const NAMESPACES: [(u64, &str); 5] = [
    (libc::CLONE_NEWPID as u64, "pid"),
    (libc::CLONE_NEWNS as u64, "mount"),
    (libc::CLONE_NEWNET as u64, "net"),
    (libc::CLONE_NEWIPC as u64, "ipc"),
    (libc::CLONE_NEWUTS as u64, "uts"),
];

/// Starts `request.spec.program` jailed; returns once it has exec'd.
pub fn spawn(request: &JailRequest<'_>) -> Result<Jailed, SandboxError> {
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0;
    let contents = rootfs::contents(&request.spec.program)?;
    let mut flags: u64 = NAMESPACES.iter().map(|(f, _)| f).sum();
    if !privileged {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    match spawn_with(request, &contents, flags, privileged) {
        Err(SandboxError::Sys { call: "clone3", source })
            if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS)) =>
        {
            tracing::warn!(function = %request.spec.name, error = %source,
                "namespaces refused; the function runs without namespace isolation or a private root");
            spawn_with(request, &contents, 0, privileged)
        }
        other => other,
    }
}

fn spawn_with(
    request: &JailRequest<'_>,
    contents: &rootfs::RootContents,
    flags: u64,
    privileged: bool,
) -> Result<Jailed, SandboxError> {
    static NEXT_ID: AtomicU32 = AtomicU32::new(0);
    let user_ns = flags & libc::CLONE_NEWUSER as u64 != 0;
    let mount_ns = flags & libc::CLONE_NEWNS as u64 != 0;
    let pid_ns = flags & libc::CLONE_NEWPID as u64 != 0;
    let spec = request.spec;
    let ids = privileged.then(|| {
        let id = SANDBOX_ID_BASE + NEXT_ID.fetch_add(1, Ordering::Relaxed) % SANDBOX_ID_SPAN;
        (id, id)
    });

    let root = if mount_ns { Some(root_plan(contents, pid_ns)?) } else { None };
    let exec_path = if mount_ns { &contents.program_in_root } else { &contents.program };
    // Read-write: the function's stdin and stdout (writes succeed and vanish).
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SandboxError::sys("open(/dev/null)", e))?;
    let mut rlimits = vec![(libc::RLIMIT_NOFILE, limit(64)), (libc::RLIMIT_CORE, limit(0))];
    let mut rlimit_names = vec!["NOFILE=64", "CORE=0"];
    if ids.is_some() {
        // Counted per uid: meaningful only with a uid of the sandbox's own.
        rlimits.push((libc::RLIMIT_NPROC, limit(u64::from(spec.limits.pids.max(1)))));
        rlimit_names.push("NPROC");
    }
    if let Some(bytes) = request.address_space_limit {
        rlimits.push((libc::RLIMIT_AS, limit(bytes)));
        rlimit_names.push("AS");
    }
    let program_name = contents.program.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
    let mut argv = vec![cstring(program_name)?];
    for arg in &spec.args {
        argv.push(cstring(arg.as_bytes().to_vec())?);
    }
    let env = vec![
        cstring(format!("{}=3,4,5", gati_sdk::FDS_ENV).into_bytes())?,
        cstring(format!("GATI_FUNCTION={}", spec.name).into_bytes())?,
    ];
    let plan = Plan {
        root,
        hostname: (flags & libc::CLONE_NEWUTS as u64 != 0).then(|| c"gati-sandbox".to_owned()),
        devnull: devnull.as_raw_fd(),
        fds: request.fds,
        stderr: request.stderr.unwrap_or(-1),
        rlimits,
        batch: spec.limits.sched == super::Sched::Batch,
        ids,
        drop_bounding_set: privileged || user_ns,
        cap_last: cap_last(),
        filters: seccomp::compile()?,
        exec: cstring(exec_path.as_os_str().as_bytes().to_vec())?,
        argv: CStrings::new(argv),
        env: CStrings::new(env),
    };

    let (go_read, go_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let pipes = ChildPipes {
        go_read: go_read.as_raw_fd(),
        go_write: go_write.as_raw_fd(),
        err_read: err_read.as_raw_fd(),
        err_write: err_write.as_raw_fd(),
    };
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM gives the child a copy of this address
    // space; the child runs only `child::run`, which makes raw syscalls on the
    // already-built plan and never returns. `args` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) };
    if rc == 0 {
        child::run(&plan, &pipes);
    }
    if rc < 0 {
        return Err(SandboxError::sys("clone3", io::Error::last_os_error()));
    }
    let pid = rc as libc::pid_t;
    // SAFETY: CLONE_PIDFD stored a new descriptor for the child that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((go_read, err_write));

    let kill_and_reap = |pidfd: &OwnedFd| {
        // SAFETY: signalling our own child through its pidfd, then reaping it.
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), libc::SIGKILL, 0, 0);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    };
    let setup = || -> Result<(), SandboxError> {
        if let Some(cgroup) = request.cgroup {
            cgroup.add(pid)?;
        }
        if user_ns {
            write_id_maps(pid)?;
        }
        let go = [1u8];
        // SAFETY: writes one byte from a live array to our pipe.
        if unsafe { libc::write(go_write.as_raw_fd(), go.as_ptr().cast(), 1) } != 1 {
            return Err(SandboxError::sys("write(go pipe)", io::Error::last_os_error()));
        }
        Ok(())
    };
    if let Err(e) = setup() {
        kill_and_reap(&pidfd);
        return Err(e);
    }
    // `go_write` stays open until the child has exec'd: the child checks, once
    // its parent-death signal is set, that this end is still open (that we
    // live); a daemon that dies mid-start must not leave the sandbox running.
    let mut report = [0u8; 8];
    let mut err_read = File::from(err_read);
    match read_report(&mut err_read, &mut report) {
        Ok(0) => {}
        Ok(_) => {
            let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
            let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
            kill_and_reap(&pidfd);
            let step = Step::from_u32(step).map_or("unknown jailer step", Step::name);
            return Err(SandboxError::Spawn { step, source: io::Error::from_raw_os_error(errno) });
        }
        Err(e) => {
            kill_and_reap(&pidfd);
            return Err(SandboxError::sys("read(error pipe)", e));
        }
    }
    drop(go_write);

    let namespaces = NAMESPACES.iter().filter(|(f, _)| flags & f != 0).map(|(_, n)| *n);
    let isolation = Isolation {
        namespaces: user_ns.then_some("user").into_iter().chain(namespaces).collect(),
        private_root: mount_ns,
        uid: ids.map_or_else(|| if user_ns { 0 } else { current_uid() }, |(uid, _)| uid),
        host_uid: ids.map_or_else(current_uid, |(uid, _)| uid),
        rlimits: rlimit_names,
        no_new_privs: true,
        capabilities_dropped: true,
        bounding_set_dropped: plan.drop_bounding_set,
        seccomp: true,
        sched: spec.limits.sched,
        cgroup: request.cgroup.map(Cgroup::version),
        cgroup_note: None,
    };
    Ok(Jailed { pid, pidfd, isolation })
}

/// Reads the child's failure report: 0 bytes (exec closed the pipe) or 8.
fn read_report(pipe: &mut File, report: &mut [u8; 8]) -> io::Result<usize> {
    let mut got = 0;
    while got < report.len() {
        match pipe.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn root_plan(contents: &rootfs::RootContents, pid_ns: bool) -> Result<RootPlan, SandboxError> {
    let dir = std::env::temp_dir().join("gati-sandbox-root");
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(SandboxError::sys("mkdir(sandbox root mount point)", e));
        }
    }
    let inside = |p: &Path| cstring(dir.join(p.strip_prefix("/").unwrap_or(p)).as_os_str().as_bytes().to_vec());
    let mut binds = vec![(path_cstring(&contents.program)?, inside(&contents.program_in_root)?)];
    for lib in &contents.libs {
        binds.push((path_cstring(lib)?, inside(lib)?));
    }
    Ok(RootPlan {
        mkdirs: contents.dirs().iter().map(|d| inside(d)).collect::<Result<_, _>>()?,
        binds,
        proc_dir: if pid_ns { Some(inside(Path::new("/proc"))?) } else { None },
        old: inside(Path::new("/.old"))?,
        dir: path_cstring(&dir)?,
    })
}

fn write_id_maps(pid: libc::pid_t) -> Result<(), SandboxError> {
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let writes = [
        ("uid_map", format!("0 {} 1\n", current_uid())),
        ("setgroups", "deny".to_string()),
        ("gid_map", format!("0 {gid} 1\n")),
    ];
    for (file, content) in writes {
        std::fs::write(format!("/proc/{pid}/{file}"), content)
            .map_err(|e| SandboxError::sys("write(/proc/PID/*_map)", e))?;
    }
    Ok(())
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn cap_last() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

fn limit(value: u64) -> libc::rlimit {
    libc::rlimit { rlim_cur: value, rlim_max: value }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into a live array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(SandboxError::sys("pipe2", io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn cstring(bytes: Vec<u8>) -> Result<CString, SandboxError> {
    CString::new(bytes).map_err(|_| SandboxError::Program("argument or path contains a NUL byte".into()))
}

fn path_cstring(path: &Path) -> Result<CString, SandboxError> {
    cstring(path.as_os_str().as_bytes().to_vec())
}

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
