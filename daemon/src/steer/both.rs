//! Several request sources as one SGS ingress: an SGS polls one fd, so the
//! UDP socket and the Unix socket the kernel steers to are put in an epoll
//! set (level-triggered) whose fd the SGS's ring polls; a readiness reads
//! every source (each reads only what is ready, without blocking).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sched::{DagRequest, Deployment, Ingress};

/// Sources read together.
pub struct Both {
    epoll: OwnedFd,
    parts: Vec<Box<dyn Ingress>>,
}

impl Both {
    /// One ingress of `parts`: the only one itself, several through an epoll set.
    pub fn of(mut parts: Vec<Box<dyn Ingress>>) -> std::io::Result<Option<Box<dyn Ingress>>> {
        match parts.len() {
            0 => return Ok(None),
            1 => return Ok(parts.pop()),
            _ => {}
        }
        // SAFETY: plain epoll_create1; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for p in &parts {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: p.fd() as u64 };
            // SAFETY: a valid event for a live fd owned by `p`, which this set outlives only as a closed entry.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, p.fd(), &mut ev) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Some(Box::new(Self { epoll, parts })))
    }
}

impl Ingress for Both {
    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn read(&mut self, dep: &Deployment, held: usize, out: &mut Vec<DagRequest>) {
        for p in &mut self.parts {
            p.read(dep, held, out);
        }
    }
}
