//! Test-only function for the sandbox tests. `argv[1]` picks the behaviour:
//!
//! - `echo` (default): returns the input; `!err MSG` → handler error MSG,
//!   `!panic` → handler panic, `!big N` → an N-byte response.
//! - `crash`: aborts on the first request.
//! - `sleep`: never answers (sleeps).
//! - `alloc`: input is a MiB count as text; allocates and touches that much,
//!   answers `allocated N MiB` (or an error when the allocation is refused).
//! - `syscall NAME`: makes a syscall the sandbox forbids or refuses on the
//!   first request, and answers what it returned if it survives: `socket`,
//!   `ptrace`, `unshare` (`CLONE_NEWUSER`), `clone-newuser` (raw
//!   `clone(CLONE_NEWUSER | SIGCHLD)`), `clone3` (raw, with `CLONE_NEWUSER`;
//!   the sandbox answers `ENOSYS`). A child that a clone did create exits at once.
//! - `scribble WHAT`: a hostile guest. Maps the shared memfd (fd 3) a second
//!   time and, before answering `scribbled`, overwrites `control` (magic,
//!   capacity, max message, reserved words: the daemon must not care) or
//!   `indices` (the request ring's tail, which the daemon checks on its next
//!   push).
//! - `thread`: spawns a `std::thread`, joins it and answers `thread N joined`
//!   with the value it returned (threads are allowed).
//! - `slow MS`: writes `testkit slow: request` to stderr, sleeps MS
//!   milliseconds, then answers its input (a request to kill it during).
//! - `flood`: writes to stdout without end and never answers.
//! - `chatty`: input is a line count N; writes N lines to stderr, then one
//!   10 KiB line, and answers `said N`.
//! - `probe`: answers `key=value` lines describing what it can see: its pid,
//!   the pids in /proc, its uid, root entries, network interfaces, hostname,
//!   capabilities and seccomp state, and the result of reading each path given
//!   as an input line `read=PATH`.

use std::fmt::Write as _;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "echo".into());
    let extra = args.get(2).cloned().unwrap_or_default();
    gati_sdk::serve(move |input: &[u8]| match mode.as_str() {
        "echo" => echo(input),
        "crash" => std::process::abort(),
        "sleep" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "alloc" => alloc(input),
        "syscall" => Ok(forbidden(&extra).into_bytes()),
        "thread" => thread(),
        "scribble" => scribble(&extra),
        "probe" => Ok(probe(input).into_bytes()),
        "slow" => slow(&extra, input),
        "flood" => flood(),
        "chatty" => chatty(input),
        other => Err(format!("unknown mode {other:?}")),
    })
}

fn echo(input: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(msg) = input.strip_prefix(b"!err ") {
        return Err(String::from_utf8_lossy(msg).into_owned());
    }
    if input == b"!panic" {
        panic!("testkit was asked to panic");
    }
    if let Some(n) = input.strip_prefix(b"!big ") {
        let n: usize = String::from_utf8_lossy(n).trim().parse().map_err(|_| "bad size".to_string())?;
        return Ok(vec![b'x'; n]);
    }
    Ok(input.to_vec())
}

fn slow(ms: &str, input: &[u8]) -> Result<Vec<u8>, String> {
    let ms: u64 = ms.parse().map_err(|_| format!("slow: argv[2] must be milliseconds, got {ms:?}"))?;
    eprintln!("testkit slow: request");
    std::thread::sleep(Duration::from_millis(ms));
    Ok(input.to_vec())
}

/// Writes as many stderr lines as the input says, then one 10 KiB line, and
/// answers "said N".
fn chatty(input: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write as _;
    let n: usize = String::from_utf8_lossy(input).trim().parse().map_err(|_| "input must be a line count")?;
    let mut err = std::io::stderr().lock();
    for i in 0..n {
        let _ = writeln!(err, "chatty line {i} of {n}");
    }
    let _ = writeln!(err, "{}", "L".repeat(10 << 10));
    Ok(format!("said {n}").into_bytes())
}

fn flood() -> Result<Vec<u8>, String> {
    use std::io::Write as _;
    let chunk = vec![b'f'; 64 << 10];
    let mut out = std::io::stdout().lock();
    loop {
        // Errors (a closed stdout) do not stop the flood: only the time limit does.
        let _ = out.write_all(&chunk);
    }
}

