//! The seccomp-BPF filters a sandboxed function runs under, compiled with
//! `seccompiler` in the daemon (before `clone3`) and only installed in the
//! child, with raw `seccomp` calls (`child.rs`).
//!
//! Two programs, because one seccompiler filter has a single "match" action:
//!
//! 1. [`Filter::Clone3`]: `clone3` → `SECCOMP_RET_ERRNO(ENOSYS)`, anything
//!    else → allow (the other program decides). `clone3` takes its flags in a
//!    `struct clone_args` in user memory, which seccomp cannot read, so it
//!    cannot be checked; with `ENOSYS` glibc (2.34+) falls back to `clone`,
//!    whose flags are a register that the allowlist checks.
//! 2. [`Filter::Allowlist`]: the audit architecture must be this build's
//!    (anything else → `SECCOMP_RET_KILL_PROCESS`), and the syscall one of
//!    [`allowlist`], `clone` with thread-creation flags only
//!    ([`clone_is_thread`]), `prctl(PR_SET_NAME | PR_GET_NAME)` (thread
//!    names), or `clone3` (left to the first program);
//!    everything else kills the process (the daemon sees SIGSYS). x32
//!    numbers (bit 30 set) never match and are killed.
//!
//! The kernel runs every installed filter and takes the most severe answer
//! (kill > errno > allow), so `clone3` gets `ENOSYS` and a forbidden call
//! still kills. The errno program is installed first: once the allowlist is
//! in, `seccomp` itself is forbidden.
//!
//! The list is what a dynamically linked Rust program and the SDK need after
//! `execve` (which is itself allowed: the filters are installed just before the
//! exec): the loader, memory management, signals, time, threads, reading
//! files in its own root, and the eventfd reads/writes (plain read/write).
//! No sockets, no ptrace, no mount, no namespaces (`unshare`, `setns`, `clone`
//! with a namespace flag), no new processes (`fork`, `vfork`, `clone` without
//! `CLONE_THREAD`), no kill of other processes.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// `AUDIT_ARCH_X86_64` (EM_X86_64 | 64-bit | little-endian).
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xC000_003E;
/// `AUDIT_ARCH_AARCH64`.
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xC000_00B7;

#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

/// The flags glibc's `pthread_create` (and so Rust's `std::thread`) passes to
/// `clone` after `clone3` failed with `ENOSYS` (checked with strace on glibc
/// 2.36: exactly this set, exit signal 0).
pub const THREAD_FLAGS: u32 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u32;

/// Every flag a `clone` may carry: [`THREAD_FLAGS`] plus `CLONE_DETACHED`,
/// which musl's `pthread_create` adds and the kernel ignores. No namespace
/// flag, no exit signal (the low byte, `CSIGNAL`), nothing else.
pub const CLONE_ALLOWED: u32 = THREAD_FLAGS | libc::CLONE_DETACHED as u32;

/// Namespace flags; any one of them in `clone` kills the function
/// (`CLONE_NEWTIME` is 0x80, inside `CSIGNAL`, so it is refused as an exit
/// signal would be).
pub const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32
    | 0x80; // CLONE_NEWTIME
const _: () = assert!(NAMESPACE_FLAGS & CLONE_ALLOWED == 0);

/// Whether the allowlist lets `clone(flags, …)` through: it must create a
/// thread (`CLONE_THREAD`, which the kernel accepts only with `CLONE_SIGHAND`
/// and `CLONE_VM`) and carry no flag outside [`CLONE_ALLOWED`]. Only the low
/// 32 bits count: the kernel reads `lower_32_bits(clone_flags)` and ignores
/// the rest (kernel/fork.c), and glibc passes the flags as an `int`, so the
/// upper half of the register is not defined.
///
/// A plain `fork` (no `CLONE_VM`/`CLONE_THREAD`) is refused, like the `fork`
/// and `vfork` syscalls: a function is one process (its root holds nothing
/// else to run); the cgroup's `pids.max` bounds its threads.
pub fn clone_is_thread(flags: u64) -> bool {
    let flags = flags as u32;
    flags & libc::CLONE_THREAD as u32 != 0 && flags & !CLONE_ALLOWED == 0
}

