//! Admission of inbound peer connections at accept (`docs/peer-protocol.md`,
//! "Limits and refusals"): a connection is *in handshake* from accept until
//! its first frame opens (authentic, with the cluster key), *established*
//! after. Refused at accept, closed at once:
//!
//! - `total`: `peer_max_connections` connections (both states) are open;
//! - `per_ip`: its source IP has `peer_max_per_ip` connections in handshake;
//! - `handshakes`: half of `peer_max_connections` are in handshake and its IP
//!   has never sent an authentic frame (an IP that has — a known peer's —
//!   may still use the other half).
//!
//! Established connections do not count against their IP: nodes that share
//! an address (a loopback cluster: all from 127.0.0.1) keep every link they
//! hold, and a flood from one IP holds at most `peer_max_per_ip` slots of the
//! total, so a known peer on another IP always finds room. Refusals are
//! counted in `gati_cluster_peer_connections_refused_total{reason}` and
//! logged at most once a second with the count; open connections are the
//! gauge `gati_cluster_peer_connections{state}`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::telemetry::names;

/// Most source IPs remembered as having sent an authentic frame.
pub const MAX_KNOWN_IPS: usize = 4096;
/// Refusals are logged at most this often (with the count since the last line).
pub const WARN_EVERY: Duration = Duration::from_secs(1);

/// The bounds, from `[cluster]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Inbound connections open at once, in handshake or established.
    pub max_connections: usize,
    /// Inbound connections in handshake at once from one source IP.
    pub max_per_ip: usize,
}

impl Limits {
    /// Connections in handshake at once from IPs never seen authentic: half the total.
    pub fn max_unknown_handshakes(&self) -> usize {
        self.max_connections.div_ceil(2)
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("peer_max_connections inbound connections are open")]
    Total,
    #[error("its source IP has peer_max_per_ip connections in handshake")]
    PerIp,
    #[error("half of peer_max_connections are in handshake and its IP is not a known peer's")]
    Handshakes,
}

impl Refusal {
    /// The label it is counted under.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerIp => "per_ip",
            Refusal::Handshakes => "handshakes",
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    handshaking: HashMap<IpAddr, usize>,
    handshakes: usize,
    established: usize,
    known: HashSet<IpAddr>,
    refused_unlogged: u64,
    last_refused: Option<(IpAddr, Refusal)>,
    last_warn: Option<Instant>,
}

