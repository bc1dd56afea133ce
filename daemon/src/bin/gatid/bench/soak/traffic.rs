//! The valid load: one connection per thread pipelining requests drawn from
//! a shared ticket counter — Infer on cifar10 (one row or four) and fmnist
//! (one row; its answers may come from a cache), and the `classify` DAG — each
//! with an id unique across the run and its expected answer, checked on
//! arrival.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use zerocopy::IntoBytes;

use super::inputs::{Inputs, CIFAR_SHAPE, FMNIST_SHAPE};
use super::{Progress, WINDOW};
use gatid::api::wire::{Dtype, RequestHeader, Status};
use gatid::client::{Client, Response};

/// The DAG the soak invokes.
pub(crate) const DAG: &str = "classify";
/// Classes of both models.
const CLASSES: usize = 10;
/// Rows of a cifar10 batch request.
const BATCH_ROWS: usize = 4;
/// An answer not here within this long is counted lost (with the rest in flight on its connection).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Low bits of a request id: its sequence number on the connection (high bits: the connection).
const SEQ_BITS: u32 = 40;

/// Kinds of valid request, as named in the results.
#[derive(Debug, Clone, Copy)]
enum Class {
    Cifar10,
    Cifar10Batch,
    Fmnist,
    Classify,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Self::Cifar10 => "infer_cifar10",
            Self::Cifar10Batch => "infer_cifar10_batch4",
            Self::Fmnist => "infer_fmnist_cached",
            Self::Classify => "dag_classify",
        }
    }
}

/// What a valid request must be answered with.
enum Expect {
    /// The full model's class of each row; `cached`: answers may come from a cache.
    Infer { classes: Vec<usize>, cached: bool },
    /// The DAG's top-1 class.
    Dag { class: usize },
}

/// Counts of one class of valid request.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Count {
    pub sent: u64,
    /// Answered `Ok` with the expected answer.
    pub ok: u64,
    pub lost: u64,
    pub mismatched: u64,
    /// Answered by a cache with another class than the full model's (judged against the budget).
    pub disagreements: u64,
    /// Answers from a cache (`exit_stage` below the model's last stage).
    pub cache_answers: u64,
    /// Answers with an error status, by status.
    pub errors: BTreeMap<String, u64>,
}

/// What the valid connections counted.
#[derive(Debug, Default)]
pub(crate) struct Tallies {
    pub per_class: BTreeMap<&'static str, Count>,
    /// Second answers to a request already answered.
    pub duplicated: u64,
    /// Answers whose id was never sent on that connection.
    pub foreign: u64,
    /// Connections opened again after one broke.
    pub reconnects: u64,
}

impl Tallies {
    fn count(&mut self, class: Class) -> &mut Count {
        self.per_class.entry(class.name()).or_default()
    }

    pub fn merge(&mut self, other: Tallies) {
        for (k, c) in other.per_class {
            let m = self.per_class.entry(k).or_default();
            m.sent += c.sent;
            m.ok += c.ok;
            m.lost += c.lost;
            m.mismatched += c.mismatched;
            m.disagreements += c.disagreements;
            m.cache_answers += c.cache_answers;
            for (s, n) in c.errors {
                *m.errors.entry(s).or_default() += n;
            }
        }
        self.duplicated += other.duplicated;
        self.foreign += other.foreign;
        self.reconnects += other.reconnects;
    }

    pub fn sum(&self, f: impl Fn(&Count) -> u64) -> u64 {
        self.per_class.values().map(f).sum()
    }

    /// Checks an answer against what its request expects; false if it answered nothing in flight.
    fn check(&mut self, r: &Response, pending: &mut HashMap<u64, (Class, Expect)>, conn: Ids, stages: u16) -> bool {
        let Some((class, expect)) = pending.remove(&r.request_id) else {
            if conn.issued(r.request_id) {
                self.duplicated += 1;
            } else {
                self.foreign += 1;
            }
            return false;
        };
        let n = self.count(class);
        if r.status != Status::Ok {
            *n.errors.entry(r.status.name().to_string()).or_default() += 1;
            return true;
        }
        match expect {
            Expect::Infer { classes, cached } => {
                let rows = classes.len();
                let framed =
                    r.dtype == Dtype::F32 as u8 && r.shape == [rows, CLASSES] && r.payload.len() == rows * CLASSES * 4;
                let v = r.floats();
                let right = framed && v.chunks_exact(CLASSES).map(argmax).eq(classes.iter().copied());
                let from_cache = cached && r.exit_stage < stages;
                n.cache_answers += u64::from(from_cache);
                if right {
                    n.ok += 1;
                } else if framed && from_cache {
                    n.disagreements += 1;
                } else {
                    n.mismatched += 1;
                }
            }
            Expect::Dag { class } => {
                let framed = r.dtype == Dtype::U8 as u8 && r.shape == [r.payload.len()];
                if framed && dag_class(&r.payload) == Some(class) {
                    n.ok += 1;
                } else {
                    n.mismatched += 1;
                }
            }
        }
        true
    }
}

