//! The jailer step: what the new process does between `clone3` and `execve`.
//!
//! Runs in a copy of a possibly multi-threaded daemon, so it only reads the
//! [`Plan`] prepared beforehand and makes raw system calls: no allocation, no
//! locks, no glibc wrappers that assume the parent's threads (set*id go
//! through `syscall` directly). Every step goes through [`check`], which turns
//! a failure into `(Step, errno)`; the first failure is written to the error
//! pipe and the process exits 127. Success is the pipe closing on exec.

use std::convert::Infallible;
use std::ffi::{c_int, c_long, CString};
use std::os::fd::RawFd;

use super::jail::Plan;

/// The steps, in order; the number travels over the error pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    SigMask = 1,
    WaitForParent,
    MakeMountsPrivate,
    MountTmpfs,
    Mkdir,
    CreateMountPoint,
    BindMount,
    RemountReadOnly,
    MountProc,
    PivotRoot,
    Chdir,
    UnmountOldRoot,
    SetHostname,
    Dup,
    SetRlimit,
    SchedPolicy,
    DropBoundingSet,
    SetGroups,
    SetGid,
    SetUid,
    Capset,
    ParentDeathSignal,
    NoNewPrivs,
    Seccomp,
    Execve,
}

impl Step {
    const ALL: [Step; 25] = [
        Step::SigMask,
        Step::WaitForParent,
        Step::MakeMountsPrivate,
        Step::MountTmpfs,
        Step::Mkdir,
        Step::CreateMountPoint,
        Step::BindMount,
        Step::RemountReadOnly,
        Step::MountProc,
        Step::PivotRoot,
        Step::Chdir,
        Step::UnmountOldRoot,
        Step::SetHostname,
        Step::Dup,
        Step::SetRlimit,
        Step::SchedPolicy,
        Step::DropBoundingSet,
        Step::SetGroups,
        Step::SetGid,
        Step::SetUid,
        Step::Capset,
        Step::ParentDeathSignal,
        Step::NoNewPrivs,
        Step::Seccomp,
        Step::Execve,
    ];

    pub fn from_u32(n: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == n)
    }

    /// The system call (and what for) that failed at this step.
    pub fn name(self) -> &'static str {
        match self {
            Step::SigMask => "sigprocmask (reset signal mask)",
            Step::WaitForParent => "read (wait for the daemon's go)",
            Step::MakeMountsPrivate => "mount (make / MS_PRIVATE)",
            Step::MountTmpfs => "mount (tmpfs root)",
            Step::Mkdir => "mkdir (root directory)",
            Step::CreateMountPoint => "open (bind mount point)",
            Step::BindMount => "mount (MS_BIND program/library)",
            Step::RemountReadOnly => "mount (MS_REMOUNT read-only)",
            Step::MountProc => "mount (proc)",
            Step::PivotRoot => "pivot_root",
            Step::Chdir => "chdir",
            Step::UnmountOldRoot => "umount2 (old root)",
            Step::SetHostname => "sethostname",
            Step::Dup => "dup2 (fds 0, 1, 3, 4, 5)",
            Step::SetRlimit => "setrlimit",
            Step::SchedPolicy => "sched_setscheduler (SCHED_BATCH)",
            Step::DropBoundingSet => "prctl (PR_CAPBSET_DROP)",
            Step::SetGroups => "setgroups",
            Step::SetGid => "setresgid",
            Step::SetUid => "setresuid",
            Step::Capset => "capset",
            Step::ParentDeathSignal => "prctl (PR_SET_PDEATHSIG)",
            Step::NoNewPrivs => "prctl (PR_SET_NO_NEW_PRIVS)",
            Step::Seccomp => "seccomp (SECCOMP_SET_MODE_FILTER)",
            Step::Execve => "execve",
        }
    }
}

type Failure = (Step, c_int);

/// The one seam every jailer call goes through.
fn check(step: Step, rc: c_long) -> Result<(), Failure> {
    if rc < 0 {
        // SAFETY: reading this thread's errno.
        Err((step, unsafe { *libc::__errno_location() }))
    } else {
        Ok(())
    }
}

