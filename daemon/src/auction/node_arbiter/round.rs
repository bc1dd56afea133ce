//! The arbiter node's lease round, in two phases (Themis's agent/arbiter
//! split, `docs/peer-protocol.md` "Offers and bids"):
//!
//! 1. [`ArbiterState::begin_round`]: apps progress, finished ones release
//!    their GPUs, expired leases return to the pool, the worst-ρ apps are
//!    picked ([`Arbiter::open_round`]) and each gets an `offer` at its home
//!    node, where its agent answers ([`crate::auction::agent`]);
//! 2. [`ArbiterState::take_bid`]: each `bid` is checked (bounded before
//!    anything is allocated for it: options, finite positive ρ, the current
//!    round, an offered app from its home node, only offered GPUs) and kept
//!    or refused;
//! 3. [`ArbiterState::close_round`], once every offered agent has bid or at
//!    the bid deadline: the mechanism over the bids received
//!    ([`Arbiter::close_round`]); an agent that did not bid takes no part
//!    (it can still get leftovers). Expired leases are revoked here, just
//!    before the grants, so that a renewal reaches the nodes as one
//!    `revoke` + `grant` pair (the enforcer keeps such an app running).
//!
//! A new arbiter (failover) has no round open: the agents' bids for the old
//! one are refused as stale and the next round offers again.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{ArbiterState, Out};
use crate::auction::agent::{options_of, wire_bundle};
use crate::auction::app::{App, AppId, ClusterView};
use crate::auction::arbiter::{Arbiter, OpenRound, RoundReport};
use crate::auction::bid::Bid;
use crate::auction::etcd::record::Op;
use crate::auction::gpu::NodeId;
use crate::auction::peer::message::{Message, OfferView, WireOption};
use crate::telemetry::names;

/// Most options one bid may carry (an agent's [`crate::auction::bid::bid`]
/// makes at most 5 per bundle size, 17 sizes for the largest demand).
pub const MAX_BID_OPTIONS: usize = 128;
/// Rounds `gatictl apps` shows on the arbiter.
pub const RECENT_ROUNDS: usize = 16;

/// A round waiting for its bids.
#[derive(Debug)]
pub(super) struct Pending {
    id: u64,
    open: OpenRound,
    /// Offered apps and their home nodes.
    offered: BTreeMap<AppId, NodeId>,
    bids: BTreeMap<AppId, Bid>,
    refused: u64,
}

/// Why a bid was refused (counted under [`BidRefusal::reason`] in
/// `gati_auction_bids_total{result}`).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BidRefusal {
    #[error("bid with {0} options (at most {MAX_BID_OPTIONS})")]
    TooManyOptions(usize),
    #[error("bid with a ρ that is not a positive finite number: {0}")]
    Invalid(String),
    #[error("bid for round {round}, not the open round ({open:?})")]
    Stale { round: u64, open: Option<u64> },
    #[error("bid not for an offer: {0}")]
    NotOffered(String),
    #[error("second bid for app {0} in this round")]
    Duplicate(AppId),
}

impl BidRefusal {
    /// The `result` label it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            BidRefusal::TooManyOptions(_) => "too_many_options",
            BidRefusal::Invalid(_) => "invalid",
            BidRefusal::Stale { .. } => "stale",
            BidRefusal::NotOffered(_) => "not_offered",
            BidRefusal::Duplicate(_) => "duplicate",
        }
    }
}

/// One closed round, as `gatictl apps` shows it on the arbiter.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundSummary {
    pub round: u64,
    /// The round's time on the arbiter's clock.
    pub at: f64,
    pub offered: Vec<AppId>,
    /// Offered apps whose agent's bid arrived in time.
    pub bids: Vec<AppId>,
    /// Offered apps whose agent did not bid (they took no part in the auction).
    pub missing: Vec<AppId>,
    /// Bids refused while the round was open.
    pub refused: u64,
    /// Apps granted a lease by the auction.
    pub auctioned: Vec<AppId>,
    /// Apps granted leftover GPUs.
    pub leftover: Vec<AppId>,
}

fn bids_counter(result: &'static str, n: u64) {
    metrics::counter!(names::AUCTION_BIDS_TOTAL, "result" => result).increment(n);
}

