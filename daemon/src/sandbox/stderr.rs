//! Functions' stderr. Each worker's stderr is a pipe the daemon reads — one
//! thread (`fn-stderr`) polls every worker's pipe — and logs line by line as
//! events of target `gati::function` (fields `function`, `pid`), at most
//! [`LINES_PER_S`] lines a second per function after a burst of [`BURST`];
//! a line is cut at [`MAX_LINE`] bytes. Lines over the limit are dropped,
//! counted (`gati_function_stderr_lines_total{function,result}`) and said in
//! one warning a second per function.
//!
//! Before this a worker's stderr was the daemon's own: under systemd the
//! journal stream the daemon's logs share, so a function printing in a loop
//! spent the journal's per-unit rate limit for the daemon, and the daemon's
//! own messages were the ones suppressed. The pipe is always drained (what the
//! limit drops is read and discarded), so a chatty function never blocks on
//! its stderr.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::telemetry::names;

/// Lines a second each function may log, after [`BURST`].
pub const LINES_PER_S: f64 = 50.0;
/// Lines a function may log at once.
pub const BURST: f64 = 200.0;
/// Longest line logged (bytes); the rest of a longer line is cut.
pub const MAX_LINE: usize = 1024;
/// Most bytes read from one pipe per wake-up (others get their turn).
const READ_PER_WAKE: usize = 256 << 10;

/// One worker's pipe.
struct Source {
    fd: OwnedFd,
    function: Arc<str>,
    pid: i32,
    line: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: the rest of it is skipped.
    cut: bool,
}

/// One function's allowance.
struct Bucket {
    tokens: f64,
    at: Instant,
    dropped: u64,
}

struct Collector {
    epoll: OwnedFd,
    next: AtomicU64,
    sources: Mutex<HashMap<u64, Source>>,
}

/// A pipe for a worker's stderr: `(read end for [`watch`], write end for the
/// child's fd 2)`, both close-on-exec (the child dup2s the write end). `None`
/// when the collector cannot run: the worker then keeps the daemon's stderr.
pub fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    collector()?;
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "no pipe for a function's stderr: it shares the daemon's");
        return None;
    }
    // SAFETY: fresh descriptors owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child's end blocks: a full pipe waits for the collector (which always drains).
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, 0) };
    Some((read, write))
}

/// Logs what the process `pid` of `function` writes to the pipe's other end,
/// until it closes (the process exited).
pub fn watch(read: OwnedFd, function: &str, pid: i32) {
    let Some(c) = collector() else { return };
    let token = c.next.fetch_add(1, Ordering::Relaxed);
    let fd = read.as_raw_fd();
    let source = Source { fd: read, function: function.into(), pid, line: Vec::new(), cut: false };
    let mut sources = c.sources.lock().unwrap_or_else(|p| p.into_inner());
    sources.insert(token, source);
    let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, u64: token };
    // SAFETY: adding a descriptor we own (kept alive in `sources`) to our epoll.
    if unsafe { libc::epoll_ctl(c.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
        tracing::warn!(function, error = %io::Error::last_os_error(), "cannot watch a function's stderr: it is discarded");
        sources.remove(&token);
    }
}

fn collector() -> Option<&'static Collector> {
    static COLLECTOR: OnceLock<Option<Arc<Collector>>> = OnceLock::new();
    COLLECTOR
        .get_or_init(|| {
            // SAFETY: epoll_create1 has no preconditions; the result is checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                tracing::warn!(error = %io::Error::last_os_error(), "no epoll for functions' stderr");
                return None;
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
            let c = Arc::new(Collector { epoll, next: AtomicU64::new(0), sources: Mutex::new(HashMap::new()) });
            let run = Arc::clone(&c);
            match std::thread::Builder::new().name("fn-stderr".into()).spawn(move || run.run()) {
                Ok(_) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "no thread for functions' stderr");
                    None
                }
            }
        })
        .as_deref()
}

impl Collector {
    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
        let mut buckets: HashMap<Arc<str>, Bucket> = HashMap::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut noted = Instant::now();
        loop {
            // SAFETY: `events` is a valid array of its length; bounded wait.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 1000) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "epoll_wait on functions' stderr");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let token = ev.u64;
                let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
                let Some(src) = sources.get_mut(&token) else { continue };
                if !drain(src, &mut buf, &mut buckets) {
                    flush(src, &mut buckets);
                    // Closing the descriptor takes it out of the epoll set.
                    sources.remove(&token);
                }
            }
            if noted.elapsed() >= Duration::from_secs(1) {
                noted = Instant::now();
                for (function, b) in &mut buckets {
                    if b.dropped > 0 {
                        tracing::warn!(target: "gati::function", function = %function, dropped = b.dropped,
                            "function stderr over {LINES_PER_S} lines/s: lines dropped");
                        b.dropped = 0;
                    }
                }
                buckets.retain(|_, b| b.at.elapsed() < Duration::from_secs(60));
            }
        }
    }
}

