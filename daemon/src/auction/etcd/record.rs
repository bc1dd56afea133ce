//! What the cluster keeps in etcd (`docs/peer-protocol.md`, "On etcd"): the
//! values under `<prefix>nodes/`, `<prefix>arbiter`, `<prefix>apps/` and
//! `<prefix>leases/` (JSON), and the changes an arbiter writes ([`Op`]).
//! Pure data: the client is [`super::Etcd`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::auction::app::{AppId, Progress};
use crate::auction::gpu::NodeId;
use crate::auction::lease::{Lease, LeaseId};
use crate::auction::throughput::ThroughputModel;

/// `<prefix>nodes/<id>`, under the node's etcd lease: a live member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// Its peer address.
    pub listen: String,
    /// GPUs it declares (indices 0..gpus).
    pub gpus: u32,
}

/// The election value of a candidate (and so of the leader) on `<prefix>arbiter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderRecord {
    pub node: NodeId,
    /// Its peer address: where join, heartbeat and submit go.
    pub listen: String,
}

/// `<prefix>apps/<id>`: a submitted app, as a new arbiter needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    pub id: AppId,
    /// The node it was submitted on.
    pub node: NodeId,
    pub name: String,
    pub demand: u32,
    pub work: f64,
    pub command: Vec<String>,
    /// Submission time, seconds since the Unix epoch.
    pub arrival: f64,
    /// Progress when it was last written (on submit, and whenever its leases change).
    pub progress: Progress,
    /// The throughput model its agent prices offers with: a new arbiter
    /// gives it back to a restarted home node in `home` (absent in records
    /// of older versions: the submitted-app model).
    #[serde(default = "submitted_model")]
    pub model: ThroughputModel,
}

fn submitted_model() -> ThroughputModel {
    ThroughputModel::clone(&crate::auction::agent::submitted_model())
}

/// One change to the stored state, written by the arbiter before it tells
/// any node (`<prefix>leases/<id>` holds a [`Lease`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    PutApp(AppRecord),
    DelApp(AppId),
    PutLease(Lease),
    DelLease(LeaseId),
}

/// Everything a new arbiter reads when it is elected.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub members: BTreeMap<NodeId, NodeRecord>,
    pub apps: Vec<AppRecord>,
    pub leases: Vec<Lease>,
}

/// The key layout under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    pub fn node(&self, n: NodeId) -> String {
        format!("{}nodes/{n}", self.prefix)
    }
    pub fn election(&self) -> String {
        format!("{}arbiter", self.prefix)
    }
    pub fn apps(&self) -> String {
        format!("{}apps/", self.prefix)
    }
    pub fn app(&self, a: AppId) -> String {
        format!("{}apps/{a}", self.prefix)
    }
    pub fn leases(&self) -> String {
        format!("{}leases/", self.prefix)
    }
    pub fn lease(&self, l: LeaseId) -> String {
        format!("{}leases/{l}", self.prefix)
    }

    /// The node id in a `nodes/<id>` key.
    pub fn node_of(&self, key: &[u8]) -> Option<NodeId> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.nodes())?.parse().ok()
    }

    /// An op as the key it writes and the value (`None`: a delete).
    pub fn op(&self, op: &Op) -> (String, Option<Vec<u8>>) {
        let json = |v: serde_json::Result<Vec<u8>>| v.unwrap_or_default();
        match op {
            Op::PutApp(a) => (self.app(a.id), Some(json(serde_json::to_vec(a)))),
            Op::DelApp(a) => (self.app(*a), None),
            Op::PutLease(l) => (self.lease(l.id), Some(json(serde_json::to_vec(l)))),
            Op::DelLease(l) => (self.lease(*l), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auction::gpu::GpuId;

    #[test]
    fn keys_and_values_round_trip() {
        let k = Keys::new("/gati/");
        assert_eq!(k.node(3), "/gati/nodes/3");
        assert_eq!(k.node_of(b"/gati/nodes/3"), Some(3));
        assert_eq!(k.node_of(b"/other/nodes/3"), None);
        assert_eq!(k.election(), "/gati/arbiter");
        let l =
            Lease { id: 9, app: 4, gpus: vec![GpuId { node: 1, index: 0 }], start: 1.0, expiry: 2.0, renewal: false };
        let (key, v) = k.op(&Op::PutLease(l.clone()));
        assert_eq!(key, "/gati/leases/9");
        assert_eq!(serde_json::from_slice::<Lease>(&v.unwrap()).unwrap(), l);
        assert_eq!(k.op(&Op::DelApp(4)), ("/gati/apps/4".into(), None));
    }

    /// An app record carries its throughput model (a new arbiter sends it in
    /// `home`); one written before the model was stored reads as the
    /// submitted-app model.
    #[test]
    fn an_app_record_keeps_its_model_and_an_old_one_gets_the_submitted_one() {
        let progress = Progress { done: 5.0, contention_s: 2.0, attained: 4.0, last: 3.0, contention_now: 2.0 };
        let a = AppRecord {
            id: 4,
            node: 2,
            name: "a".into(),
            demand: 2,
            work: 10.0,
            command: vec!["true".into()],
            arrival: 1.0,
            progress,
            model: ThroughputModel::new(vec![(1, 3.0), (2, 5.0)], vec![(2, 4.0)]).unwrap(),
        };
        let (key, v) = Keys::new("/gati/").op(&Op::PutApp(a.clone()));
        assert_eq!(key, "/gati/apps/4");
        let v = v.unwrap();
        assert_eq!(serde_json::from_slice::<AppRecord>(&v).unwrap(), a);
        let mut old: serde_json::Value = serde_json::from_slice(&v).unwrap();
        old.as_object_mut().unwrap().remove("model");
        let old: AppRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old.model, submitted_model());
        assert_eq!(AppRecord { model: a.model.clone(), ..old }, a);
    }
}
