//! The peer service's outgoing connections: the arbiter's ordered link to
//! each member ([`link`]) and a node's link to the arbiter
//! ([`arbiter_link`]), which follows the leader on etcd and keeps what the
//! node sends while there is none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::Shared;
use crate::auction::etcd::record::LeaderRecord;
use crate::auction::node_arbiter::kind;
use crate::auction::peer::io::write_frame;
use crate::auction::peer::message::Message;
use crate::telemetry::names;

use super::OUTBOX;

fn sent(m: &Message) {
    metrics::counter!(names::PEER_FRAMES_SENT_TOTAL, "kind" => kind(m)).increment(1);
}

pub(super) async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        _ => None,
    }
}

/// An ordered stream of messages to one member; a message whose write failed
/// is sent again first on the next connection. Once the service drops the
/// link's sender (the member left, or was resynced on a new link) what is
/// still queued is superseded: it is not sent.
pub(super) async fn link(shared: Arc<Shared>, addr: SocketAddr, mut rx: mpsc::Receiver<Message>) {
    let mut pending: Option<Message> = None;
    loop {
        if rx.sender_strong_count() == 0 {
            return;
        }
        let Some(mut s) = connect(addr).await else {
            if rx.is_closed() {
                return; // the member left or was resynced on a new link
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let m = match pending.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            if rx.sender_strong_count() == 0 {
                return; // superseded
            }
            if write_frame(&mut s, &shared.seal(&m)).await.is_err() {
                pending = Some(m);
                break;
            }
            sent(&m);
        }
    }
}

/// Where a node's link to the arbiter goes.
pub(super) enum Target {
    /// The static arbiter of the config.
    Static(SocketAddr),
    /// Whoever etcd names the leader now.
    Elected(watch::Receiver<Option<LeaderRecord>>),
}

/// Where to send now.
enum Dest {
    Peer(SocketAddr),
    /// This node leads: its arbiter takes the messages in process.
    Me,
    /// No arbiter yet (or it is this node and it is still loading).
    Nobody,
}

impl Target {
    fn dest(&self, shared: &Shared) -> Dest {
        match self {
            Target::Static(a) => Dest::Peer(*a),
            Target::Elected(rx) => match &*rx.borrow() {
                Some(l) if l.node == shared.me => {
                    if shared.is_arbiter() {
                        Dest::Me
                    } else {
                        Dest::Nobody
                    }
                }
                Some(l) => l.listen.parse().map_or(Dest::Nobody, Dest::Peer),
                None => Dest::Nobody,
            },
        }
    }

    /// Until the leader changes (never, for a static arbiter).
    async fn changed(&mut self) {
        match self {
            Target::Static(_) => std::future::pending().await,
            Target::Elected(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// A non-arbiter node's link to the arbiter: join on every (re)connect, then
/// what the node sends (kept, up to [`OUTBOX`], while the arbiter is away;
/// heartbeats queued meanwhile are stale and dropped). On etcd it follows the
/// leader: a new one gets a new connection and the join, and when this node
/// is elected what it queued goes to its own arbiter.
pub(super) async fn arbiter_link(
    shared: Arc<Shared>,
    mut target: Target,
    join: Message,
    mut rx: mpsc::UnboundedReceiver<Message>,
) {
    let mut pending: std::collections::VecDeque<Message> = std::collections::VecDeque::new();
    let keep = |pending: &mut std::collections::VecDeque<Message>, m: Message| {
        if !matches!(m, Message::Heartbeat { .. }) && pending.len() < OUTBOX {
            pending.push_back(m);
        }
    };
    loop {
        let addr = match target.dest(&shared) {
            Dest::Peer(a) => a,
            Dest::Me => {
                while let Ok(m) = rx.try_recv() {
                    keep(&mut pending, m);
                }
                for m in pending.drain(..) {
                    if let Err(e) = shared.handle_as_arbiter(shared.me, m) {
                        tracing::warn!(error = %e, "own message refused by the arbiter");
                    }
                }
                tokio::select! {
                    () = target.changed() => {}
                    m = rx.recv() => match m {
                        Some(m) => keep(&mut pending, m),
                        None => return,
                    },
                }
                continue;
            }
            Dest::Nobody => {
                while let Ok(m) = rx.try_recv() {
                    keep(&mut pending, m);
                }
                tokio::select! {
                    () = target.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
        };
        let Some(mut s) = connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok(m) = rx.try_recv() {
                keep(&mut pending, m);
            }
            continue;
        };
        if write_frame(&mut s, &shared.seal(&join)).await.is_err() {
            continue;
        }
        // The arbiter never writes on this connection: anything readable is
        // its end (it died or closed), seen before a message is written into
        // a dead connection and lost.
        let (mut rd, mut wr) = s.split();
        let mut eof = [0u8; 1];
        loop {
            let m = match pending.pop_front() {
                Some(m) => m,
                None => tokio::select! {
                    () = target.changed() => break,
                    _ = tokio::io::AsyncReadExt::read(&mut rd, &mut eof) => break,
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => return,
                    },
                },
            };
            if !matches!(target.dest(&shared), Dest::Peer(a) if a == addr) {
                pending.push_front(m);
                break; // the leader changed
            }
            if write_frame(&mut wr, &shared.seal(&m)).await.is_err() {
                pending.push_front(m);
                break;
            }
            sent(&m);
        }
    }
}
