//! The hand-off of a connection to the kernel's Unix steering
//! (`[steer] unix = "kernel"`, docs/steering.md): once nothing the client sent
//! is unread, the connection joins the verdict's sockhash.

use std::sync::Arc;

use super::Worker;

impl Worker {
    /// Hands the connection to the kernel's Unix steering once nothing it sent
    /// is unread (no bytes queued on the socket, none unparsed here), so the
    /// kernel's view starts at a frame boundary and no older bytes wait behind
    /// the ones its verdict passes (docs/steering.md).
    pub(super) fn try_adopt(&mut self, slot: u32) {
        let Some(us) = self.ctx.steering.as_ref().and_then(|s| s.unix()) else { return };
        let Some(c) = self.conns[slot as usize].as_deref_mut() else { return };
        if c.steer_cookie.is_some() || c.steer_refused || c.closing || c.dead || c.discard > 0 {
            return;
        }
        if c.in_pos < c.inbuf.len() {
            return;
        }
        let fd = c.out.raw_fd();
        if crate::steer::unix::unread(fd) != 0 {
            return;
        }
        let mailbox = Arc::clone(&self.mailbox);
        let gen = c.gen;
        let notify = Arc::new(move || mailbox.post(slot, gen));
        c.steer_cookie = us.adopt(crate::steer::unix::Peer { out: Arc::clone(&c.out), notify });
        c.steer_refused = c.steer_cookie.is_none();
    }
}
