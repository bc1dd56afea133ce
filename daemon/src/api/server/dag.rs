//! `InvokeDag` frames: checks, submission to the DAG scheduler, and the answer
//! the scheduler's reply writes back (on the SGS thread).
//!
//! Statuses: no DAG with the target id (or no DAGs deployed) → `UnknownModel`;
//! payload not u8 `[len]` → `BadDtype`/`BadShape`/`PayloadMismatch`; deadline
//! missed or hopeless → `DeadlineExpired`; a function failed → `Internal`
//! with the message.

use std::sync::Arc;
use std::time::Instant;

use super::frames::elapsed_us;
use super::frames::{refusal, request_deadline, Answer};
use super::{Conn, Worker};
use crate::api::budget::Charge;
use crate::api::conn::Frame;
use crate::api::wire::{Dtype, Kind, RequestHeader, Status};
use crate::sched::{DagReply, DagResult};
use crate::telemetry;

/// Checks the DAG input framing: u8 (or raw bytes) with shape `[payload_len]`.
fn check_payload(header: &RequestHeader, len: usize) -> Result<(), Status> {
    match Dtype::from_u8(header.dtype) {
        Some(Dtype::U8) => {}
        _ => return Err(Status::BadDtype),
    }
    match header.dims() {
        Some(d) if d.len() == 1 && d[0] == len => Ok(()),
        Some(d) if d.len() == 1 => Err(Status::PayloadMismatch),
        _ => Err(Status::BadShape),
    }
}

impl Worker {
    pub(super) fn handle_invoke_dag(
        &mut self,
        slot: u32,
        header: &RequestHeader,
        payload: &[u8],
        received: Instant,
        charge: Option<Charge>,
    ) {
        let rid = header.request_id.get();
        let kind = Kind::InvokeDag as u16;
        let ctx = Arc::clone(&self.ctx);
        let sched = ctx.dags.get();
        let dag = sched.as_ref().and_then(|s| s.deployment.dag_by_id(header.target_id.get()).cloned());
        let name: Arc<str> = dag.as_ref().map_or_else(|| Arc::from("<unknown>"), |d| Arc::from(d.name.as_str()));
        let c: &mut Conn = self.conns[slot as usize].as_deref_mut().expect("slot is live while parsing");
        let reject = |c: &mut Conn, status: Status, why: &'static str| {
            telemetry::dag_request_done(&name, status.name(), received.elapsed());
            c.respond(Frame::plain(kind, rid, status, elapsed_us(received)), why.as_bytes());
        };
        if let Some((status, why)) = refusal(&ctx, c) {
            return reject(c, status, why);
        }
        let (Some(sched), Some(dag)) = (sched, dag) else {
            return reject(c, Status::UnknownModel, "");
        };
        if let Err(status) = check_payload(header, payload.len()) {
            return reject(c, status, "");
        }
        let deadline = request_deadline(header, received);
        let mut answer = Answer::to(c, slot, &self.mailbox, &ctx.state, rid, Arc::clone(&name), received);
        // The frame's charge covers the input copy until the DAG is answered.
        answer.charge = charge;
        // Count it in flight before the scheduler can possibly answer it.
        c.out.inflight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let reply = DagReply::new(move |r| send(answer, r));
        let req = crate::sched::DagRequest { dag, input: payload.to_vec(), deadline, reply };
        match sched.submit(req) {
            Ok(()) => telemetry::inflight(1.0),
            Err(req) => {
                req.reply.disarm();
                c.out.inflight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                telemetry::request_refused("sgs_queue");
                reject(c, Status::Busy, "sgs_queue: the DAG's scheduler holds its most queued requests");
            }
        }
    }
}

/// Runs on the SGS thread: the DAG's answer as a response frame.
fn send(mut a: Answer, result: DagResult) {
    // The input was consumed by the DAG: give its bytes back before the answer goes out.
    drop(a.charge.take());
    let (status, body) = match result {
        DagResult::Ok { output, .. } => (Status::Ok, output),
        DagResult::DeadlineMissed => (Status::DeadlineExpired, Vec::new()),
        DagResult::Failed(msg) => (Status::Internal, msg.into_bytes()),
    };
    telemetry::dag_request_done(&a.model, status.name(), a.received.elapsed());
    telemetry::inflight(-1.0);
    let shape = [body.len() as u32];
    let ok = status == Status::Ok;
    let frame = Frame {
        kind: Kind::InvokeDag as u16,
        request_id: a.request_id,
        status,
        dtype: if ok { Dtype::U8 } else { Dtype::Bytes },
        shape: if ok { &shape } else { &[] },
        exit_stage: 0,
        server_us: elapsed_us(a.received),
    };
    a.write(&frame, &body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dag_payload_must_be_u8_of_its_length() {
        let h = |dtype, shape: &[u32]| RequestHeader::new(Kind::InvokeDag, 1, 7, dtype, shape, 0);
        assert_eq!(check_payload(&h(Dtype::U8, &[5]), 5), Ok(()));
        assert_eq!(check_payload(&h(Dtype::U8, &[4]), 5), Err(Status::PayloadMismatch));
        assert_eq!(check_payload(&h(Dtype::U8, &[1, 5]), 5), Err(Status::BadShape));
        assert_eq!(check_payload(&h(Dtype::F32, &[5]), 5), Err(Status::BadDtype));
    }
}
