//! Frames in, answers out: parsing a connection's input, answering control
//! requests, submitting inference jobs, and the answer a batcher sends back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use super::{Conn, Mailbox, ServeContext, Worker, FLAG_BEST_EFFORT, FLAG_CALIBRATE};
use crate::api::budget::Charge;
use crate::api::conn::{ConnOut, Frame};
use crate::api::control;
use crate::api::request::check_infer;
use crate::api::wire::{Dtype, Kind, RequestHeader, ResponseHeader, Status, HEADER_LEN};
use crate::api::NodeState;
use crate::infer::batcher::Rejected;
use crate::infer::{Job, JobResult, Reply};
use crate::telemetry;

impl Worker {
    /// Handles every complete frame in the connection's input.
    pub(super) fn parse_frames(&mut self, slot: u32) {
        let max_frame = self.ctx.limits.max_frame_bytes as usize;
        loop {
            let Some(c) = self.conns[slot as usize].as_deref_mut() else {
                return;
            };
            if c.closing || c.dead {
                return;
            }
            let avail = c.inbuf.len() - c.in_pos;
            if c.discard > 0 {
                // The rest of a refused frame: dropped as it arrives, never kept.
                let n = c.discard.min(avail);
                c.in_pos += n;
                c.discard -= n;
                if c.discard > 0 {
                    break;
                }
                continue;
            }
            if avail < HEADER_LEN {
                break;
            }
            let mut hbytes = [0u8; HEADER_LEN];
            hbytes.copy_from_slice(&c.inbuf[c.in_pos..c.in_pos + HEADER_LEN]);
            let header = match RequestHeader::parse(&hbytes) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "unparseable frame; closing connection");
                    c.dead = true;
                    return;
                }
            };
            let len = header.payload_len.get() as usize;
            if len > max_frame {
                telemetry::request_refused("too_large");
                c.respond(Frame::plain(header.kind.get(), header.request_id.get(), Status::TooLarge, 0), &[]);
                c.closing = true;
                c.out.wake_when_idle.store(true, std::sync::atomic::Ordering::Release);
                return;
            }
            // The payload bytes buffered so far are charged to the node's budget
            // (a header alone holds nothing: a client that declares a big frame
            // and stalls holds only what it sent). When they do not fit, the
            // frame is refused at once and the rest of it skipped as it arrives.
            let buffered = (avail - HEADER_LEN).min(len);
            let held = c.frame_charge.as_ref().map_or(0, Charge::bytes);
            if buffered > held {
                let fits = match &mut c.frame_charge {
                    Some(charge) => charge.try_grow(buffered - held),
                    None => self.ctx.budget.try_charge(buffered).map(|ch| c.frame_charge = Some(ch)).is_some(),
                };
                if !fits {
                    telemetry::request_refused("queued_bytes");
                    let frame = Frame::plain(header.kind.get(), header.request_id.get(), Status::Busy, 0);
                    c.respond(frame, b"queued_bytes: the node holds max_queued_bytes of requests");
                    c.frame_charge = None;
                    c.in_pos += HEADER_LEN + buffered;
                    c.discard = len - buffered;
                    continue;
                }
            }
            if avail < HEADER_LEN + len {
                break;
            }
            let start = c.in_pos + HEADER_LEN;
            c.in_pos = start + len;
            // Move the payload out so the handler can borrow the worker mutably;
            // the frame's charge covers the copy until the handler returns.
            let charge = c.frame_charge.take();
            let payload = c.inbuf[start..start + len].to_vec();
            self.handle_frame(slot, &header, &payload, charge);
        }
        if let Some(c) = self.conns[slot as usize].as_deref_mut() {
            if c.in_pos == c.inbuf.len() {
                c.inbuf.clear();
                c.in_pos = 0;
            } else if c.in_pos > c.inbuf.len() / 2 {
                c.inbuf.drain(..c.in_pos);
                c.in_pos = 0;
            }
        }
    }

    fn handle_frame(&mut self, slot: u32, header: &RequestHeader, payload: &[u8], charge: Option<Charge>) {
        let received = Instant::now();
        let rid = header.request_id.get();
        let raw_kind = header.kind.get();
        if raw_kind == Kind::Infer as u16 {
            return self.handle_infer(slot, header, payload, received);
        }
        if raw_kind == Kind::InvokeDag as u16 {
            return self.handle_invoke_dag(slot, header, payload, received, charge);
        }
        if raw_kind == TEST_FAULT_KIND && test_hooks() {
            return self.test_fault(slot, rid, payload);
        }
        let ctx = Arc::clone(&self.ctx);
        let c = self.conns[slot as usize].as_deref_mut().expect("slot is live while parsing");
        match Kind::from_u16(raw_kind) {
            None => c.respond(Frame::plain(raw_kind, rid, Status::UnknownKind, 0), &[]),
            Some(Kind::Ping) => c.respond(Frame::plain(raw_kind, rid, Status::Ok, elapsed_us(received)), &[]),
            Some(kind) => {
                let a = control::answer(&ctx, kind, header, payload);
                telemetry::control_done(control::kind_name(kind));
                let frame = Frame { dtype: a.dtype, ..Frame::plain(raw_kind, rid, a.status, elapsed_us(received)) };
                c.respond(frame, &a.body);
            }
        }
    }

    fn handle_infer(&mut self, slot: u32, header: &RequestHeader, payload: &[u8], received: Instant) {
        let rid = header.request_id.get();
        let kind = Kind::Infer as u16;
        let ctx = Arc::clone(&self.ctx);
        let model = ctx.registry.get(header.target_id.get());
        let name: Arc<str> = match &model {
            Some(m) => Arc::clone(self.models.entry(m.meta.id).or_insert_with(|| Arc::from(m.meta.name.as_str()))),
            None => Arc::from("<unknown>"),
        };
        let c = self.conns[slot as usize].as_deref_mut().expect("slot is live while parsing");
        let reject = |c: &mut Conn, status: Status, why: &'static str| {
            telemetry::request_done(&name, status.name(), received.elapsed());
            c.respond(Frame::plain(kind, rid, status, elapsed_us(received)), why.as_bytes());
        };
        if let Some((status, why)) = refusal(&ctx, c) {
            return reject(c, status, why);
        }
        let Some(model) = model else {
            return reject(c, Status::UnknownModel, "");
        };
        let target = model.target();
        let plan = match check_infer(&target, header, payload) {
            Ok(p) => p,
            Err(status) => return reject(c, status, ""),
        };
        // The decoded input is charged before it is allocated (a resize can make
        // it many times the payload), and held until the answer is written.
        let Some(charge) = ctx.budget.try_charge(plan.floats(&target).saturating_mul(4)) else {
            telemetry::request_refused("queued_bytes");
            return reject(c, Status::Busy, "queued_bytes: the node holds max_queued_bytes of requests");
        };
        let data = match plan.decode(&target, payload) {
            Ok(v) => v,
            Err(status) => return reject(c, status, ""),
        };
        let rows = plan.rows;
        let deadline = request_deadline(header, received);
        let mut answer = Answer::to(c, slot, &self.mailbox, &ctx.state, rid, Arc::clone(&name), received);
        answer.charge = Some(charge);
        // Count it in flight before the batcher can possibly answer it.
        c.out.inflight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let reply = Reply::new(move |result| answer.send(result));
        let admission = header.flags.get() & FLAG_BEST_EFFORT == 0;
        // The connection's shared output lives as long as the connection: its address names the stream.
        let stream = Arc::as_ptr(&c.out) as u64;
        let calibrate = header.flags.get() & FLAG_CALIBRATE != 0;
        match model.submit(Job { rows, stream, calibrate, data, deadline, reply }, admission) {
            Ok(()) => telemetry::inflight(1.0),
            Err((why, job)) => {
                // Answer here, not through the reply.
                job.reply.disarm();
                c.out.inflight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                match why {
                    Rejected::Unmeetable { .. } => reject(c, Status::DeadlineUnmeetable, ""),
                    Rejected::Closed => reject(c, Status::ShuttingDown, ""),
                    Rejected::QueueFull => {
                        telemetry::request_refused("model_queue");
                        reject(c, Status::Busy, "model_queue: the model's queue holds max_queue_rows rows")
                    }
                }
            }
        }
    }
}

