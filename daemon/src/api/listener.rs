//! The Unix stream socket: taken from systemd, or created with the configured
//! mode; and the peer credential check every connection passes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Socket setup failures.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{call} on {path}: {source}")]
    Sys {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another process is already listening on {0}")]
    InUse(PathBuf),
    #[error("systemd passed fd {0}, which is not a listening Unix stream socket")]
    NotUnixStream(RawFd),
    #[error("reading systemd's socket fds: {0}")]
    Activation(#[source] io::Error),
}

/// Where the listening socket came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Passed by systemd (socket activation).
    Systemd,
    /// Created by gatid at this path (removed again on exit).
    Bound(PathBuf),
}

/// The listening socket.
pub struct Listener {
    pub fd: OwnedFd,
    pub origin: Origin,
}

impl Listener {
    /// Uses the socket systemd passed, if any; else binds `path` with `mode`.
    pub fn open(path: &Path, mode: u32) -> Result<Self, ListenError> {
        let fds: Vec<RawFd> = sd_notify::listen_fds().map_err(ListenError::Activation)?.collect();
        if let Some(&fd) = fds.first() {
            if !is_unix_stream(fd) {
                return Err(ListenError::NotUnixStream(fd));
            }
            set_cloexec(fd);
            // SAFETY: systemd hands this fd to the process exactly once; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Self { fd, origin: Origin::Systemd });
        }
        Self::bind(path, mode)
    }

    fn bind(path: &Path, mode: u32) -> Result<Self, ListenError> {
        let sys = |call, source| ListenError::Sys { call, path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| sys("mkdir", e))?;
        }
        if path.exists() {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ListenError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path).map_err(|e| sys("unlink stale socket", e))?,
            }
        }
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(sys("socket", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh socket owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let (addr, len) = sockaddr(path).map_err(|e| sys("sockaddr", e))?;
        // Create the socket file with no access, then set the configured mode.
        // SAFETY: umask only changes this process's file creation mask; restored below.
        let old = unsafe { libc::umask(0o777) };
        // SAFETY: `addr` is a valid sockaddr_un of length `len`.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        let bind_err = io::Error::last_os_error();
        // SAFETY: restores the previous mask.
        unsafe { libc::umask(old) };
        if rc < 0 {
            return Err(sys("bind", bind_err));
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| sys("chmod", e))?;
        // SAFETY: listen(2) on our own bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } < 0 {
            return Err(sys("listen", io::Error::last_os_error()));
        }
        Ok(Self { fd, origin: Origin::Bound(path.to_owned()) })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Origin::Bound(path) = &self.origin {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of an int-sized option.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
    (rc == 0).then_some(v)
}

fn is_unix_stream(fd: RawFd) -> bool {
    sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && sockopt(fd, libc::SO_ACCEPTCONN) == Some(1)
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on an fd we own; failure only leaves the flag unset.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Credentials of a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads SO_PEERCRED of a connected socket.
pub fn peer_cred(fd: RawFd) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a ucred.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// Who may connect: root, the daemon's own uid, and the configured uids/gids.
/// Both lists empty: anyone who can open the socket file (its mode decides).
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Allowlist {
    pub fn permits(&self, cred: &PeerCred) -> bool {
        if self.uids.is_empty() && self.gids.is_empty() {
            return true;
        }
        // SAFETY: geteuid has no failure mode.
        let me = unsafe { libc::geteuid() };
        cred.uid == 0 || cred.uid == me || self.uids.contains(&cred.uid) || self.gids.contains(&cred.gid)
    }
}
