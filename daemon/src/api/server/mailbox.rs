//! An I/O thread's mailbox: the connections whose queued answers it must
//! flush, posted by the threads that answer, with an eventfd its ring polls.

use std::sync::Mutex;

/// Connections (slot, generation) whose queued bytes an I/O thread must flush.
pub(super) struct Mailbox {
    pub(super) flush: Mutex<Vec<(u32, u32)>>,
    pub(super) wake: crate::eventfd::EventFd,
}

impl Mailbox {
    pub(super) fn post(&self, slot: u32, gen: u32) {
        let was_empty = {
            let mut q = self.flush.lock().unwrap_or_else(|p| p.into_inner());
            q.push((slot, gen));
            q.len() == 1
        };
        if was_empty {
            self.ring();
        }
    }

    pub(super) fn ring(&self) {
        self.wake.signal();
    }
}