/// Request kind of the fault-injection hook (tests only): honoured only when the
/// daemon was started with `GATI_TEST_HOOKS=1`, otherwise `UnknownKind`.
pub const TEST_FAULT_KIND: u16 = 0xFA17;

/// Whether the fault-injection hook is on (read once, from the environment).
fn test_hooks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("GATI_TEST_HOOKS").is_ok_and(|v| v == "1"))
}

impl Worker {
    /// Injects the fault the payload names: `panic-io` (this I/O thread panics),
    /// `stall-io MS` (it sleeps, up to 60 s), `panic-sgs` (SGS 0 panics).
    fn test_fault(&mut self, slot: u32, rid: u64, payload: &[u8]) {
        let what = String::from_utf8_lossy(payload).into_owned();
        tracing::warn!(fault = %what, "test hook: injecting a fault");
        let status = match what.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["panic-io"] => panic!("I/O thread asked to panic by a test hook"),
            ["stall-io", ms] => match ms.parse::<u64>() {
                Ok(ms) => {
                    std::thread::sleep(Duration::from_millis(ms.min(60_000)));
                    Status::Ok
                }
                Err(_) => Status::BadPayload,
            },
            ["panic-sgs"] => match self.ctx.dags.get() {
                Some(s) => {
                    s.inject_panic();
                    Status::Ok
                }
                None => Status::UnknownModel,
            },
            _ => Status::BadPayload,
        };
        if let Some(c) = self.conns[slot as usize].as_deref_mut() {
            c.respond(Frame::plain(TEST_FAULT_KIND, rid, status, 0), &[]);
        }
    }
}