impl ArbiterState {
    /// Opens a lease round at `now` (closing one still open first): apps
    /// progress by their throughput model, finished ones release their GPUs,
    /// and the offered apps' home nodes get an `offer`. Returns the round's
    /// id while it waits for bids (`None`: nothing was offered, and the
    /// round closed at once).
    pub fn begin_round(&mut self, now: f64) -> (Vec<Out>, Option<u64>) {
        let mut out = Vec::new();
        if let Some(id) = self.pending.as_ref().map(|p| p.id) {
            out.extend(self.close_round(id, now).0);
        }
        out.extend(self.reap(now));
        let active = self.apps.len();
        let (mut finished, mut ran) = (Vec::new(), Vec::new());
        for (&id, t) in &mut self.apps {
            let held = self.arbiter.leases().held(id);
            // (Done already: finished on its stored leases when this arbiter took over.)
            if t.app.advance(now, &held, active).is_some() || t.app.is_done() {
                finished.push(id);
            } else if !held.is_empty() {
                ran.push(id);
            }
        }
        for id in finished {
            for l in self.arbiter.release_app(id) {
                self.ended(&l, super::FINISHED, &mut out);
            }
            self.apps.remove(&id);
            self.journal(Op::DelApp(id));
        }
        // The progress of every app that ran, stored with this step (on
        // etcd): a new arbiter resumes from the last round's.
        for id in ran {
            self.journal_app(id);
        }
        let refs: Vec<&App> = self.apps.values().map(|t| &t.app).collect();
        let open = self.arbiter.open_round(now, &refs);
        self.round_seq += 1;
        let id = self.round_seq;
        let mut offered = BTreeMap::new();
        let free = wire_bundle(&open.offer);
        let view = OfferView { now, gpus: open.view.gpus, node_gpus: open.view.node_gpus, lease_s: open.view.lease_s };
        for app in &open.inside {
            let Some(t) = self.apps.get(app) else { continue };
            offered.insert(*app, t.node);
            out.push(Out::To(
                t.node,
                Message::Offer {
                    round: id,
                    app: *app,
                    free: free.clone(),
                    held: wire_bundle(&self.arbiter.leases().held(*app)),
                    view,
                    arrival: t.app.spec.arrival,
                    progress: t.app.progress(),
                },
            ));
        }
        metrics::counter!(names::AUCTION_OFFERS_TOTAL).increment(offered.len() as u64);
        let waiting = !offered.is_empty();
        self.pending = Some(Pending { id, open, offered, bids: BTreeMap::new(), refused: 0 });
        if waiting {
            return (out, Some(id));
        }
        out.extend(self.close_round(id, now).0);
        (out, None)
    }

    /// The open round's id and its bid deadline (arbiter clock).
    pub fn open_round(&self) -> Option<(u64, f64)> {
        self.pending.as_ref().map(|p| (p.id, p.open.view.now + self.bid_deadline_s))
    }

    /// A `bid` from authenticated node `sender`; closes the round when it
    /// was the last one awaited.
    pub fn take_bid(
        &mut self,
        sender: NodeId,
        round: u64,
        app: AppId,
        rho_without: f64,
        options: &[WireOption],
        now: f64,
    ) -> Result<Vec<Out>, BidRefusal> {
        let r = self.check_bid(sender, round, app, rho_without, options);
        let Some(p) = self.pending.as_mut() else {
            let e = r.err().unwrap_or(BidRefusal::Stale { round, open: None });
            bids_counter(e.reason(), 1);
            return Err(e);
        };
        match r {
            Ok(bid) => {
                bids_counter("accepted", 1);
                p.bids.insert(app, bid);
                if p.bids.len() < p.offered.len() {
                    return Ok(Vec::new());
                }
                let id = p.id;
                Ok(self.close_round(id, now).0)
            }
            Err(e) => {
                if p.id == round {
                    p.refused += 1;
                }
                bids_counter(e.reason(), 1);
                Err(e)
            }
        }
    }