/// The ids one connection hands out: its prefix and how many it sent.
#[derive(Clone, Copy)]
struct Ids {
    prefix: u64,
    next: u64,
}

impl Ids {
    fn take(&mut self) -> u64 {
        self.next += 1;
        self.prefix | (self.next - 1)
    }

    fn issued(self, id: u64) -> bool {
        id >> SEQ_BITS == self.prefix >> SEQ_BITS && id & ((1 << SEQ_BITS) - 1) < self.next
    }
}

/// A well-mixed hash of a ticket (splitmix64), so the mix does not follow the ticket order.
fn mix(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Ticket `k`'s request: its class, header (id and length unset), payload (into `payload`) and answer.
fn request(k: u64, inputs: &Inputs, payload: &mut Vec<u8>) -> (Class, RequestHeader, Expect) {
    let h = mix(k);
    let pick = h % 100;
    let at = (h >> 8) as usize;
    payload.clear();
    if pick < 40 {
        let img = &inputs.cifar[at % inputs.cifar.len()];
        payload.extend_from_slice(&img.pixels);
        let header = Client::infer_header("cifar10", Dtype::U8, &CIFAR_SHAPE, 0);
        (Class::Cifar10, header, Expect::Infer { classes: vec![img.class], cached: false })
    } else if pick < 48 {
        let mut classes = Vec::with_capacity(BATCH_ROWS);
        for j in 0..BATCH_ROWS {
            let img = &inputs.cifar[(at + j * 7) % inputs.cifar.len()];
            payload.extend_from_slice(&img.pixels);
            classes.push(img.class);
        }
        let shape = [BATCH_ROWS as u32, CIFAR_SHAPE[0], CIFAR_SHAPE[1], CIFAR_SHAPE[2]];
        (
            Class::Cifar10Batch,
            Client::infer_header("cifar10", Dtype::U8, &shape, 0),
            Expect::Infer { classes, cached: false },
        )
    } else if pick < 93 {
        let (img, class) = &inputs.fmnist[at % inputs.fmnist.len()];
        payload.extend_from_slice(img);
        let header = Client::infer_header("fmnist", Dtype::U8, &FMNIST_SHAPE, 0);
        (Class::Fmnist, header, Expect::Infer { classes: vec![*class], cached: true })
    } else {
        let img = &inputs.cifar[at % inputs.cifar.len()];
        payload.extend_from_slice(&img.png);
        (
            Class::Classify,
            Client::dag_header(DAG, img.png.len(), super::DAG_DEADLINE_US),
            Expect::Dag { class: img.class },
        )
    }
}

fn connect(socket: &Path) -> Option<Client> {
    let mut c = Client::connect(socket).ok()?;
    c.stream().set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
    c.stream().set_write_timeout(Some(ANSWER_TIMEOUT)).ok()?;
    Some(c)
}

/// One valid connection: keeps [`WINDOW`] requests in flight until the
/// tickets (`total`) run out, then waits for the last answers.
pub(crate) fn client(conn: usize, socket: &Path, inputs: &Inputs, progress: &Progress, total: u64) -> Tallies {
    let mut t = Tallies::default();
    let mut ids = Ids { prefix: (conn as u64 + 1) << SEQ_BITS, next: 0 };
    let Some(mut c) = connect(socket) else {
        progress.abort.store(true, Ordering::Relaxed);
        return t;
    };
    let mut pending: HashMap<u64, (Class, Expect)> = HashMap::new();
    let (mut payload, mut frame) = (Vec::new(), Vec::new());
    let mut exhausted = false;
    loop {
        while !exhausted && pending.len() < WINDOW {
            let k = progress.next.fetch_add(1, Ordering::Relaxed);
            if k >= total || progress.abort.load(Ordering::Relaxed) {
                exhausted = true;
                break;
            }
            let (class, mut header, expect) = request(k, inputs, &mut payload);
            let id = ids.take();
            header.request_id.set(id);
            header.payload_len.set(payload.len() as u32);
            frame.clear();
            frame.extend_from_slice(header.as_bytes());
            frame.extend_from_slice(&payload);
            t.count(class).sent += 1;
            pending.insert(id, (class, expect));
            if c.stream().write_all(&frame).is_err() {
                break; // the read below finds the connection broken
            }
        }
        if pending.is_empty() {
            break;
        }
        match c.recv() {
            Ok(r) => {
                if t.check(&r, &mut pending, ids, inputs.fmnist_stages) {
                    progress.valid_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                for (_, (class, _)) in pending.drain() {
                    t.count(class).lost += 1;
                    progress.valid_done.fetch_add(1, Ordering::Relaxed);
                }
                match connect(socket) {
                    Some(n) => {
                        c = n;
                        t.reconnects += 1;
                    }
                    None => {
                        progress.abort.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }
    t
}

/// Index of the largest value.
pub(crate) fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// The top-1 class in the `classify` DAG's answer (`[{"class":3,"p":0.81},…]`).
pub(crate) fn dag_class(payload: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get(0)?.get("class")?.as_u64().map(|c| c as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGES: u16 = 7;

    fn answer(id: u64, status: Status, classes: &[usize], exit_stage: u16) -> Response {
        let mut payload = Vec::new();
        for &c in classes {
            for k in 0..CLASSES {
                payload.extend_from_slice(&(if k == c { 5.0f32 } else { 0.0 }).to_le_bytes());
            }
        }
        Response {
            kind: 1,
            request_id: id,
            status,
            exit_stage,
            server_us: 0,
            dtype: Dtype::F32 as u8,
            shape: vec![classes.len(), CLASSES],
            payload,
        }
    }

    fn sent(ids: &mut Ids, pending: &mut HashMap<u64, (Class, Expect)>, classes: &[usize], cached: bool) -> u64 {
        let id = ids.take();
        let class = if cached { Class::Fmnist } else { Class::Cifar10 };
        pending.insert(id, (class, Expect::Infer { classes: classes.to_vec(), cached }));
        id
    }

    #[test]
    fn answers_are_sorted_into_ok_mismatched_disagreeing_duplicated_and_foreign() {
        let mut t = Tallies::default();
        let mut ids = Ids { prefix: 3 << SEQ_BITS, next: 0 };
        let mut pending = HashMap::new();
        let a = sent(&mut ids, &mut pending, &[2, 5], false);
        assert!(t.check(&answer(a, Status::Ok, &[2, 5], STAGES), &mut pending, ids, STAGES));
        // The same answer again, and an id this connection never sent.
        assert!(!t.check(&answer(a, Status::Ok, &[2, 5], STAGES), &mut pending, ids, STAGES));
        assert!(!t.check(&answer(4 << SEQ_BITS, Status::Ok, &[1], STAGES), &mut pending, ids, STAGES));
        // Wrong class from the full model; wrong row count.
        let b = sent(&mut ids, &mut pending, &[1], false);
        t.check(&answer(b, Status::Ok, &[2], STAGES), &mut pending, ids, STAGES);
        let c = sent(&mut ids, &mut pending, &[1, 1], false);
        t.check(&answer(c, Status::Ok, &[1], STAGES), &mut pending, ids, STAGES);
        // The cached model: a cache answer may disagree; a full-model one may not.
        let d = sent(&mut ids, &mut pending, &[4], true);
        t.check(&answer(d, Status::Ok, &[6], 2), &mut pending, ids, STAGES);
        let e = sent(&mut ids, &mut pending, &[4], true);
        t.check(&answer(e, Status::Ok, &[6], STAGES), &mut pending, ids, STAGES);
        let f = sent(&mut ids, &mut pending, &[4], true);
        t.check(&answer(f, Status::Busy, &[], 0), &mut pending, ids, STAGES);
        assert!(pending.is_empty());

        let cifar = &t.per_class["infer_cifar10"];
        assert_eq!((cifar.ok, cifar.mismatched), (1, 2));
        let fmnist = &t.per_class["infer_fmnist_cached"];
        assert_eq!((fmnist.ok, fmnist.disagreements, fmnist.mismatched, fmnist.cache_answers), (0, 1, 1, 1));
        assert_eq!(fmnist.errors.get("busy"), Some(&1));
        assert_eq!((t.duplicated, t.foreign), (1, 1));
    }

    #[test]
    fn the_mix_covers_every_class_and_dag_answers_parse() {
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..1000 {
            let pick = mix(k) % 100;
            seen.insert(match pick {
                0..40 => 0,
                40..48 => 1,
                48..93 => 2,
                _ => 3,
            });
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(dag_class(br#"[{"class":3,"p":0.81},{"class":5,"p":0.1}]"#), Some(3));
        assert_eq!(dag_class(b"not json"), None);
    }
}