fn alloc(input: &[u8]) -> Result<Vec<u8>, String> {
    let mib: usize = String::from_utf8_lossy(input).trim().parse().map_err(|_| "input must be a MiB count")?;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        let mut chunk = Vec::new();
        chunk.try_reserve_exact(1 << 20).map_err(|e| format!("allocation refused after {i} MiB: {e}"))?;
        chunk.resize(1 << 20, 1u8); // touch every page
        chunks.push(chunk);
    }
    let total: usize = chunks.iter().map(|c| c[c.len() - 1] as usize).sum();
    Ok(format!("allocated {total} MiB").into_bytes())
}

fn forbidden(name: &str) -> String {
    let ns_fork = (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64;
    let args =
        CloneArgs { flags: libc::CLONE_NEWUSER as u64, exit_signal: libc::SIGCHLD as u64, ..CloneArgs::default() };
    // SAFETY: plain syscalls with valid arguments (`args` outlives clone3); the
    // point is that the sandbox's seccomp filter kills us or refuses them. A
    // clone without CLONE_VM and with a null stack is a fork: the child runs
    // on a copy of this stack and exits at once below.
    let rc = unsafe {
        match name {
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            "unshare" => libc::unshare(libc::CLONE_NEWUSER).into(),
            "clone-newuser" => libc::syscall(libc::SYS_clone, ns_fork, 0, 0, 0, 0),
            "clone3" => libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()),
            _ => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into(),
        }
    };
    let err = std::io::Error::last_os_error();
    if rc == 0 && name.starts_with("clone") {
        // SAFETY: the new process leaves without running anything of ours.
        unsafe { libc::_exit(0) };
    }
    format!("{name} returned {rc} ({err})")
}

fn scribble(what: &str) -> Result<Vec<u8>, String> {
    use gati_sdk::layout::{CONTROL_BYTES, REQUEST_HEADER_OFFSET};
    let mem_fd = gati_sdk::DEFAULT_FDS[0];
    // SAFETY: a new shared mapping of the memfd (at least one page long) at an
    // address the kernel picks; nothing else refers to it.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, mem_fd, 0)
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let words: Vec<(usize, u64)> = match what {
        "control" => (0..CONTROL_BYTES / 8).map(|i| (8 * i, 0xdead_beef_dead_beef)).collect(),
        "indices" => vec![(REQUEST_HEADER_OFFSET + 64, u64::MAX / 3)],
        other => return Err(format!("scribble what? {other:?}")),
    };
    for (offset, value) in words {
        // SAFETY: an aligned u64 inside the first page of our own mapping; the
        // daemon's reads of these words are atomic, the point is what it does
        // with the values.
        unsafe { base.cast::<u8>().add(offset).cast::<u64>().write_volatile(value) };
    }
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(base, 4096) };
    Ok(b"scribbled".to_vec())
}

/// `struct clone_args` up to `tls` (CLONE_ARGS_SIZE_VER0).
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
}

fn thread() -> Result<Vec<u8>, String> {
    let worker = std::thread::Builder::new().name("testkit".into()).spawn(|| (1..=6u64).product::<u64>());
    let value = worker.map_err(|e| format!("spawn: {e}"))?.join().map_err(|_| "thread panicked".to_string())?;
    Ok(format!("thread {value} joined").into_bytes())
}

fn probe(input: &[u8]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pid={}", std::process::id());
    let mut pids: Vec<u32> = list("/proc").iter().filter_map(|n| n.parse().ok()).collect();
    pids.sort_unstable();
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let _ = writeln!(out, "proc_pids={}", pids.join(","));
    // SAFETY: getuid has no preconditions.
    let _ = writeln!(out, "uid={}", unsafe { libc::getuid() });
    // Field 41 of /proc/self/stat (the seccomp allowlist has no sched_getscheduler).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let policy = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(41 - 3));
    let _ = writeln!(out, "sched_policy={}", policy.unwrap_or("unknown"));
    let _ = writeln!(out, "root={}", list("/").join(","));
    let net = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let ifaces: Vec<&str> = net.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    let _ = writeln!(out, "net_ifaces={}", ifaces.join(","));
    let _ = writeln!(out, "hostname={}", hostname());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["CapEff", "CapBnd", "NoNewPrivs", "Seccomp"] {
        let value = status.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')));
        let _ = writeln!(out, "{key}={}", value.unwrap_or("?").trim());
    }
    for line in String::from_utf8_lossy(input).lines() {
        if let Some(path) = line.strip_prefix("read=") {
            let result = match std::fs::read(path) {
                Ok(bytes) => format!("ok:{}", bytes.len()),
                Err(e) => format!("err:{e}"),
            };
            let _ = writeln!(out, "read {path}={result}");
        }
    }
    out
}

fn list(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) => vec![format!("<{e}>")],
    };
    names.sort();
    names
}

fn hostname() -> String {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "?".into();
    }
    let bytes: Vec<u8> = uts.nodename.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