/// Why a new Infer or InvokeDag request is refused before its target is
/// looked at: the node is draining, or the connection already has
/// `max_inflight_per_conn` requests in flight.
pub(super) fn refusal(ctx: &ServeContext, c: &Conn) -> Option<(Status, &'static str)> {
    if ctx.state.is_draining() {
        return Some((Status::ShuttingDown, ""));
    }
    if c.out.inflight.load(std::sync::atomic::Ordering::Acquire) >= ctx.limits.max_inflight_per_conn {
        telemetry::request_refused("inflight_per_conn");
        return Some((Status::Busy, "inflight_per_conn: max_inflight_per_conn requests in flight on this connection"));
    }
    None
}

/// The deadline a request header asks for (`deadline_us` after receipt; 0 = none).
pub(super) fn request_deadline(header: &RequestHeader, received: Instant) -> Option<Instant> {
    match header.deadline_us.get() {
        0 => None,
        us => Some(received + Duration::from_micros(u64::from(us))),
    }
}

/// Where one inference request's answer goes.
pub(super) struct Answer {
    pub(super) out: Arc<ConnOut>,
    pub(super) mailbox: Arc<Mailbox>,
    pub(super) state: Arc<NodeState>,
    pub(super) slot: u32,
    pub(super) gen: u32,
    pub(super) request_id: u64,
    pub(super) model: Arc<str>,
    pub(super) received: Instant,
    /// The request's share of the byte budget, given back once answered.
    pub(super) charge: Option<Charge>,
}

impl Answer {
    /// Where the answer to request `request_id` on connection `c` (in `slot`) goes.
    pub(super) fn to(
        c: &Conn,
        slot: u32,
        mailbox: &Arc<Mailbox>,
        state: &Arc<NodeState>,
        request_id: u64,
        model: Arc<str>,
        received: Instant,
    ) -> Self {
        Self {
            out: Arc::clone(&c.out),
            mailbox: Arc::clone(mailbox),
            state: Arc::clone(state),
            slot,
            gen: c.gen,
            request_id,
            model,
            received,
            charge: None,
        }
    }

    /// Runs on the batcher thread: writes the answer to the socket (or queues it)
    /// and wakes the I/O thread only if it has something to do.
    fn send(mut self, result: JobResult) {
        // The request's bytes are freed by now: give them back before the
        // client can see its answer and send the next one.
        drop(self.charge.take());
        let (status, body, shape, exit_stage) = match result {
            JobResult::Answer { data, shape, exit_stage } => (Status::Ok, data.as_bytes().to_vec(), shape, exit_stage),
            JobResult::Expired => (Status::DeadlineExpired, Vec::new(), Vec::new(), 0),
            JobResult::Failed(msg) => (Status::Internal, msg.into_bytes(), Vec::new(), 0),
        };
        telemetry::request_done(&self.model, status.name(), self.received.elapsed());
        telemetry::inflight(-1.0);
        let shape: Vec<u32> = shape.iter().map(|&s| s as u32).collect();
        let frame = Frame {
            kind: Kind::Infer as u16,
            request_id: self.request_id,
            status,
            dtype: if status == Status::Ok { Dtype::F32 } else { Dtype::Bytes },
            shape: &shape,
            exit_stage,
            server_us: elapsed_us(self.received),
        };
        self.write(&frame, &body);
    }

    /// Writes a response frame (or queues it for the I/O thread) and releases
    /// the request's in-flight count.
    pub(super) fn write(&self, frame: &Frame<'_>, body: &[u8]) {
        let needs_flush = self.out.write(&frame.encode(body));
        let left = self.out.inflight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) - 1;
        let watched = left == 0
            && (self.state.is_draining() || self.out.wake_when_idle.load(std::sync::atomic::Ordering::Acquire));
        if needs_flush || watched {
            self.mailbox.post(self.slot, self.gen);
        }
    }
}

/// Microseconds since `t`, saturated (the response header's `server_us`).
pub(super) fn elapsed_us(t: Instant) -> u32 {
    u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// Best-effort refusal on a connection that will not be served.
pub(super) fn refuse(fd: &OwnedFd, status: Status) {
    let h = ResponseHeader::new(0, 0, status, Dtype::Bytes, &[], 0);
    // SAFETY: non-blocking send of a live 64-byte buffer on our socket.
    unsafe {
        libc::send(fd.as_raw_fd(), h.as_bytes().as_ptr().cast(), HEADER_LEN, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
}
