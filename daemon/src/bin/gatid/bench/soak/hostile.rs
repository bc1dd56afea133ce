//! Hostile traffic, on connections of its own, paced to a share of the valid
//! load: frames the daemon must refuse with an error status (unknown kind,
//! model or dtype, bad shapes, payload mismatches, NaN, expanding shapes),
//! framing it must close on (bad magic or version, payloads over
//! `max_frame_bytes`), and clients that hang up mid-request. Any `Ok`, and
//! any frame left with neither an answer nor a close, is a violation.
//! Unless `--no-stalled-headers`, headers that declare as large a payload
//! as the node's byte budget still takes (up to `max_frame_bytes`) and then
//! stall after its first byte, each thread holding the last [`STALLED_HELD`]
//! of them open.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use zerocopy::IntoBytes;

use super::inputs::{Inputs, CIFAR_SHAPE};
use super::traffic::DAG;
use super::Progress;
use gatid::api::wire::{Dtype, Kind, RequestHeader, ResponseHeader, Status, HEADER_LEN};
use gatid::client::Client;

/// What the hostile threads send.
pub(crate) struct Plan {
    /// Share of all requests that are hostile.
    pub share: f64,
    /// Hostile acts in the whole run.
    pub quota: u64,
    pub max_frame_bytes: u64,
    /// Include expanding-shape frames.
    pub expanding: bool,
    /// Include stalled big headers.
    pub stalled: bool,
}

/// One kind of hostile act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    BadMagic,
    BadVersion,
    UnknownKind,
    UnknownModel,
    BadDtype,
    BadShape,
    TooManyDims,
    PayloadMismatch,
    NanPayload,
    DagBadDtype,
    Oversized,
    Expanding,
    HalfPayload,
    FullThenClose,
    StalledHeader,
}

const ACTS: [Act; 15] = [
    Act::BadMagic,
    Act::BadVersion,
    Act::UnknownKind,
    Act::UnknownModel,
    Act::BadDtype,
    Act::BadShape,
    Act::TooManyDims,
    Act::PayloadMismatch,
    Act::NanPayload,
    Act::DagBadDtype,
    Act::Oversized,
    Act::Expanding,
    Act::HalfPayload,
    Act::FullThenClose,
    Act::StalledHeader,
];

impl Act {
    fn name(self) -> &'static str {
        match self {
            Self::BadMagic => "bad_magic",
            Self::BadVersion => "bad_version",
            Self::UnknownKind => "unknown_kind",
            Self::UnknownModel => "unknown_model",
            Self::BadDtype => "bad_dtype",
            Self::BadShape => "bad_shape",
            Self::TooManyDims => "too_many_dims",
            Self::PayloadMismatch => "payload_mismatch",
            Self::NanPayload => "nan_payload",
            Self::DagBadDtype => "dag_bad_dtype",
            Self::Oversized => "oversized_payload",
            Self::Expanding => "expanding_shape",
            Self::HalfPayload => "disconnect_half_payload",
            Self::FullThenClose => "disconnect_before_answer",
            Self::StalledHeader => "stalled_big_header",
        }
    }
}

/// Rows of an expanding-shape frame: u8 `[N,1,1,1]`, each resized to 32×32×3 f32 (12 KiB).
const EXPANDING_ROWS: u64 = 8_000_000;
/// Stalled big headers each hostile thread keeps open (the oldest is closed for a new one).
pub(crate) const STALLED_HELD: usize = 8;
/// A stalled header not refused within this long is held.
const STALLED_REFUSAL_WAIT: Duration = Duration::from_millis(50);
/// The smallest payload a stalled header declares.
const STALLED_MIN: u32 = 4096;
/// An answer or close not seen within this long is a violation.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How the daemon met one hostile act.
enum Outcome {
    /// An answer with this status (the connection may close after).
    Status(Status),
    /// An answer with this status, and the connection stayed open when it should close.
    StatusKeptOpen(Status),
    /// Closed without an answer.
    Closed,
    /// Neither an answer nor a close within [`TIMEOUT`].
    NoAnswer,
    /// We hung up ourselves (nothing to check but that the daemon copes).
    HungUp,
    /// Left open mid-frame on purpose.
    Held,
}

impl Outcome {
    fn name(&self) -> String {
        match self {
            Self::Status(s) => s.name().to_string(),
            Self::StatusKeptOpen(s) => format!("{}_kept_open", s.name()),
            Self::Closed => "closed".into(),
            Self::NoAnswer => "no_answer".into(),
            Self::HungUp => "hung_up".into(),
            Self::Held => "held".into(),
        }
    }

    fn violation(&self) -> bool {
        matches!(self, Self::Status(Status::Ok) | Self::StatusKeptOpen(_) | Self::NoAnswer)
    }
}

/// Counts of one hostile act.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Count {
    pub sent: u64,
    /// How they were met, by outcome (a status name, `closed`, `hung_up`, …).
    pub outcomes: BTreeMap<String, u64>,
    /// Answered `Ok`, or neither answered nor closed: must be 0.
    pub violations: u64,
}