/// Syscalls a function may make with any arguments (`clone` is checked
/// separately, `clone3` answered `ENOSYS`).
pub fn allowlist() -> Vec<i64> {
    use libc::*;
    let mut list = vec![
        // I/O on descriptors it already has, and files in its own root.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_close,
        SYS_lseek,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_openat,
        SYS_getdents64,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_fcntl,
        SYS_ppoll,
        SYS_getcwd,
        // Memory.
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_mseal,
        // Signals (tgkill/tkill for raise() on itself).
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_tgkill,
        SYS_tkill,
        SYS_restart_syscall,
        // Threads and process lifetime (clone: see `clone_is_thread`).
        SYS_futex,
        SYS_set_tid_address,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_exit,
        SYS_exit_group,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_prlimit64,
        SYS_execve,
        // Time, identity, randomness.
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettimeofday,
        SYS_getpid,
        SYS_gettid,
        SYS_getppid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_uname,
        SYS_getrandom,
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        SYS_arch_prctl,
        SYS_access,
        SYS_open,
        SYS_stat,
        SYS_lstat,
        SYS_poll,
        SYS_readlink,
        SYS_getrlimit,
        SYS_time,
    ]);
    list.sort_unstable();
    list.dedup();
    list
}

/// The two programs, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `clone3` → `ENOSYS`, the rest allowed.
    Clone3,
    /// The allowlist; a miss kills.
    Allowlist,
}

/// Why the filters could not be compiled (a bug in the rules, not a runtime condition).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp {filter:?} filter: {source}")]
    Compile {
        filter: Filter,
        #[source]
        source: seccompiler::BackendError,
    },
}

/// Compiles both programs, in the order the child installs them
/// ([`Filter::Clone3`] first: the allowlist forbids `seccomp`).
pub fn compile() -> Result<Vec<Vec<libc::sock_filter>>, SeccompError> {
    Ok(vec![program(Filter::Clone3, clone3_filter())?, program(Filter::Allowlist, allowlist_filter())?])
}

fn clone3_filter() -> Result<SeccompFilter, seccompiler::BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TARGET)
}

fn allowlist_filter() -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowlist().into_iter().map(|nr| (nr, vec![])).collect();
    // clone(flags, …): CLONE_THREAD set, and no bit outside CLONE_ALLOWED.
    let flags = |mask: u32, value: u32| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(u64::from(mask)), u64::from(value))
    };
    let thread = libc::CLONE_THREAD as u32;
    let rule = SeccompRule::new(vec![flags(thread, thread)?, flags(!CLONE_ALLOWED, 0)?])?;
    rules.insert(libc::SYS_clone, vec![rule]);
    // prctl only to name a thread (std::thread::Builder::name, tokio) or read the name.
    let option = |op: libc::c_int| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op as u64);
    let prctl =
        vec![SeccompRule::new(vec![option(libc::PR_SET_NAME)?])?, SeccompRule::new(vec![option(libc::PR_GET_NAME)?])?];
    rules.insert(libc::SYS_prctl, prctl);
    // Passed here so that the Clone3 program's ENOSYS is the answer (the
    // kernel takes the most severe of the two; a kill here would win).
    rules.insert(libc::SYS_clone3, vec![]);
    SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TARGET)
}

