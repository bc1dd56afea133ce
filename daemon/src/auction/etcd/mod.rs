//! The cluster on etcd (issue 12, item 3): membership and the arbiter
//! election on an existing coordination service instead of a static
//! arbiter (`docs/peer-protocol.md`, "On etcd").
//!
//! - every node grants itself an etcd lease (TTL [`ClusterConfig::etcd_ttl_s`]),
//!   keeps it alive, and registers `<prefix>nodes/<id>` under it;
//! - every node campaigns on `<prefix>arbiter` with that lease; the leader
//!   reads the stored state ([`Etcd::snapshot`]), watches the members and
//!   runs the rounds; every change to apps and leases is written
//!   ([`Etcd::commit`]) in a transaction that holds only while its election
//!   key is still the one it won with (fencing) — before any node hears of it;
//! - the others observe the leader ([`Etcd::observe`]) and talk to it.
//!
//! [`record`] is the stored data; the session that ties it to the peer
//! service is `peer/service/elected.rs`.

pub mod record;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaderKey, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};

use self::record::{AppRecord, Keys, LeaderRecord, NodeRecord, Op, Snapshot};
use crate::auction::gpu::NodeId;
use crate::auction::lease::Lease;
use crate::config::ClusterConfig;

/// How long one etcd request may take (campaign and observe excepted: they wait).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Most operations in one commit (etcd's default `--max-txn-ops` is 128).
pub const MAX_TXN_OPS: usize = 120;

/// Why an etcd operation failed; the label is what it is counted under.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {op}: {source}")]
    Client {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {0}: timed out")]
    Timeout(&'static str),
    #[error("etcd keepalive: this node's lease expired")]
    LeaseLost,
    #[error("etcd {0}: the stream ended")]
    StreamEnded(&'static str),
    #[error("etcd commit refused: this node is no longer the elected arbiter")]
    Fenced,
    #[error("etcd {op}: bad value under {key}: {msg}")]
    BadValue { op: &'static str, key: String, msg: String },
}

impl EtcdError {
    /// The `op` label of `gati_etcd_errors_total`.
    pub fn op(&self) -> &'static str {
        match self {
            EtcdError::Client { op, .. } | EtcdError::Timeout(op) | EtcdError::StreamEnded(op) => op,
            EtcdError::BadValue { op, .. } => op,
            EtcdError::LeaseLost => "keepalive",
            EtcdError::Fenced => "fenced",
        }
    }
}

async fn bounded<T>(
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(|source| EtcdError::Client { op, source }),
        Err(_) => Err(EtcdError::Timeout(op)),
    }
}

fn parse<T: serde::de::DeserializeOwned>(op: &'static str, key: &[u8], v: &[u8]) -> Result<T, EtcdError> {
    serde_json::from_slice(v).map_err(|e| EtcdError::BadValue {
        op,
        key: String::from_utf8_lossy(key).into_owned(),
        msg: e.to_string(),
    })
}

/// A change of membership seen by the leader's watch.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberEvent {
    Up(NodeId, NodeRecord),
    Down(NodeId),
}