/// What the hostile threads counted, by act.
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    pub per_class: BTreeMap<&'static str, Count>,
}

impl Tallies {
    pub fn merge(&mut self, other: Tallies) {
        for (k, c) in other.per_class {
            let m = self.per_class.entry(k).or_default();
            m.sent += c.sent;
            m.violations += c.violations;
            for (o, n) in c.outcomes {
                *m.outcomes.entry(o).or_default() += n;
            }
        }
    }

    pub fn sum(&self, f: impl Fn(&Count) -> u64) -> u64 {
        self.per_class.values().map(f).sum()
    }

    fn record(&mut self, act: Act, outcome: &Outcome) {
        let c = self.per_class.entry(act.name()).or_default();
        c.sent += 1;
        c.violations += u64::from(outcome.violation());
        *c.outcomes.entry(outcome.name()).or_default() += 1;
    }
}

/// The frame of a hostile act that expects an answer on a kept connection.
fn status_frame(act: Act, inputs: &Inputs) -> (RequestHeader, Vec<u8>) {
    let pixels = inputs.cifar[0].pixels.clone();
    let cifar = |dtype, shape: &[u32]| Client::infer_header("cifar10", dtype, shape, 0);
    match act {
        Act::UnknownKind => {
            let mut h = RequestHeader::new(Kind::Ping, 0, 0, Dtype::Bytes, &[], 0);
            h.kind.set(99);
            (h, Vec::new())
        }
        Act::UnknownModel => (Client::infer_header("no-such-model", Dtype::U8, &CIFAR_SHAPE, 0), pixels),
        Act::BadDtype => {
            let mut h = cifar(Dtype::U8, &CIFAR_SHAPE);
            h.dtype = 9;
            (h, pixels)
        }
        Act::BadShape => (cifar(Dtype::F32, &[1, 3, 32, 32, 1]), vec![0; 3072 * 4]),
        Act::TooManyDims => {
            let mut h = cifar(Dtype::U8, &CIFAR_SHAPE);
            h.ndim = 7;
            (h, pixels)
        }
        Act::PayloadMismatch => (cifar(Dtype::U8, &CIFAR_SHAPE), pixels[..3000].to_vec()),
        Act::NanPayload => (
            cifar(Dtype::F32, &[1, 32, 32, 3]),
            f32::NAN.to_le_bytes().iter().copied().cycle().take(3072 * 4).collect(),
        ),
        Act::DagBadDtype => {
            let png = &inputs.cifar[0].png;
            let mut h = Client::dag_header(DAG, png.len(), 0);
            h.dtype = Dtype::F32 as u8;
            (h, png.clone())
        }
        _ => unreachable!("not a status act: {act:?}"),
    }
}

/// Reads one answer (or the close) on a kept connection after sending `id`.
fn answer(c: &mut Client, id: u64) -> Outcome {
    match c.recv() {
        Ok(r) if r.request_id == id => Outcome::Status(r.status),
        Ok(_) => Outcome::NoAnswer, // an answer to something else: ours never came
        Err(gatid::client::ClientError::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Outcome::NoAnswer
        }
        Err(_) => Outcome::Closed,
    }
}

/// Waits for the daemon to close `s`: true if it did within [`TIMEOUT`].
fn closes(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}

/// Sends `bytes` on a fresh connection and reads how the daemon meets them:
/// the first answer's status (then, with `must_close`, whether it closes), or the close.
fn on_fresh(socket: &Path, bytes: &[u8], must_close: bool) -> std::io::Result<Outcome> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let _ = s.write_all(bytes); // the daemon may close before taking it all
    let mut hb = [0u8; HEADER_LEN];
    match s.read_exact(&mut hb) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(Outcome::NoAnswer),
        Err(_) => return Ok(Outcome::Closed),
    }
    let Ok(h) = ResponseHeader::parse(&hb) else {
        return Ok(Outcome::NoAnswer);
    };
    let status = Status::from_u16(h.status.get()).unwrap_or(Status::Internal);
    if must_close && !closes(&mut s) {
        return Ok(Outcome::StatusKeptOpen(status));
    }
    Ok(Outcome::Status(status))
}