fn program(
    filter: Filter,
    built: Result<SeccompFilter, seccompiler::BackendError>,
) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let wrap = |source| SeccompError::Compile { filter, source };
    let bpf: BpfProgram = built.map_err(wrap)?.try_into().map_err(wrap)?;
    Ok(bpf.into_iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::{BPF_ABS, BPF_ALU, BPF_AND, BPF_JA, BPF_JEQ, BPF_JGE, BPF_JGT, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};

    /// `struct seccomp_data` as the kernel lays it out.
    fn data(arch: u32, nr: i64, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&(nr as u32).to_ne_bytes());
        d[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        d
    }

    /// Runs the subset of classic BPF that seccompiler emits.
    fn run(prog: &[libc::sock_filter], data: &[u8; 64]) -> u32 {
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let insn = prog[pc];
            pc += 1;
            match u32::from(insn.code) {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let k = insn.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                c if c == BPF_ALU | BPF_AND | BPF_K => acc &= insn.k,
                c if c == BPF_JMP | BPF_JA => pc += insn.k as usize,
                c if c & 0x07 == BPF_JMP => {
                    let hit = match c & 0xf0 {
                        op if op == BPF_JEQ => acc == insn.k,
                        op if op == BPF_JGT => acc > insn.k,
                        op if op == BPF_JGE => acc >= insn.k,
                        other => panic!("unexpected jump {other:#x}"),
                    };
                    pc += usize::from(if hit { insn.jt } else { insn.jf });
                }
                c if c == BPF_RET | BPF_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// What the kernel answers with every program installed: the most severe
    /// action (lowest as a signed action value: KILL_PROCESS is negative).
    fn verdict(arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let d = data(arch, nr, args);
        let action = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
        compile().unwrap().iter().map(|p| run(p, &d)).min_by_key(|&r| action(r)).unwrap()
    }

    fn call(nr: i64, args: [u64; 6]) -> u32 {
        verdict(AUDIT_ARCH, nr, args)
    }

    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    #[test]
    fn allowed_syscalls_pass_and_everything_else_is_killed() {
        let allowed = allowlist();
        for &nr in &allowed {
            assert_eq!(call(nr, [0; 6]), ALLOW, "syscall {nr}");
        }
        let forbidden =
            [libc::SYS_socket, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_unshare, libc::SYS_setns, libc::SYS_kill];
        for nr in forbidden.into_iter().chain([libc::SYS_seccomp, libc::SYS_prctl, libc::SYS_ioctl, libc::SYS_bpf]) {
            assert!(!allowed.contains(&nr));
            assert_eq!(call(nr, [0; 6]), KILL, "syscall {nr}");
        }
        #[cfg(target_arch = "x86_64")]
        for nr in [libc::SYS_fork, libc::SYS_vfork] {
            assert_eq!(call(nr, [0; 6]), KILL, "syscall {nr}");
        }
        // x32 ABI numbers, numbers past the table and a foreign architecture.
        assert_eq!(call(0x4000_0000 | libc::SYS_read, [0; 6]), KILL);
        assert_eq!(call(u32::MAX as i64, [0; 6]), KILL);
        assert_eq!(verdict(0x4000_0003, libc::SYS_read, [0; 6]), KILL);
        assert_eq!(verdict(0x4000_0003, libc::SYS_clone3, [0; 6]), KILL);
    }

    #[test]
    fn clone_creates_threads_only() {
        let clone = |flags: u64| call(libc::SYS_clone, [flags, 0x7000_0000, 0, 0, 0x7000_1000, 0]);
        assert_eq!(clone(u64::from(THREAD_FLAGS)), ALLOW, "glibc pthread_create");
        assert_eq!(clone(u64::from(THREAD_FLAGS | libc::CLONE_DETACHED as u32)), ALLOW, "musl pthread_create");
        // The kernel reads only the low 32 bits; so does the filter.
        assert_eq!(clone(0xffff_ffff_0000_0000 | u64::from(THREAD_FLAGS)), ALLOW);
        for ns in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
            0x80, // CLONE_NEWTIME
        ] {
            let ns = ns as u32;
            assert_ne!(ns & NAMESPACE_FLAGS, 0);
            assert_eq!(clone(u64::from(THREAD_FLAGS | ns)), KILL, "thread flags + {ns:#x}");
            assert_eq!(clone(u64::from(ns) | libc::SIGCHLD as u64), KILL, "{ns:#x} | SIGCHLD");
        }
        // A plain fork (glibc's _Fork) and other process-creating clones.
        let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
        assert_eq!(clone(fork), KILL);
        assert_eq!(clone(libc::SIGCHLD as u64), KILL);
        assert_eq!(clone((libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64), KILL);
        assert_eq!(clone(u64::from(THREAD_FLAGS) | libc::SIGCHLD as u64), KILL, "an exit signal");
        assert_eq!(clone(u64::from(THREAD_FLAGS | libc::CLONE_PTRACE as u32)), KILL);
        assert_eq!(clone(0), KILL);
        for flags in [0u64, u64::from(THREAD_FLAGS), 1 << 40, u64::MAX] {
            let allowed = call(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]) == ALLOW;
            assert_eq!(allowed, clone_is_thread(flags), "{flags:#x}");
        }
    }

    #[test]
    fn prctl_only_names_threads() {
        for op in [libc::PR_SET_NAME, libc::PR_GET_NAME] {
            assert_eq!(call(libc::SYS_prctl, [op as u64, 0x7000_0000, 0, 0, 0, 0]), ALLOW, "prctl {op}");
        }
        for op in [
            libc::PR_SET_NO_NEW_PRIVS,
            libc::PR_SET_SECCOMP,
            libc::PR_CAPBSET_DROP,
            libc::PR_SET_DUMPABLE,
            libc::PR_SET_PDEATHSIG,
            libc::PR_SET_MM,
        ] {
            assert_eq!(call(libc::SYS_prctl, [op as u64, 0, 0, 0, 0, 0]), KILL, "prctl {op}");
        }
    }

    #[test]
    fn clone3_fails_with_enosys_whatever_its_arguments() {
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        for args in [[0; 6], [0x7000_0000, 88, 0, 0, 0, 0], [u64::MAX; 6]] {
            assert_eq!(call(libc::SYS_clone3, args), enosys);
        }
    }

    #[test]
    fn programs_fit_the_kernel_limit() {
        for prog in compile().unwrap() {
            assert!(!prog.is_empty() && prog.len() < 4096, "{} instructions", prog.len());
        }
    }
}