/// Pipes the child was given: `go` (read end) and `err` (write end), plus the
/// parent's ends, which the child closes.
pub struct ChildPipes {
    pub go_read: RawFd,
    pub go_write: RawFd,
    pub err_read: RawFd,
    pub err_write: RawFd,
}

/// Entry point in the new process. Never returns.
pub fn run(plan: &Plan, pipes: &ChildPipes) -> ! {
    // SAFETY: closing the parent's pipe ends in this process only; moving the
    // error pipe and the go pipe to high descriptors so that the dup2s below
    // cannot clobber them.
    let (err_write, go_read) = unsafe {
        libc::close(pipes.go_write);
        libc::close(pipes.err_read);
        let go_read = libc::fcntl(pipes.go_read, libc::F_DUPFD_CLOEXEC, 10);
        (libc::fcntl(pipes.err_write, libc::F_DUPFD_CLOEXEC, 10), if go_read >= 0 { go_read } else { pipes.go_read })
    };
    let Err((step, errno)) = steps(plan, go_read);
    let report = [step as u32, errno as u32];
    // SAFETY: writes 8 bytes from a live array, then exits without running
    // any of the parent's atexit handlers or destructors.
    unsafe {
        libc::write(if err_write >= 0 { err_write } else { pipes.err_write }, report.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

fn steps(plan: &Plan, go_read: RawFd) -> Result<Infallible, Failure> {
    // SAFETY: (the whole block) each call is a plain system call on pointers
    // into `plan` (alive and immutable for the whole child) or on locals; none
    // allocates or takes a lock.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(Step::SigMask, libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()).into())?;
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        let mut go = 0u8;
        let n = libc::read(go_read, (&raw mut go).cast(), 1);
        if n != 1 {
            // The daemon gave up on us (or failed); leave quietly.
            libc::_exit(126);
        }
        // `go_read` stays open: the daemon holds the write end until we exec,
        // so its hang-up below says the daemon died before PDEATHSIG was set.

        if let Some(root) = &plan.root {
            let none = std::ptr::null::<libc::c_char>();
            let rec_private = libc::MS_REC | libc::MS_PRIVATE;
            check(
                Step::MakeMountsPrivate,
                libc::mount(none, c"/".as_ptr(), none, rec_private, std::ptr::null()).into(),
            )?;
            let flags = libc::MS_NOSUID | libc::MS_NODEV;
            let data = c"size=64k,mode=0755";
            check(
                Step::MountTmpfs,
                libc::mount(c"tmpfs".as_ptr(), root.dir.as_ptr(), c"tmpfs".as_ptr(), flags, data.as_ptr().cast())
                    .into(),
            )?;
            for dir in &root.mkdirs {
                check(Step::Mkdir, libc::mkdir(dir.as_ptr(), 0o755).into())?;
            }
            for (source, target) in &root.binds {
                let fd = libc::open(target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                check(Step::CreateMountPoint, fd.into())?;
                libc::close(fd);
                check(
                    Step::BindMount,
                    libc::mount(source.as_ptr(), target.as_ptr(), none, libc::MS_BIND, std::ptr::null()).into(),
                )?;
                let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                check(Step::RemountReadOnly, libc::mount(none, target.as_ptr(), none, ro, std::ptr::null()).into())?;
            }
            if let Some(proc_dir) = &root.proc_dir {
                check(Step::Mkdir, libc::mkdir(proc_dir.as_ptr(), 0o555).into())?;
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                check(
                    Step::MountProc,
                    libc::mount(c"proc".as_ptr(), proc_dir.as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()).into(),
                )?;
            }
            check(Step::Mkdir, libc::mkdir(root.old.as_ptr(), 0o700).into())?;
            check(Step::PivotRoot, libc::syscall(libc::SYS_pivot_root, root.dir.as_ptr(), root.old.as_ptr()))?;
            check(Step::Chdir, libc::chdir(c"/".as_ptr()).into())?;
            check(Step::UnmountOldRoot, libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH).into())?;
            libc::rmdir(c"/.old".as_ptr());
            let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            check(Step::RemountReadOnly, libc::mount(none, c"/".as_ptr(), none, ro, std::ptr::null()).into())?;
        }
        if let Some(name) = &plan.hostname {
            check(Step::SetHostname, libc::sethostname(name.as_ptr(), name.as_bytes().len()).into())?;
        }

        // stdin and stdout to /dev/null (a function's stdout would otherwise be
        // the daemon's: under systemd the journal stream that the daemon's own
        // logs share); stderr to the daemon's rate-limited pipe (the daemon's
        // own stderr when it has none); memfd, request and response eventfds
        // at 3, 4, 5.
        let stderr = if plan.stderr >= 0 { plan.stderr } else { 2 };
        let sources = [plan.devnull, plan.devnull, stderr, plan.fds[0], plan.fds[1], plan.fds[2]];
        let mut high = [-1; 6];
        for (h, fd) in high.iter_mut().zip(sources) {
            *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            check(Step::Dup, (*h).into())?;
        }
        for (h, target) in high.into_iter().zip([0, 1, 2, 3, 4, 5]) {
            check(Step::Dup, libc::dup2(h, target).into())?;
        }
        // Anything else the daemon left open without CLOEXEC closes on exec.
        libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);

        for (resource, limit) in &plan.rlimits {
            check(Step::SetRlimit, libc::setrlimit(*resource, limit).into())?;
        }
        if plan.batch {
            // Inherited across execve and by the function's threads; lowering
            // to SCHED_BATCH at nice 0 needs no privilege.
            let param = libc::sched_param { sched_priority: 0 };
            check(
                Step::SchedPolicy,
                libc::syscall(libc::SYS_sched_setscheduler, 0, libc::SCHED_BATCH, &raw const param),
            )?;
        }
        if plan.drop_bounding_set {
            for cap in 0..=plan.cap_last {
                check(Step::DropBoundingSet, libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0).into())?;
            }
        }
        if let Some((uid, gid)) = plan.ids {
            check(Step::SetGroups, libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()))?;
            check(Step::SetGid, libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
            check(Step::SetUid, libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        }
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
        let mut header = CapHeader { version: 0x2008_0522, pid: 0 }; // _LINUX_CAPABILITY_VERSION_3
        let data = [CapData::default(); 2];
        check(Step::Capset, libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()))?;
        // Set after the uid change, which clears it. A daemon that died before
        // this line sends no signal: its end of the go pipe is then closed.
        check(
            Step::ParentDeathSignal,
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0).into(),
        )?;
        let mut daemon = libc::pollfd { fd: go_read, events: 0, revents: 0 };
        if libc::poll(&mut daemon, 1, 0) > 0 && daemon.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            libc::_exit(126);
        }
        libc::close(go_read);
        check(Step::NoNewPrivs, libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0).into())?;
        // Compiled in the parent (seccompiler); installed here in order, the
        // clone3 → ENOSYS program first since the allowlist forbids `seccomp`.
        for filter in &plan.filters {
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            check(Step::Seccomp, libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &raw const prog))?;
        }
        libc::execve(plan.exec.as_ptr(), plan.argv.as_ptr(), plan.env.as_ptr());
        check(Step::Execve, -1)?;
    }
    unreachable_exit()
}

/// `execve` only returns on failure, which `check` already reported.
fn unreachable_exit() -> Result<Infallible, Failure> {
    // SAFETY: plain process exit.
    unsafe { libc::_exit(127) }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Owned strings and the NULL-terminated pointer array `execve` takes.
pub struct CStrings {
    _owned: Vec<CString>,
    ptrs: Vec<*const libc::c_char>,
}

impl CStrings {
    pub fn new(strings: Vec<CString>) -> CStrings {
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStrings { _owned: strings, ptrs }
    }

    pub fn as_ptr(&self) -> *const *const libc::c_char {
        self.ptrs.as_ptr()
    }
}
