//! The core leases one SGS holds: one per running exec invocation that needs
//! a core (`Core::leased`), taken from and given back to the node's budget.

use std::sync::Arc;

use crate::sched::cores::Cores;

pub(super) struct Leases {
    cores: Arc<Cores>,
    held: usize,
}

impl Leases {
    pub fn new(cores: Arc<Cores>) -> Self {
        Self { cores, held: 0 }
    }

    /// The node's core budget (`None`: unlimited, no leases are taken).
    pub fn budget(&self) -> Option<usize> {
        self.cores.total()
    }

    /// Takes one lease for SGS `sgs`; false when every core is busy (the
    /// budget wakes `sgs` when one is released).
    pub fn try_take(&mut self, sgs: usize) -> bool {
        let ok = self.cores.try_take(sgs);
        self.held += usize::from(ok);
        ok
    }

    /// Gives back the leases above `running` (invocations that still hold one).
    pub fn settle(&mut self, running: usize) {
        if self.held > running {
            self.cores.release(self.held - running);
            self.held = running;
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Gives every lease back (the SGS stops).
    pub fn release_all(&mut self) {
        self.settle(0);
    }
}