/// The counts behind the limits, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    inner: Mutex<Inner>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission { limits, inner: Mutex::new(Inner::default()) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection from `ip`, or why there is none (counted;
    /// the caller closes the connection and may log [`Admission::warn_due`]).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut g = self.lock();
        let from_ip = g.handshaking.get(&ip).copied().unwrap_or(0);
        let refusal = if g.handshakes + g.established >= self.limits.max_connections {
            Some(Refusal::Total)
        } else if from_ip >= self.limits.max_per_ip {
            Some(Refusal::PerIp)
        } else if g.handshakes >= self.limits.max_unknown_handshakes() && !g.known.contains(&ip) {
            Some(Refusal::Handshakes)
        } else {
            None
        };
        if let Some(r) = refusal {
            g.refused_unlogged += 1;
            g.last_refused = Some((ip, r));
            drop(g);
            metrics::counter!(names::CLUSTER_PEER_CONNECTIONS_REFUSED_TOTAL, "reason" => r.reason()).increment(1);
            return Err(r);
        }
        *g.handshaking.entry(ip).or_insert(0) += 1;
        g.handshakes += 1;
        publish(&g);
        Ok(Slot { admission: Arc::clone(self), ip, established: false })
    }

    /// The refusals since the last warning and the latest of them, if a
    /// warning is due now (at most every [`WARN_EVERY`]).
    pub fn warn_due(&self, now: Instant) -> Option<(u64, IpAddr, Refusal)> {
        let mut g = self.lock();
        if g.refused_unlogged == 0 || g.last_warn.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return None;
        }
        g.last_warn = Some(now);
        let (ip, r) = g.last_refused?;
        Some((std::mem::take(&mut g.refused_unlogged), ip, r))
    }

    /// (in handshake, established) now.
    pub fn open(&self) -> (usize, usize) {
        let g = self.lock();
        (g.handshakes, g.established)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

fn publish(g: &Inner) {
    metrics::gauge!(names::CLUSTER_PEER_CONNECTIONS, "state" => "handshake").set(g.handshakes as f64);
    metrics::gauge!(names::CLUSTER_PEER_CONNECTIONS, "state" => "established").set(g.established as f64);
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
    established: bool,
}

impl Slot {
    /// The connection's first frame opened: it leaves its IP's handshake
    /// count, and the IP is remembered as a known peer's.
    pub fn establish(&mut self) {
        if self.established {
            return;
        }
        self.established = true;
        let mut g = self.admission.lock();
        leave_handshake(&mut g, self.ip);
        g.established += 1;
        if g.known.len() < MAX_KNOWN_IPS {
            g.known.insert(self.ip);
        }
        publish(&g);
    }

    pub fn is_established(&self) -> bool {
        self.established
    }
}

fn leave_handshake(g: &mut Inner, ip: IpAddr) {
    g.handshakes = g.handshakes.saturating_sub(1);
    if let Some(n) = g.handshaking.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            g.handshaking.remove(&ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.admission.lock();
        if self.established {
            g.established = g.established.saturating_sub(1);
        } else {
            leave_handshake(&mut g, self.ip);
        }
        publish(&g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn per_ip_total_and_unknown_handshake_bounds() {
        let a = Admission::new(Limits { max_connections: 8, max_per_ip: 2 });
        // A peer on ip(1) authenticates: established, and ip(1) is known.
        let mut k = a.admit(ip(1)).unwrap();
        assert!(!k.is_established());
        k.establish();
        assert!(k.is_established());
        assert_eq!(a.open(), (0, 1));
        // One IP: two in handshake, the third refused.
        let mut u = vec![a.admit(ip(2)).unwrap(), a.admit(ip(2)).unwrap()];
        assert_eq!(a.admit(ip(2)).unwrap_err(), Refusal::PerIp);
        // Unknown IPs hold at most half the total (4 of 8) in handshake.
        u.extend([a.admit(ip(3)).unwrap(), a.admit(ip(3)).unwrap()]);
        assert_eq!(a.admit(ip(4)).unwrap_err(), Refusal::Handshakes);
        // The known IP may use the other half (still at most 2 in handshake).
        let mut mine = vec![a.admit(ip(1)).unwrap(), a.admit(ip(1)).unwrap()];
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refusal::PerIp);
        assert_eq!(a.open(), (6, 1));
        // Established connections leave their IP's count (nodes sharing an IP
        // keep their links), but the total holds for everyone.
        mine.iter_mut().for_each(Slot::establish);
        mine.push(a.admit(ip(1)).unwrap());
        assert_eq!(a.open(), (5, 3));
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refusal::Total);
        drop((k, u, mine));
        assert_eq!(a.open(), (0, 0));
    }

    #[test]
    fn slots_are_given_back_and_warnings_are_rate_limited() {
        let a = Admission::new(Limits { max_connections: 4, max_per_ip: 1 });
        {
            let _s = a.admit(ip(1)).unwrap();
            for _ in 0..5 {
                assert_eq!(a.admit(ip(1)).unwrap_err(), Refusal::PerIp);
            }
        }
        assert_eq!(a.open(), (0, 0));
        let t0 = Instant::now();
        assert_eq!(a.warn_due(t0), Some((5, ip(1), Refusal::PerIp)));
        let _s = a.admit(ip(1)).unwrap();
        assert_eq!(a.admit(ip(1)).unwrap_err(), Refusal::PerIp);
        assert_eq!(a.warn_due(t0 + Duration::from_millis(500)), None, "at most one warning a second");
        assert_eq!(a.warn_due(t0 + WARN_EVERY), Some((1, ip(1), Refusal::PerIp)));
        assert_eq!(a.warn_due(t0 + 3 * WARN_EVERY), None, "nothing refused since");
    }
}
