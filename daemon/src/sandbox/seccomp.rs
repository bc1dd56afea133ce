//! The seccomp-BPF allowlist a sandboxed function runs under.
//!
//! A classic BPF program, written out by hand: check the audit architecture
//! (anything else → kill), load the syscall number, compare it with each
//! allowed number (a hit → allow), and kill the process on a miss
//! (`SECCOMP_RET_KILL_PROCESS`, so the daemon sees SIGSYS). x32 syscall
//! numbers (bit 30 set) never equal an allowed number and are killed too.
//!
//! The list is what a dynamically linked Rust program and the SDK need after
//! `execve` (which is itself allowed: the filter is installed just before the
//! exec): the loader, memory management, signals, time, threads, reading
//! files in its own root, and the eventfd reads/writes (plain read/write).
//! No sockets, no ptrace, no mount, no namespaces, no kill of other processes.

use libc::{sock_filter, BPF_ABS, BPF_JA, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};

/// `AUDIT_ARCH_X86_64` (EM_X86_64 | 64-bit | little-endian).
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xC000_003E;
/// `AUDIT_ARCH_AARCH64`.
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;

/// Syscalls a function may make.
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
        // Threads and process lifetime.
        SYS_futex,
        SYS_clone,
        SYS_clone3,
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

/// Builds the filter program for `allowed` syscall numbers on `arch`.
pub fn build(arch: u32, allowed: &[i64]) -> Vec<sock_filter> {
    let kill = libc::SECCOMP_RET_KILL_PROCESS;
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut prog = Vec::with_capacity(allowed.len() + 6);
    prog.push(stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET));
    prog.push(jump(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0));
    prog.push(stmt(BPF_RET | BPF_K, kill));
    prog.push(stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET));
    // Each comparison jumps forward to the final "allow"; offsets are u8, so
    // long lists are split into chunks that each end in a "kill" and "allow".
    for chunk in allowed.chunks(200) {
        for (i, &nr) in chunk.iter().enumerate() {
            let to_allow = (chunk.len() - i) as u8; // skip the rest + the kill
            prog.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr as u32, to_allow, 0));
        }
        // A miss in this chunk falls to the next chunk, or to the kill.
        prog.push(stmt(BPF_JMP | BPF_JA, 1)); // skip this chunk's allow
        prog.push(stmt(BPF_RET | BPF_K, allow));
    }
    prog.push(stmt(BPF_RET | BPF_K, kill));
    prog
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code: code as u16, jt, jf, k }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the subset of classic BPF that `build` emits.
    fn run(prog: &[sock_filter], arch: u32, nr: u32) -> u32 {
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let insn = prog[pc];
            let code = insn.code as u32;
            match code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    acc = if insn.k == ARCH_OFFSET { arch } else { nr };
                    pc += 1;
                }
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += 1 + if acc == insn.k { insn.jt as usize } else { insn.jf as usize };
                }
                c if c == BPF_JMP | BPF_JA => pc += 1 + insn.k as usize,
                c if c == BPF_RET | BPF_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn allowed_syscalls_pass_and_everything_else_is_killed() {
        let allowed = allowlist();
        let prog = build(AUDIT_ARCH, &allowed);
        for &nr in &allowed {
            assert_eq!(run(&prog, AUDIT_ARCH, nr as u32), libc::SECCOMP_RET_ALLOW, "syscall {nr}");
        }
        for nr in [libc::SYS_socket, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_unshare, libc::SYS_kill] {
            assert!(!allowed.contains(&nr));
            assert_eq!(run(&prog, AUDIT_ARCH, nr as u32), libc::SECCOMP_RET_KILL_PROCESS, "syscall {nr}");
        }
        // x32 ABI numbers and a foreign architecture.
        assert_eq!(run(&prog, AUDIT_ARCH, 0x4000_0000 | libc::SYS_read as u32), libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(run(&prog, AUDIT_ARCH, u32::MAX), libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(run(&prog, 0x4000_0003, libc::SYS_read as u32), libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn long_lists_are_chunked_within_jump_range() {
        let allowed: Vec<i64> = (0..450).collect();
        let prog = build(AUDIT_ARCH, &allowed);
        for nr in [0u32, 199, 200, 399, 449] {
            assert_eq!(run(&prog, AUDIT_ARCH, nr), libc::SECCOMP_RET_ALLOW, "syscall {nr}");
        }
        assert_eq!(run(&prog, AUDIT_ARCH, 450), libc::SECCOMP_RET_KILL_PROCESS);
        assert!(prog.len() < u16::MAX as usize);
    }
}