    fn check_bid(
        &self,
        sender: NodeId,
        round: u64,
        app: AppId,
        rho_without: f64,
        options: &[WireOption],
    ) -> Result<Bid, BidRefusal> {
        if options.len() > MAX_BID_OPTIONS {
            return Err(BidRefusal::TooManyOptions(options.len()));
        }
        let bad = |r: f64| !r.is_finite() || r <= 0.0;
        if bad(rho_without) || options.iter().any(|o| bad(o.rho)) {
            let worst = options.iter().map(|o| o.rho).find(|&r| bad(r)).unwrap_or(rho_without);
            return Err(BidRefusal::Invalid(format!("{worst}")));
        }
        let p = self.pending.as_ref().filter(|p| p.id == round);
        let Some(p) = p else {
            return Err(BidRefusal::Stale { round, open: self.pending.as_ref().map(|p| p.id) });
        };
        match p.offered.get(&app) {
            None => return Err(BidRefusal::NotOffered(format!("app {app} was not offered in round {round}"))),
            Some(&home) if home != sender => {
                return Err(BidRefusal::NotOffered(format!(
                    "bid for app {app} from node {sender}, not its home {home}"
                )))
            }
            Some(_) => {}
        }
        if p.bids.contains_key(&app) {
            return Err(BidRefusal::Duplicate(app));
        }
        let options = options_of(options).map_err(BidRefusal::NotOffered)?;
        let room = self
            .apps
            .get(&app)
            .map_or(0, |t| t.app.spec.demand)
            .saturating_sub(self.arbiter.leases().held(app).total());
        let offer = &p.open.offer;
        for o in &options {
            if o.bundle.total() > room || o.bundle.iter().any(|(n, k)| k > offer.on_node(n)) {
                return Err(BidRefusal::NotOffered(format!(
                    "option {:?} is not within the offer {:?} (room for {room} GPUs)",
                    wire_bundle(&o.bundle),
                    wire_bundle(offer)
                )));
            }
        }
        Ok(Bid { app, rho_without, options })
    }

    /// Closes round `id` (no-op if it is not the open one): the mechanism
    /// over the bids received, the leftover, every change and every app's ρ
    /// broadcast.
    pub fn close_round(&mut self, id: u64, now: f64) -> (Vec<Out>, Option<RoundReport>) {
        let mut out = Vec::new();
        let Some(p) = self.pending.take_if(|p| p.id == id) else { return (out, None) };
        let Pending { open, offered, mut bids, refused, .. } = p;
        let at = open.view.now;
        // In the offer's order (worst ρ first), as the in-process round has them.
        let ordered: Vec<Bid> = open.inside.iter().filter_map(|a| bids.remove(a)).collect();
        let received: Vec<AppId> = ordered.iter().map(|b| b.app).collect();
        let refs: Vec<&App> = self.apps.values().map(|t| &t.app).collect();
        let report = self.arbiter.close_round(open, ordered, &refs);
        let missing: Vec<AppId> = offered.keys().copied().filter(|a| !received.contains(a)).collect();
        bids_counter("missing", missing.len() as u64);
        let mut touched = BTreeSet::new();
        for l in &report.expired {
            self.ended(l, "expired", &mut out);
            touched.insert(l.app);
        }
        let mut leftover = Vec::new();
        for l in &report.grants {
            out.push(Out::All(self.grant_msg(l)));
            self.journal(Op::PutLease(l.clone()));
            touched.insert(l.app);
            if !report.auctioned.contains(&l.app) {
                leftover.push(l.app);
            }
        }
        for app in touched {
            self.journal_app(app);
        }
        let view = ClusterView {
            now: now.max(at),
            gpus: self.arbiter.gpus(),
            node_gpus: self.members.values().map(|m| m.gpus).max().unwrap_or(0),
            lease_s: self.lease_s,
        };
        for (&app, t) in &self.apps {
            let rho = t.app.rho_with(&self.arbiter.leases().held(app), &view);
            out.push(Out::All(Message::RhoReport { app, rho }));
        }
        if self.recent.len() >= RECENT_ROUNDS {
            self.recent.pop_front();
        }
        self.recent.push_back(RoundSummary {
            round: id,
            at,
            offered: offered.keys().copied().collect(),
            bids: received,
            missing,
            refused,
            auctioned: report.auctioned.clone(),
            leftover,
        });
        (out, Some(report))
    }