fn frame(header: &RequestHeader, payload: &[u8]) -> Vec<u8> {
    let mut f = header.as_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// Connections a hostile thread holds: the status acts' shared one, and the stalled frames.
#[derive(Default)]
struct Held {
    kept: Option<Client>,
    stalled: std::collections::VecDeque<UnixStream>,
}

/// Performs one act.
fn act(a: Act, socket: &Path, inputs: &Inputs, plan: &Plan, held: &mut Held) -> std::io::Result<Outcome> {
    let pixels = &inputs.cifar[0].pixels;
    let kept = &mut held.kept;
    match a {
        Act::StalledHeader => {
            // As large as the budget still takes: a refused size is halved.
            let mut len = plan.max_frame_bytes.saturating_sub(HEADER_LEN as u64) as u32;
            loop {
                let mut h = Client::infer_header("cifar10", Dtype::U8, &[len, 1, 1, 1], 0);
                h.payload_len.set(len);
                let mut s = UnixStream::connect(socket)?;
                s.set_write_timeout(Some(TIMEOUT))?;
                s.set_read_timeout(Some(STALLED_REFUSAL_WAIT))?;
                let _ = s.write_all(&frame(&h, &[0x80]));
                let mut hb = [0u8; HEADER_LEN];
                match s.read_exact(&mut hb) {
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if held.stalled.len() >= STALLED_HELD {
                            held.stalled.pop_front();
                        }
                        held.stalled.push_back(s);
                        return Ok(Outcome::Held);
                    }
                    Err(_) => return Ok(Outcome::Closed),
                    Ok(()) => {
                        let status = ResponseHeader::parse(&hb)
                            .ok()
                            .and_then(|h| Status::from_u16(h.status.get()))
                            .unwrap_or(Status::Internal);
                        if status != Status::Busy || len <= STALLED_MIN {
                            return Ok(Outcome::Status(status));
                        }
                        len /= 2;
                    }
                }
            }
        }
        Act::BadMagic => on_fresh(socket, &[0xAB; HEADER_LEN], true),
        Act::BadVersion => {
            let mut h = RequestHeader::new(Kind::Ping, 1, 0, Dtype::Bytes, &[], 0);
            h.version.set(77);
            on_fresh(socket, h.as_bytes(), true)
        }
        Act::Oversized => {
            let mut h = Client::infer_header("cifar10", Dtype::U8, &[1], 0);
            h.payload_len.set(u32::try_from(plan.max_frame_bytes + 1).unwrap_or(u32::MAX));
            on_fresh(socket, h.as_bytes(), true)
        }
        Act::Expanding => {
            let rows = EXPANDING_ROWS.min(plan.max_frame_bytes) as u32;
            let mut h = Client::infer_header("cifar10", Dtype::U8, &[rows, 1, 1, 1], 0);
            h.payload_len.set(rows);
            on_fresh(socket, &frame(&h, &vec![0x80; rows as usize]), false)
        }
        Act::HalfPayload | Act::FullThenClose => {
            let mut h = Client::infer_header("cifar10", Dtype::U8, &CIFAR_SHAPE, 0);
            h.payload_len.set(pixels.len() as u32);
            let f = frame(&h, pixels);
            let cut = if a == Act::HalfPayload { HEADER_LEN + pixels.len() / 2 } else { f.len() };
            let mut s = UnixStream::connect(socket)?;
            s.set_write_timeout(Some(TIMEOUT))?;
            let _ = s.write_all(&f[..cut]);
            Ok(Outcome::HungUp)
        }
        _ => {
            if kept.is_none() {
                let mut c = Client::connect(socket).map_err(|e| std::io::Error::other(e.to_string()))?;
                c.stream().set_read_timeout(Some(TIMEOUT))?;
                c.stream().set_write_timeout(Some(TIMEOUT))?;
                *kept = Some(c);
            }
            let Some(c) = kept.as_mut() else { unreachable!("just connected") };
            let (h, payload) = status_frame(a, inputs);
            let outcome = match c.send(h, &payload) {
                Ok(id) => answer(c, id),
                Err(_) => Outcome::Closed,
            };
            if !matches!(outcome, Outcome::Status(_)) {
                *kept = None;
            }
            Ok(outcome)
        }
    }
}

/// One hostile thread (`k` of them): acts in turn, one act per
/// `(1 − share) / share` valid requests finished, until the valid load ends.
pub(crate) fn client(k: usize, socket: &Path, inputs: &Inputs, progress: &Progress, plan: &Plan) -> Tallies {
    let mut t = Tallies::default();
    let acts: Vec<Act> = ACTS
        .into_iter()
        .filter(|a| (plan.expanding || *a != Act::Expanding) && (plan.stalled || *a != Act::StalledHeader))
        .collect();
    let mut held = Held::default();
    let mut turn = k;
    let per_valid = plan.share / (1.0 - plan.share);
    while !progress.abort.load(Ordering::Relaxed) && !progress.valid_over.load(Ordering::Relaxed) {
        let done = progress.hostile_done.load(Ordering::Relaxed);
        if done >= plan.quota {
            break;
        }
        if done as f64 >= progress.valid_done.load(Ordering::Relaxed) as f64 * per_valid {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        progress.hostile_done.fetch_add(1, Ordering::Relaxed);
        let a = acts[turn % acts.len()];
        turn += 1;
        match act(a, socket, inputs, plan, &mut held) {
            Ok(outcome) => t.record(a, &outcome),
            Err(_) => {
                // Could not even connect: the node stopped accepting.
                t.record(a, &Outcome::NoAnswer);
                progress.abort.store(true, Ordering::Relaxed);
            }
        }
    }
    t
}
