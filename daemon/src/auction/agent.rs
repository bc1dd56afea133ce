//! An app's agent (Themis's agent/arbiter split): it lives on the app's home
//! node (the node it was submitted to), knows the app's throughput model,
//! and answers the arbiter's offers with bids ([`super::bid::bid`], the same
//! code the simulator's in-process agents run).
//!
//! The home node also keeps every app submitted on it until it sees the app
//! in the arbiter's state (a grant, a ρ report or an offer for it), and sends
//! the unconfirmed ones again to every arbiter that welcomes it: a submit
//! that a dying arbiter took but never stored reaches the next one (the
//! arbiter takes a submit idempotently, by app id).
//!
//! A home node that restarts gets its agents back from the arbiter: every
//! resync (after `welcome`) carries a `home` message per app whose home it
//! is, with the submit's fields and the app's throughput model
//! ([`Agents::restore`]), so its apps bid again.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::app::{App, AppId, AppSpec, ClusterView};
use super::bid::{bid, Bid, BidOption};
use super::gpu::{Bundle, NodeId};
use super::peer::message::{Message, OfferView, WireOption};
use super::throughput::ThroughputModel;

/// Most apps one node's agents keep (a submit over it is refused).
pub const MAX_HOME_APPS: usize = super::node_arbiter::MAX_APPS;

/// The throughput model of an app submitted with `gatictl app submit`: linear
/// in GPUs, 0.7× when spread over nodes (`docs/peer-protocol.md`).
pub fn submitted_model() -> Arc<ThroughputModel> {
    Arc::new(ThroughputModel::linear(1.0, 0.7))
}

/// An app submitted on this node, as its agent knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct HomeApp {
    pub name: String,
    pub demand: u32,
    pub work: f64,
    pub command: Vec<String>,
    /// What the agent prices offers with.
    pub model: Arc<ThroughputModel>,
    /// Seen in the arbiter's state (it need not be sent again).
    pub confirmed: bool,
}

impl HomeApp {
    /// An app just submitted here (the submitted-app model, not yet confirmed).
    pub fn submitted(name: String, demand: u32, work: f64, command: Vec<String>) -> HomeApp {
        HomeApp { name, demand, work, command, model: submitted_model(), confirmed: false }
    }
}

/// The agents of the apps submitted on one node.
#[derive(Debug)]
pub struct Agents {
    node: NodeId,
    apps: BTreeMap<AppId, HomeApp>,
}

impl Agents {
    /// The agents of home node `node`.
    pub fn new(node: NodeId) -> Agents {
        Agents { node, apps: BTreeMap::new() }
    }

    /// A new app submitted here; its `submit` for the arbiter.
    pub fn add(&mut self, id: AppId, app: HomeApp) -> Result<Message, String> {
        if self.apps.len() >= MAX_HOME_APPS && !self.apps.contains_key(&id) {
            return Err(format!("this node already keeps {MAX_HOME_APPS} apps"));
        }
        let m = self.submit_msg(id, &app);
        self.apps.insert(id, app);
        Ok(m)
    }

    fn submit_msg(&self, id: AppId, a: &HomeApp) -> Message {
        Message::Submit {
            node: self.node,
            app: id,
            name: a.name.clone(),
            demand: a.demand,
            work: a.work,
            command: a.command.clone(),
        }
    }

    /// The agent of `id` back from the arbiter's record (this node restarted,
    /// or missed its apps): `Ok(true)` if it was new here, `Ok(false)` if
    /// this node had it already (now confirmed).
    pub fn restore(&mut self, id: AppId, app: HomeApp) -> Result<bool, String> {
        if let Some(a) = self.apps.get_mut(&id) {
            a.confirmed = true;
            return Ok(false);
        }
        if self.apps.len() >= MAX_HOME_APPS {
            return Err(format!("this node already keeps {MAX_HOME_APPS} apps"));
        }
        self.apps.insert(id, HomeApp { confirmed: true, ..app });
        Ok(true)
    }

    /// The arbiter's state holds `app` (no-op for an app not submitted here).
    pub fn confirm(&mut self, app: AppId) {
        if let Some(a) = self.apps.get_mut(&app) {
            a.confirmed = true;
        }
    }

    /// The app finished: its agent goes.
    pub fn forget(&mut self, app: AppId) {
        self.apps.remove(&app);
    }

    /// The `submit`s of the apps not yet seen in the arbiter's state (for a
    /// new arbiter, which may not have them).
    pub fn unconfirmed(&self) -> Vec<Message> {
        self.apps.iter().filter(|(_, a)| !a.confirmed).map(|(&id, a)| self.submit_msg(id, a)).collect()
    }

    pub fn get(&self, app: AppId) -> Option<&HomeApp> {
        self.apps.get(&app)
    }