/// Reads what `src` has; false once its writer closed (or the pipe failed).
fn drain(src: &mut Source, buf: &mut [u8], buckets: &mut HashMap<Arc<str>, Bucket>) -> bool {
    let mut read = 0;
    while read < READ_PER_WAKE {
        let fd: RawFd = src.fd.as_raw_fd();
        // SAFETY: reads into a live buffer of its length from our descriptor.
        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match got {
            0 => return false,
            n if n > 0 => {
                let n = n as usize;
                read += n;
                split(src, &buf[..n], buckets);
            }
            _ => {
                let e = io::Error::last_os_error();
                return matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
            }
        }
    }
    true
}

fn split(src: &mut Source, mut bytes: &[u8], buckets: &mut HashMap<Arc<str>, Bucket>) {
    while !bytes.is_empty() {
        let (part, rest, end) = match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[..i], &bytes[i + 1..], true),
            None => (bytes, &[][..], false),
        };
        if !src.cut {
            let room = MAX_LINE - src.line.len();
            src.line.extend_from_slice(&part[..part.len().min(room)]);
            if part.len() > room {
                src.cut = true;
            }
        }
        if end {
            emit(src, buckets);
        }
        bytes = rest;
    }
}

/// Logs a last line that had no newline (the writer closed).
fn flush(src: &mut Source, buckets: &mut HashMap<Arc<str>, Bucket>) {
    if !src.line.is_empty() || src.cut {
        emit(src, buckets);
    }
}

fn emit(src: &mut Source, buckets: &mut HashMap<Arc<str>, Bucket>) {
    let now = Instant::now();
    let b = buckets.entry(Arc::clone(&src.function)).or_insert(Bucket { tokens: BURST, at: now, dropped: 0 });
    b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * LINES_PER_S).min(BURST);
    b.at = now;
    let function = src.function.to_string();
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        let line = String::from_utf8_lossy(&src.line);
        let cut = if src.cut { " [cut]" } else { "" };
        tracing::warn!(target: "gati::function", function = %src.function, pid = src.pid, "{line}{cut}");
        metrics::counter!(names::FUNCTION_STDERR_LINES_TOTAL, "function" => function, "result" => "logged")
            .increment(1);
    } else {
        b.dropped += 1;
        metrics::counter!(names::FUNCTION_STDERR_LINES_TOTAL, "function" => function, "result" => "dropped")
            .increment(1);
    }
    src.line.clear();
    src.cut = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        let (r, _w) = pipe().unwrap();
        Source { fd: r, function: "t".into(), pid: 1, line: Vec::new(), cut: false }
    }

    #[test]
    fn lines_split_across_reads_and_long_lines_are_cut() {
        let mut s = source();
        let mut b = HashMap::new();
        split(&mut s, b"one\ntw", &mut b);
        assert_eq!(s.line, b"tw");
        split(&mut s, b"o\n", &mut b);
        assert!(s.line.is_empty());
        let long = vec![b'x'; MAX_LINE * 3];
        split(&mut s, &long, &mut b);
        assert_eq!(s.line.len(), MAX_LINE);
        assert!(s.cut);
        split(&mut s, b"yyy\nz", &mut b);
        assert_eq!(s.line, b"z", "the rest of the long line is skipped");
        assert!(!s.cut);
        let bucket = &b[&*Arc::<str>::from("t")];
        assert!((BURST - bucket.tokens - 3.0).abs() < 0.01, "three lines logged: {}", bucket.tokens);
    }

    #[test]
    fn a_burst_over_the_allowance_is_dropped_and_counted() {
        let mut s = source();
        let mut b = HashMap::new();
        let lines = "l\n".repeat(BURST as usize + 500);
        split(&mut s, lines.as_bytes(), &mut b);
        let bucket = &b[&*Arc::<str>::from("t")];
        // Refill during the loop is a few lines at most.
        assert!(bucket.dropped >= 490 && bucket.dropped <= 500, "dropped {}", bucket.dropped);
    }
}
