//! `peer`: what a hostile peer can send to the peer port — raw frames without
//! the key, and, as a peer that holds the key, any message in any order — fed
//! to `peer::frame::open`, the arbiter's state (`ArbiterState`) and a node's
//! view (`ClusterNode`).
//!
//! Input: the first byte picks the path.
//! - Even: the rest is one frame for `frame::open` under the cluster key. The
//!   fuzzer cannot forge the HMAC, so this covers the header checks and the
//!   refusals; an opened frame (a committed seed sealed with the key) goes on
//!   to the state below.
//! - Odd: the rest is a list of steps, each a sender byte (node 1 + byte % 5),
//!   a time step (byte, tenths of a second), a length (u16, at most 4 KiB) and
//!   that many payload bytes, sealed with the key under the sender's next
//!   counter (as an authenticated peer sends it) and opened. Node 1 runs the
//!   arbiter, node 2 is a member whose `ClusterNode` takes everything the
//!   arbiter sends to it or to all, and whose bids go back to the arbiter;
//!   a message from node 1 goes to that node as well (a hostile arbiter).
//!   Between steps the arbiter reaps silent members and opens or closes a
//!   round when its deadline passed.
//!
//! Properties: nothing panics; `open` refuses every frame over
//! `MAX_FRAME`; an opened payload seals and opens again to the same message;
//! the arbiter never leases a GPU to two apps, and keeps within `MAX_NODES`
//! members and `MAX_APPS` apps.

#![no_main]

use std::collections::HashSet;

use gati_fuzz::Input;
use gatid::auction::node::ClusterNode;
use gatid::auction::node_arbiter::{ArbiterState, Out, MAX_APPS, MAX_NODES};
use gatid::auction::peer::frame::{open, ClusterKey, ReplayGuard, Sealer, MAX_FRAME};
use gatid::auction::peer::message::Message;
use gatid::config::ClusterConfig;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];
const ARBITER: u32 = 1;
const NODE: u32 = 2;
const MAX_STEPS: usize = 64;
const MAX_PAYLOAD: usize = 4096;

fn config(node_id: u32) -> ClusterConfig {
    toml::from_str(&format!(
        "node_id = {node_id}\nlisten = \"127.0.0.1:1\"\nkey_file = \"k\"\narbiter = \"127.0.0.1:1\"\nlease_s = 10.0\nround_s = 1.0\n"
    ))
    .expect("the fuzz cluster config parses")
}

struct Cluster {
    arbiter: ArbiterState,
    node: ClusterNode,
    outbox: tokio::sync::mpsc::Receiver<Message>,
    now: f64,
}

impl Cluster {
    /// Node 2 has joined (with 4 GPUs) and submitted one app of 2 GPUs.
    fn new() -> Cluster {
        let (tx, outbox) = tokio::sync::mpsc::channel(1024);
        let mut c = Cluster {
            arbiter: ArbiterState::new(ARBITER, &config(ARBITER)).expect("arbiter state"),
            node: ClusterNode::new(config(NODE), tx),
            outbox,
            now: 0.0,
        };
        let gpus = (0..4).map(|index| gatid::auction::gpu::GpuId { node: NODE, index }).collect();
        c.deliver(NODE, Message::Join { node: NODE, listen: "127.0.0.1:2".into(), gpus });
        let submit = br#"{"name": "train", "gpus": 2, "work": 1000.0, "command": ["true"]}"#;
        c.node.submit(submit).expect("the prelude's submit");
        c.drain_node();
        c
    }

    /// An authenticated message from `sender`, and everything it sets off.
    fn deliver(&mut self, sender: u32, msg: Message) {
        if sender == ARBITER {
            let _ = self.node.apply(ARBITER, msg.clone());
        }
        if let Ok(out) = self.arbiter.handle(sender, msg, self.now) {
            self.to_node(out);
        }
        self.drain_node();
    }

    /// What the arbiter sent that reaches node 2 (bounded: each bid can close a round, whose messages are delivered here).
    fn to_node(&mut self, out: Vec<Out>) {
        for o in out {
            match o {
                Out::To(NODE, m) | Out::All(m) => {
                    let _ = self.node.apply(ARBITER, m);
                }
                Out::Resync(NODE, msgs) => {
                    for m in msgs {
                        let _ = self.node.apply(ARBITER, m);
                    }
                }
                Out::To(..) | Out::Resync(..) => {}
            }
        }
    }

    /// Node 2's messages to its arbiter (bids, submits).
    fn drain_node(&mut self) {
        for _ in 0..1024 {
            let Ok(m) = self.outbox.try_recv() else { break };
            if let Ok(out) = self.arbiter.handle(NODE, m, self.now) {
                self.to_node(out);
            }
        }
    }

    /// Time passes: silent members leave; a round closes at its deadline, else one opens.
    fn tick(&mut self, dt: f64) {
        self.now += dt;
        let out = self.arbiter.reap(self.now);
        self.to_node(out);
        let (out, _) = match self.arbiter.open_round() {
            Some((id, deadline)) if deadline <= self.now => self.arbiter.close_round(id, self.now),
            Some(_) => (Vec::new(), None),
            None => {
                let (out, _) = self.arbiter.begin_round(self.now);
                (out, None)
            }
        };
        self.to_node(out);
        self.drain_node();
    }

    fn check(&self) {
        let mut seen = HashSet::new();
        for l in self.arbiter.arbiter().leases().iter() {
            for g in &l.gpus {
                assert!(seen.insert(*g), "GPU {g:?} leased twice");
            }
        }
        assert!(self.arbiter.members().len() <= MAX_NODES);
        assert!(self.arbiter.apps().len() <= MAX_APPS);
    }
}

fuzz_target!(|data: &[u8]| {
    let key = ClusterKey::new(&KEY).expect("a 32-byte key");
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut cluster = Cluster::new();
    if mode % 2 == 0 {
        let frame = input.rest();
        let opened = open(&key, &mut ReplayGuard::default(), frame);
        if frame.len() > MAX_FRAME {
            assert!(opened.is_err(), "a frame over MAX_FRAME was opened");
        }
        if let Ok(o) = opened {
            cluster.deliver(o.sender, o.message);
            cluster.check();
        }
        return;
    }
    let mut sealers: Vec<Sealer> = (0..6).map(|s| Sealer::new(ClusterKey::new(&KEY).expect("key"), s, 0)).collect();
    let mut guard = ReplayGuard::default();
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let sender = 1 + u32::from(input.u8()) % 5;
        let dt = f64::from(input.u8()) / 10.0;
        let len = usize::from(u16::from_le_bytes([input.u8(), input.u8()])).min(MAX_PAYLOAD);
        let payload = input.bytes(len);
        cluster.tick(dt);
        let Ok(msg) = serde_json::from_slice::<Message>(payload) else { continue };
        let frame = sealers[sender as usize].seal(&msg);
        let opened = open(&key, &mut guard, &frame).expect("a frame sealed with the key opens");
        assert_eq!(opened.message, msg, "a message does not survive sealing");
        cluster.deliver(sender, opened.message);
        cluster.check();
    }
});