    /// The last closed rounds, oldest first.
    pub fn recent_rounds(&self) -> impl Iterator<Item = &RoundSummary> {
        self.recent.iter()
    }

    /// The arbiter itself (tests, the control answer).
    pub fn arbiter(&self) -> &Arbiter {
        &self.arbiter
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::{cfg, join, submit};
    use super::*;
    use crate::auction::lease::Lease;
    use crate::auction::peer::message::Message;

    /// The home nodes' agents: each submit goes through them, as on a node.
    #[derive(Default)]
    pub(in crate::auction::node_arbiter) struct Homes(pub BTreeMap<NodeId, crate::auction::agent::Agents>);

    impl Homes {
        pub fn submit(&mut self, a: &mut ArbiterState, node: NodeId, app: AppId, demand: u32, now: f64) {
            let Message::Submit { name, work, command, .. } = submit(node, app, demand) else { unreachable!() };
            let home = crate::auction::agent::HomeApp::submitted(name, demand, work, command);
            let m = self.0.entry(node).or_insert_with(|| crate::auction::agent::Agents::new(node)).add(app, home);
            a.handle(node, m.unwrap(), now).unwrap();
        }

        /// One round at `now`, every offer answered by its home node's agent
        /// (those of `silent` nodes never answer); the round closed at its
        /// deadline if a bid is missing. Returns what was sent and the leases granted.
        pub fn round(&mut self, a: &mut ArbiterState, now: f64, silent: &[NodeId]) -> (Vec<Out>, Vec<Lease>) {
            let (mut out, id) = a.begin_round(now);
            let offers: Vec<(NodeId, Message)> = out
                .iter()
                .filter_map(|o| match o {
                    Out::To(n, m @ Message::Offer { .. }) => Some((*n, m.clone())),
                    _ => None,
                })
                .collect();
            for (n, offer) in offers {
                if silent.contains(&n) {
                    continue;
                }
                let Message::Bid { round, app, rho_without, options } =
                    self.0.get_mut(&n).unwrap().answer(&offer).unwrap()
                else {
                    unreachable!()
                };
                out.extend(a.take_bid(n, round, app, rho_without, &options, now).unwrap());
            }
            if let Some(id) = id {
                out.extend(a.close_round(id, now).0);
            }
            let grants = out
                .iter()
                .filter_map(|o| match o {
                    Out::All(Message::Grant { lease, .. }) => Some(lease.clone()),
                    _ => None,
                })
                .collect();
            (out, grants)
        }
    }

    /// Three members of 2 GPUs, `apps` apps of demand 2 (app i on node 1 + i % 3), Themis's `f`.
    fn cluster(apps: u64, f: f64) -> (ArbiterState, Homes) {
        let mut c = cfg();
        c.f = f;
        let mut a = ArbiterState::new(1, &c).unwrap();
        for n in 1..=3 {
            a.handle(n, join(n, 2), 0.0).unwrap();
        }
        let mut homes = Homes::default();
        for app in 0..apps {
            homes.submit(&mut a, 1 + (app as u32 % 3), app, 2, 0.0);
        }
        (a, homes)
    }

    fn offers(out: &[Out]) -> Vec<(NodeId, Message)> {
        out.iter()
            .filter_map(|o| match o {
                Out::To(n, m @ Message::Offer { .. }) => Some((*n, m.clone())),
                _ => None,
            })
            .collect()
    }

    /// The two phases give what the in-process round (the simulator's) gives
    /// on the same state: the offers go to the apps' home nodes, the agents'
    /// answers over the wire are the same bids, the last bid closes the round.
    #[test]
    fn offers_go_home_and_wire_bids_give_the_in_process_round() {
        let (mut a, mut homes) = cluster(5, 0.5);
        let (mut arb, mut apps) = (a.arbiter.clone(), a.apps.clone());
        let (out, id) = a.begin_round(1.0);
        let id = id.expect("a round waits for bids");
        let offered = offers(&out);
        assert!(!offered.is_empty());
        for (n, m) in &offered {
            let Message::Offer { app, round, .. } = m else { unreachable!() };
            assert_eq!((*n, *round), (a.apps[app].node, id), "offer to the app's home node");
        }
        let mut closed = Vec::new();
        for (i, (n, offer)) in offered.iter().enumerate() {
            let Message::Bid { round, app, rho_without, options } = homes.0.get_mut(n).unwrap().answer(offer).unwrap()
            else {
                unreachable!()
            };
            assert_eq!(a.open_round().map(|r| r.0), Some(id), "open until the last bid");
            closed = a.take_bid(*n, round, app, rho_without, &options, 1.0).unwrap();
            assert_eq!(closed.is_empty(), i + 1 < offered.len());
        }
        assert!(a.open_round().is_none(), "the last bid closed the round");
        let wire: Vec<_> = closed
            .iter()
            .filter_map(|o| match o {
                Out::All(Message::Grant { lease, .. }) => Some(lease.clone()),
                _ => None,
            })
            .collect();
        // The same round in process, on a copy of the state before it.
        let active = apps.len();
        for (id, t) in &mut apps {
            t.app.advance(1.0, &arb.leases().held(*id), active);
        }
        let refs: Vec<&App> = apps.values().map(|t| &t.app).collect();
        let local = arb.round(1.0, &refs);
        assert_eq!(wire, local.grants);
        let s = a.recent_rounds().last().unwrap();
        assert_eq!((s.round, s.missing.len(), s.refused), (id, 0, 0));
        assert_eq!(s.auctioned, local.auctioned);
    }

    /// An agent that does not answer takes no part in the auction; the
    /// others are granted at the deadline.
    #[test]
    fn a_silent_agent_takes_no_part_and_the_deadline_closes_the_round() {
        // 6 GPUs, 3 apps of 2, f = 0: all three offered.
        let mut c = cfg();
        c.f = 0.0;
        let mut a = ArbiterState::new(1, &c).unwrap();
        let mut homes = Homes::default();
        for n in 1..=3 {
            a.handle(n, join(n, 2), 0.0).unwrap();
        }
        for app in 0..3 {
            homes.submit(&mut a, 1 + app as u32, app, 2, 0.0);
        }
        let (_, grants) = homes.round(&mut a, 1.0, &[3]);
        let s = a.recent_rounds().last().unwrap().clone();
        assert_eq!(s.offered, vec![0, 1, 2]);
        assert_eq!(s.missing, vec![2], "{s:?}");
        assert!(!s.auctioned.contains(&2) && !s.auctioned.is_empty(), "{s:?}");
        assert!(grants.iter().any(|l| l.app != 2));
        assert_eq!(a.open_round(), None);
    }

    /// Bids that are over-size, not finite, for another round, for an app
    /// or GPUs not offered, from a node other than the app's home, or a
    /// second one, are refused with their reason; the round stays open.
    #[test]
    fn bad_bids_are_refused_with_their_reason() {
        // f = 0: all three apps are offered, so the round stays open after one bid.
        let (mut a, mut homes) = cluster(3, 0.0);
        let (out, id) = a.begin_round(1.0);
        let id = id.unwrap();
        let (n, offer) = offers(&out)[0].clone();
        let Message::Bid { app, rho_without, options, .. } = homes.0.get_mut(&n).unwrap().answer(&offer).unwrap()
        else {
            unreachable!()
        };
        let opt = |per_node: Vec<(NodeId, u32)>, rho: f64| WireOption { per_node, rho };
        let mut bid = |sender: NodeId, round: u64, app: AppId, rw: f64, o: &[WireOption]| {
            a.take_bid(sender, round, app, rw, o, 1.0).map(|_| ()).map_err(|e| e.reason())
        };
        let many = vec![options[0].clone(); MAX_BID_OPTIONS + 1];
        assert_eq!(bid(n, id, app, rho_without, &many), Err("too_many_options"));
        assert_eq!(bid(n, id, app, f64::NAN, &options), Err("invalid"));
        assert_eq!(bid(n, id, app, rho_without, &[opt(vec![(1, 1)], -1.0)]), Err("invalid"));
        assert_eq!(bid(n, id, app, rho_without, &[opt(vec![(1, 1)], f64::INFINITY)]), Err("invalid"));
        assert_eq!(bid(n, id - 1, app, rho_without, &options), Err("stale"));
        assert_eq!(bid(n, id, 99, rho_without, &options), Err("not_offered"));
        assert_eq!(bid(n % 3 + 1, id, app, rho_without, &options), Err("not_offered"), "not its home node");
        assert_eq!(bid(n, id, app, rho_without, &[opt(vec![(9, 1)], 0.5)]), Err("not_offered"), "a node not offered");
        assert_eq!(bid(n, id, app, rho_without, &[opt(vec![(1, 3)], 0.5)]), Err("not_offered"), "more than offered");
        assert_eq!(bid(n, id, app, rho_without, &[opt(vec![(1, 1), (1, 1)], 0.5)]), Err("not_offered"));
        assert_eq!(bid(n, id, app, rho_without, &options), Ok(()));
        assert_eq!(bid(n, id, app, rho_without, &options), Err("duplicate"));
        assert_eq!(a.open_round().map(|r| r.0), Some(id));
        a.close_round(id, 1.5);
        assert_eq!(a.recent_rounds().last().unwrap().refused, 10);
        // Closed: any bid for it is stale.
        assert_eq!(a.take_bid(n, id, app, rho_without, &options, 2.0).map_err(|e| e.reason()), Err("stale"));
    }

    /// A round still open when the next one starts is closed first.
    #[test]
    fn an_open_round_closes_before_the_next() {
        let (mut a, _) = cluster(3, 0.0);
        let (_, first) = a.begin_round(1.0);
        let first = first.expect("open");
        assert!(a.recent_rounds().next().is_none());
        a.begin_round(2.0);
        let s = a.recent_rounds().next().unwrap();
        assert_eq!((s.round, s.missing.len()), (first, 3), "closed without bids: {s:?}");
        assert_ne!(a.open_round().map(|r| r.0), Some(first));
    }

    /// On etcd every round stores the progress of the apps that ran; a new
    /// arbiter resumes from the last stored round and counts the running on
    /// the stored leases up to their expiry, even one that expired before
    /// it was elected.
    #[test]
    fn progress_is_stored_every_round_and_survives_a_failover() {
        use crate::auction::etcd::record::{NodeRecord, Snapshot};
        let rec = NodeRecord { listen: "127.0.0.1:7".into(), gpus: 2 };
        let snap = Snapshot { members: (1..=3).map(|n| (n, rec.clone())).collect(), ..Snapshot::default() };
        let (mut a, _) = ArbiterState::elected(1, &cfg(), snap.clone(), 0.0).unwrap();
        let mut homes = Homes::default();
        homes.submit(&mut a, 2, 7, 2, 0.0);
        let mut stored = snap;
        let mut store = |ops: Vec<Op>| {
            for op in ops {
                match op {
                    Op::PutApp(r) => {
                        stored.apps.retain(|x| x.id != r.id);
                        stored.apps.push(r);
                    }
                    Op::PutLease(l) => stored.leases.push(l),
                    Op::DelLease(id) => stored.leases.retain(|l| l.id != id),
                    Op::DelApp(id) => stored.apps.retain(|x| x.id != id),
                }
            }
            stored.apps[0].progress
        };
        let (_, grants) = homes.round(&mut a, 0.5, &[]);
        assert!(!grants.is_empty());
        store(a.take_ops());
        let mut done = 0.0;
        for t in [1.5, 2.5, 3.5] {
            homes.round(&mut a, t, &[]);
            let p = store(a.take_ops());
            assert_eq!(p.last, t, "stored with the round at {t}");
            assert!(p.done > done, "{p:?}");
            done = p.done;
        }
        assert_eq!(a.apps()[&7].app.progress(), stored.apps[0].progress);
        // The arbiter dies; its successor is elected after the app's leases expired.
        let expiry = stored.leases.iter().map(|l| l.expiry).fold(0.0, f64::max);
        let rate = a.apps()[&7].app.rate(&a.arbiter.leases().held(7));
        let (b, _) = ArbiterState::elected(1, &cfg(), stored, expiry + 5.0).unwrap();
        assert!(b.arbiter.leases().iter().next().is_none(), "expired leases are dropped");
        let p = b.apps()[&7].app.progress();
        assert!((p.done - (done + rate * (expiry - 3.5))).abs() < 1e-6, "ran up to the expiry: {p:?}");
    }
}