    pub fn len(&self) -> usize {
        self.apps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// The answer to an `offer` for one of this node's apps: its bid over
    /// bundles of the free GPUs, priced with the app's own throughput model.
    pub fn answer(&mut self, offer: &Message) -> Result<Message, String> {
        let Message::Offer { round, app, free, held, view, arrival, progress } = offer else {
            return Err("not an offer".into());
        };
        let a = self.apps.get_mut(app).ok_or_else(|| format!("offer for app {app}, which was not submitted here"))?;
        a.confirmed = true;
        let spec = AppSpec {
            id: *app,
            name: a.name.clone(),
            demand: a.demand,
            total_work: a.work,
            model: Arc::clone(&a.model),
            arrival: *arrival,
        };
        let b = price(&App::resume(spec, *progress), held, free, view)?;
        Ok(to_wire(*round, &b))
    }
}

/// `app`'s bid for `free` on top of `held` in the round `view` describes.
fn price(app: &App, held: &[(NodeId, u32)], free: &[(NodeId, u32)], view: &OfferView) -> Result<Bid, String> {
    let held = bundle_of(held).map_err(|e| format!("offer: held {e}"))?;
    let free = bundle_of(free).map_err(|e| format!("offer: free {e}"))?;
    let view = ClusterView { now: view.now, gpus: view.gpus, node_gpus: view.node_gpus, lease_s: view.lease_s };
    Ok(bid(app, &held, &free, &view))
}

/// A bid as a wire message.
pub fn to_wire(round: u64, b: &Bid) -> Message {
    Message::Bid {
        round,
        app: b.app,
        rho_without: b.rho_without,
        options: b.options.iter().map(|o| WireOption { per_node: wire_bundle(&o.bundle), rho: o.rho }).collect(),
    }
}

/// A bundle as (node, count) pairs.
pub fn wire_bundle(b: &Bundle) -> Vec<(NodeId, u32)> {
    b.iter().collect()
}

/// A bundle from (node, count) pairs: nodes distinct, counts > 0 (at most
/// 65 536 GPUs in all).
pub fn bundle_of(per_node: &[(NodeId, u32)]) -> Result<Bundle, String> {
    let mut b = Bundle::default();
    let mut total = 0u64;
    for &(n, k) in per_node {
        if k == 0 || b.on_node(n) > 0 {
            return Err(format!("lists node {n} twice or with 0 GPUs"));
        }
        total += u64::from(k);
        if total > 1 << 16 {
            return Err("is over 65536 GPUs".into());
        }
        b.add(n, k);
    }
    Ok(b)
}

/// A wire bid's options as bundles (each checked as [`bundle_of`]).
pub fn options_of(options: &[WireOption]) -> Result<Vec<BidOption>, String> {
    options.iter().map(|o| Ok(BidOption { bundle: bundle_of(&o.per_node)?, rho: o.rho })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(demand: u32) -> HomeApp {
        HomeApp::submitted("a".into(), demand, 1e4, vec!["true".into()])
    }

    #[test]
    fn a_restored_agent_bids_and_a_known_one_is_kept() {
        let mut agents = Agents::new(2);
        agents.add(1, home(1)).unwrap();
        assert_eq!(agents.restore(1, home(3)), Ok(false));
        assert_eq!(agents.get(1).unwrap().demand, 1, "the node's own record is kept");
        assert!(agents.get(1).unwrap().confirmed);
        assert_eq!(agents.restore(5, home(2)), Ok(true));
        assert!(agents.unconfirmed().is_empty(), "a restored app is in the arbiter's state");
        let view = OfferView { now: 10.0, gpus: 4, node_gpus: 2, lease_s: 5.0 };
        let offer = Message::Offer {
            round: 1,
            app: 5,
            free: vec![(2, 2)],
            held: Vec::new(),
            view,
            arrival: 0.0,
            progress: Default::default(),
        };
        assert!(matches!(agents.answer(&offer), Ok(Message::Bid { app: 5, ref options, .. }) if !options.is_empty()));
    }

    /// An agent's answer over the wire is the bid the arbiter would compute
    /// in process from the same app (the simulator's path).
    #[test]
    fn a_wire_bid_is_the_in_process_bid() {
        let mut agents = Agents::new(2);
        agents.add(7, home(4)).unwrap();
        let spec =
            AppSpec { id: 7, name: "a".into(), demand: 4, total_work: 1e4, model: submitted_model(), arrival: 3.0 };
        let mut app = App::new(spec);
        app.advance(50.0, &Bundle::on(1, 1), 3);
        let view = OfferView { now: 50.0, gpus: 8, node_gpus: 4, lease_s: 20.0 };
        let (held, free) = (Bundle::on(1, 1), Bundle::on(1, 2).union(&Bundle::on(2, 4)));
        let offer = Message::Offer {
            round: 9,
            app: 7,
            free: wire_bundle(&free),
            held: wire_bundle(&held),
            view,
            arrival: 3.0,
            progress: app.progress(),
        };
        let cv = ClusterView { now: 50.0, gpus: 8, node_gpus: 4, lease_s: 20.0 };
        let local = bid(&app, &held, &free, &cv);
        assert!(!local.options.is_empty());
        assert_eq!(agents.answer(&offer).unwrap(), to_wire(9, &local));
        assert!(agents.get(7).unwrap().confirmed, "an offer shows the arbiter has the app");
        // Not an app of this node.
        let Message::Offer { round, free, held, view, arrival, progress, .. } = offer else { unreachable!() };
        let other = Message::Offer { round, app: 8, free, held, view, arrival, progress };
        assert!(agents.answer(&other).is_err());
    }

    #[test]
    fn unconfirmed_apps_are_sent_again_until_seen() {
        let mut agents = Agents::new(3);
        let m = agents.add(1, home(1)).unwrap();
        agents.add(2, home(2)).unwrap();
        assert!(matches!(m, Message::Submit { node: 3, app: 1, .. }));
        assert_eq!(agents.unconfirmed().len(), 2);
        agents.confirm(1);
        agents.confirm(99);
        assert_eq!(agents.unconfirmed(), vec![agents.submit_msg(2, agents.get(2).unwrap())]);
        agents.forget(2);
        assert!(agents.unconfirmed().is_empty());
        assert_eq!(agents.len(), 1);
    }

    #[test]
    fn wire_bundles_are_strict() {
        assert_eq!(bundle_of(&[(1, 2), (3, 1)]).unwrap(), Bundle::on(1, 2).union(&Bundle::on(3, 1)));
        assert!(bundle_of(&[(1, 2), (1, 1)]).is_err());
        assert!(bundle_of(&[(1, 0)]).is_err());
        assert!(bundle_of(&[(1, u32::MAX)]).is_err());
    }
}