/// A connection to the cluster's etcd, with its key layout.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    pub keys: Keys,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl Etcd {
    /// Connects to `cfg.etcd` (any endpoint that answers).
    pub async fn connect(cfg: &ClusterConfig) -> Result<Etcd, EtcdError> {
        let opts = ConnectOptions::default()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = bounded("connect", Client::connect(&cfg.etcd, Some(opts))).await?;
        Ok(Etcd { client, keys: Keys::new(&cfg.etcd_prefix) })
    }

    /// Grants an etcd lease of `ttl_s` seconds; returns its id.
    pub async fn grant(&mut self, ttl_s: i64) -> Result<i64, EtcdError> {
        Ok(bounded("register", self.client.lease_grant(ttl_s, None)).await?.id())
    }

    /// Revokes `lease` (best effort, at shutdown: the node's keys go at once).
    pub async fn revoke(&mut self, lease: i64) -> Result<(), EtcdError> {
        bounded("revoke", self.client.lease_revoke(lease)).await.map(|_| ())
    }

    /// Registers this node under `lease`.
    pub async fn register(&mut self, node: NodeId, rec: &NodeRecord, lease: i64) -> Result<(), EtcdError> {
        let v = serde_json::to_vec(rec).unwrap_or_default();
        let opts = PutOptions::new().with_lease(lease);
        bounded("register", self.client.put(self.keys.node(node), v, Some(opts))).await.map(|_| ())
    }

    /// Keeps `lease` alive every third of its TTL; returns only with why it
    /// ended (the lease expired, or etcd did not answer within the TTL).
    /// `alive` is called after every confirmed renewal.
    pub async fn keep_alive(&mut self, lease: i64, ttl_s: i64, mut alive: impl FnMut()) -> Result<(), EtcdError> {
        let (mut keeper, mut stream) = bounded("keepalive", self.client.lease_keep_alive(lease)).await?;
        let period = Duration::from_secs_f64(ttl_s as f64 / 3.0);
        let within = Duration::from_secs(ttl_s.max(1) as u64);
        loop {
            keeper.keep_alive().await.map_err(|source| EtcdError::Client { op: "keepalive", source })?;
            match tokio::time::timeout(within, stream.message()).await {
                Err(_) => return Err(EtcdError::Timeout("keepalive")),
                Ok(Err(source)) => return Err(EtcdError::Client { op: "keepalive", source }),
                Ok(Ok(None)) => return Err(EtcdError::StreamEnded("keepalive")),
                Ok(Ok(Some(r))) if r.ttl() <= 0 => return Err(EtcdError::LeaseLost),
                Ok(Ok(Some(_))) => alive(),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Campaigns for the arbiter with `lease`; returns once this node leads.
    pub async fn campaign(&mut self, lease: i64, me: &LeaderRecord) -> Result<LeaderKey, EtcdError> {
        let v = serde_json::to_vec(me).unwrap_or_default();
        let mut r = self
            .client
            .campaign(self.keys.election(), v, lease)
            .await
            .map_err(|source| EtcdError::Client { op: "campaign", source })?;
        r.take_leader().ok_or(EtcdError::StreamEnded("campaign"))
    }

    /// Follows the election: `seen` gets every leader in turn. Returns only
    /// on an error.
    pub async fn observe(&mut self, mut seen: impl FnMut(LeaderRecord)) -> Result<(), EtcdError> {
        let mut s = self
            .client
            .observe(self.keys.election())
            .await
            .map_err(|source| EtcdError::Client { op: "observe", source })?;
        loop {
            let m = s.message().await.map_err(|source| EtcdError::Client { op: "observe", source })?;
            let Some(m) = m else { return Err(EtcdError::StreamEnded("observe")) };
            if let Some(kv) = m.kv() {
                seen(parse("observe", kv.key(), kv.value())?);
            }
        }
    }

    /// The members, apps and leases, and the revision they were read at.
    pub async fn snapshot(&mut self) -> Result<(Snapshot, i64), EtcdError> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let nodes = bounded("snapshot", self.client.get(self.keys.nodes(), prefix())).await?;
        let rev = nodes.header().map_or(0, |h| h.revision());
        let mut snap = Snapshot::default();
        for kv in nodes.kvs() {
            if let Some(n) = self.keys.node_of(kv.key()) {
                snap.members.insert(n, parse("snapshot", kv.key(), kv.value())?);
            }
        }
        // Apps and leases change only through the leader's commits, and this
        // node leads now: reading them after the members is consistent.
        let apps = bounded("snapshot", self.client.get(self.keys.apps(), prefix())).await?;
        for kv in apps.kvs() {
            snap.apps.push(parse::<AppRecord>("snapshot", kv.key(), kv.value())?);
        }
        let leases = bounded("snapshot", self.client.get(self.keys.leases(), prefix())).await?;
        for kv in leases.kvs() {
            snap.leases.push(parse::<Lease>("snapshot", kv.key(), kv.value())?);
        }
        Ok((snap, rev))
    }

    /// Watches the members from revision `from`.
    pub async fn watch_members(&mut self, from: i64) -> Result<WatchStream, EtcdError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        bounded("watch", self.client.watch(self.keys.nodes(), Some(opts))).await
    }

    /// The next membership changes on `w`.
    pub async fn member_events(&self, w: &mut WatchStream) -> Result<Vec<MemberEvent>, EtcdError> {
        let r = w.message().await.map_err(|source| EtcdError::Client { op: "watch", source })?;
        let Some(r) = r else { return Err(EtcdError::StreamEnded("watch")) };
        if r.canceled() {
            return Err(EtcdError::StreamEnded("watch"));
        }
        let mut out = Vec::new();
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(n) = self.keys.node_of(kv.key()) else { continue };
            match ev.event_type() {
                EventType::Put => out.push(MemberEvent::Up(n, parse("watch", kv.key(), kv.value())?)),
                EventType::Delete => out.push(MemberEvent::Down(n)),
            }
        }
        Ok(out)
    }

    /// Writes `ops` if `leader` still holds the election (its key exists
    /// with the revision it was created at): [`EtcdError::Fenced`] if not.
    /// More than [`MAX_TXN_OPS`] go in several transactions, each fenced.
    pub async fn commit(&mut self, leader: &LeaderKey, ops: &[Op]) -> Result<(), EtcdError> {
        let fence = || vec![Compare::create_revision(leader.key().to_vec(), CompareOp::Equal, leader.rev())];
        let chunks: Vec<&[Op]> = if ops.is_empty() { vec![&[]] } else { ops.chunks(MAX_TXN_OPS).collect() };
        for chunk in chunks {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match self.keys.op(op) {
                    (k, Some(v)) => TxnOp::put(k, v, None),
                    (k, None) => TxnOp::delete(k, None),
                })
                .collect();
            let txn = Txn::new().when(fence()).and_then(txn_ops);
            let r = bounded("commit", self.client.txn(txn)).await?;
            if !r.succeeded() {
                return Err(EtcdError::Fenced);
            }
        }
        Ok(())
    }
}
