//! Requests an SGS reads itself: an fd its ring polls (the UDP socket the
//! kernel steers the SGS's datagrams to), and the load it publishes for the
//! routing rule. Both are handed to a running SGS with [`Attach`]; the SGS
//! knows nothing of sockets or BPF (`steer::udp` implements [`Ingress`]).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use super::core::{user_data, Core};
use crate::sched::function::Deployment;
use crate::sched::request::DagRequest;
use crate::sched::route::LoadBoard;

pub(super) const OP_INGRESS: u64 = 4;

/// A source of DAG requests owned by one SGS.
pub trait Ingress: Send {
    /// The fd the SGS's ring polls for readability.
    fn fd(&self) -> RawFd;
    /// Reads everything ready without blocking and appends the DAG requests
    /// (answering what is malformed itself); `held` = requests the SGS holds.
    fn read(&mut self, dep: &Deployment, held: usize, out: &mut Vec<DagRequest>);
}

/// What a running SGS is handed: its own request source and where to publish its load.
#[derive(Default)]
pub struct Attach {
    /// Replaces the SGS's current ingress (if any).
    pub ingress: Option<Box<dyn Ingress>>,
    /// Where the SGS writes (requests held, idle workers) after every turn.
    pub load: Option<Arc<LoadBoard>>,
}

/// The SGS's side of [`Attach`].
#[derive(Default)]
pub(super) struct IngressState {
    source: Option<Box<dyn Ingress>>,
    gen: u32,
    armed: bool,
    load: Option<Arc<LoadBoard>>,
    batch: Vec<DagRequest>,
}

impl Core {
    pub(super) fn attach(&mut self, a: Attach) {
        if let Some(src) = a.ingress {
            if self.ext.armed {
                let old = user_data(OP_INGRESS, 0, 0, self.ext.gen);
                if let Err(e) = self.cancel_poll(old) {
                    tracing::warn!(sgs = self.index, error = %e, "cannot cancel the old ingress poll");
                }
            }
            self.ext.gen = self.ext.gen.wrapping_add(1);
            self.ext.armed = false;
            self.ext.source = Some(src);
        }
        if a.load.is_some() {
            self.ext.load = a.load;
        }
    }

    /// Arms the poll on the ingress fd when it is not. A stopping SGS reads no
    /// more: after a reload the new scheduler's SGS reads the same socket.
    pub(super) fn arm_ingress(&mut self) -> std::io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        let Some(fd) = self.ext.source.as_ref().map(|s| s.fd()) else { return Ok(()) };
        if !self.ext.armed {
            self.poll_fd(fd, user_data(OP_INGRESS, 0, 0, self.ext.gen))?;
            self.ext.armed = true;
        }
        Ok(())
    }

    /// The ingress fd is readable: its requests arrive here, with no hop.
    pub(super) fn on_ingress(&mut self, gen: u32) {
        if gen != self.ext.gen {
            return;
        }
        self.ext.armed = false;
        if self.stopping {
            return;
        }
        let Some(mut src) = self.ext.source.take() else { return };
        let mut batch = std::mem::take(&mut self.ext.batch);
        src.read(&self.dep, self.held(), &mut batch);
        // An ingress attached while reading replaces this one.
        if self.ext.source.is_none() {
            self.ext.source = Some(src);
        }
        let now = Instant::now();
        for req in batch.drain(..) {
            self.arrive(req, now);
        }
        self.ext.batch = batch;
    }

    /// Requests this SGS holds (queued or running, not yet answered).
    fn held(&self) -> usize {
        self.reqs.len()
    }

    /// Writes this SGS's load where the routing rule reads it.
    pub(super) fn publish_load(&self) {
        if let Some(board) = &self.ext.load {
            let idle: usize = self.pools.iter().map(|p| p.idle()).sum();
            board.set(self.index, self.held() as u32, idle as u32);
        }
    }
}
