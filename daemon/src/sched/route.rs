//! The routing table: DAG id → SGSs with weights, published by the load
//! balancer through [`RouteTable`]. This file holds the userspace
//! implementation and the one choice rule both implementations follow
//! ([`pick_least_loaded`]); the eBPF steering layer (`steer::BpfRouteTable`)
//! implements the same trait by writing BPF maps, and its kernel program
//! (`ebpf/steer.bpf.c`) applies the same rule per datagram.
//!
//! The rule: among a DAG's routes, those whose SGS holds the fewest requests
//! (the [`LoadBoard`] each SGS updates as it runs); among those, `key` modulo
//! their total weight walks them in order. With equal loads this is the plain
//! weighted choice ([`pick`]). A lookup counts its pick on the board
//! ([`LoadBoard::bump`]) until the SGS next publishes what it holds, so a
//! burst of requests between two publishes spreads over the routes rather than
//! herding onto the SGS that was least loaded at the last publish.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// Index of an SGS in the scheduler.
pub type SgsIndex = usize;

/// One destination of a DAG's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub sgs: SgsIndex,
    /// Relative share of the DAG's requests (> 0).
    pub weight: u32,
}

/// Where the LB publishes routes and where requests find their SGS.
pub trait RouteTable: Send + Sync {
    /// Replaces the routes of DAG `dag` (wire id); an empty slice removes it.
    fn publish(&self, dag: u32, routes: &[Route]);
    /// The SGS for a request of `dag`; `key` spreads requests over the routes
    /// in proportion to their weights (a counter, a connection id, a hash).
    fn lookup(&self, dag: u32, key: u64) -> Option<SgsIndex>;
    /// Which implementation is active, for logs and `gatictl info`.
    fn kind(&self) -> &'static str;
}

/// The userspace table: a map behind a read-write lock, with the SGSs' load
/// when it was given one.
#[derive(Debug, Default)]
pub struct UserRouteTable {
    routes: RwLock<HashMap<u32, Arc<[Route]>>>,
    load: Option<Arc<LoadBoard>>,
}

/// One SGS's load, as the kernel program reads it (`struct steer_load` in
/// `ebpf/steer.h`; `steer::layout` checks the two agree).
#[derive(Debug, Default)]
#[repr(C)]
pub struct SgsLoad {
    /// Requests held (queued or running, not yet answered).
    pub queued: AtomicU32,
    /// Idle warm workers.
    pub idle: AtomicU32,
}

/// Per-SGS load, written by each SGS's thread at the end of its turns and read
/// by the routing rule: on the heap, or in a BPF array map mapped into the
/// daemon (so the kernel program reads what the SGS wrote, with no syscall).
pub struct LoadBoard {
    base: NonNull<SgsLoad>,
    len: usize,
    _backing: Box<dyn Send + Sync>,
}

// SAFETY: the board only hands out `&SgsLoad` (atomics) into memory that
// `_backing` keeps alive and never moves; sharing atomics between threads is sound.
unsafe impl Send for LoadBoard {}
// SAFETY: as for Send: all access is through atomics.
unsafe impl Sync for LoadBoard {}

impl std::fmt::Debug for LoadBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries((0..self.len).map(|k| self.queued(k))).finish()
    }
}

impl LoadBoard {
    /// A board for `len` SGSs on the heap.
    pub fn heap(len: usize) -> Self {
        let slots: Box<[SgsLoad]> = (0..len).map(|_| SgsLoad::default()).collect();
        let base = NonNull::new(slots.as_ptr().cast_mut()).unwrap_or(NonNull::dangling());
        Self { base, len, _backing: Box::new(slots) }
    }

    /// A board over memory someone else owns (a mapped BPF array).
    ///
    /// # Safety
    /// `base` must point to `len` properly aligned, initialised `SgsLoad`s that
    /// stay mapped and in place for as long as `backing` lives, and that are only
    /// ever accessed atomically (by this process or the kernel).
    pub unsafe fn from_raw(base: NonNull<SgsLoad>, len: usize, backing: Box<dyn Send + Sync>) -> Self {
        Self { base, len, _backing: backing }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// SGS `sgs`'s slot (`None` past the board).
    pub fn get(&self, sgs: SgsIndex) -> Option<&SgsLoad> {
        // SAFETY: in bounds; `from_raw`'s contract (or the heap slice) keeps the
        // memory alive and initialised for as long as `self`.
        (sgs < self.len).then(|| unsafe { &*self.base.as_ptr().add(sgs) })
    }

    /// Requests SGS `sgs` holds (0 past the board).
    pub fn queued(&self, sgs: SgsIndex) -> u32 {
        self.get(sgs).map_or(0, |l| l.queued.load(Ordering::Relaxed))
    }

    /// Idle workers of SGS `sgs` (0 past the board).
    pub fn idle(&self, sgs: SgsIndex) -> u32 {
        self.get(sgs).map_or(0, |l| l.idle.load(Ordering::Relaxed))
    }

    /// Counts one more request routed to SGS `sgs` (until its next [`Self::set`]).
    pub fn bump(&self, sgs: SgsIndex) {
        if let Some(l) = self.get(sgs) {
            l.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes SGS `sgs`'s load (ignored past the board).
    pub fn set(&self, sgs: SgsIndex, queued: u32, idle: u32) {
        if let Some(l) = self.get(sgs) {
            l.queued.store(queued, Ordering::Relaxed);
            l.idle.store(idle, Ordering::Relaxed);
        }
    }
}

/// The routing rule (module docs): least `load` first, then weighted by `key`.
/// `ebpf/steer.bpf.c` computes exactly this in the kernel.
pub fn pick_least_loaded(routes: &[Route], key: u64, load: impl Fn(SgsIndex) -> u32) -> Option<SgsIndex> {
    let loads: Vec<u32> = routes.iter().map(|r| load(r.sgs)).collect();
    let least = *loads.iter().min()?;
    let best = || routes.iter().zip(&loads).filter(move |(_, &l)| l == least).map(|(r, _)| r);
    let total: u64 = best().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return best().next().map(|r| r.sgs);
    }
    let mut x = key % total;
    for r in best() {
        if x < u64::from(r.weight) {
            return Some(r.sgs);
        }
        x -= u64::from(r.weight);
    }
    None
}

/// Weighted pick: `key` modulo the total weight, walked over the routes.
pub fn pick(routes: &[Route], key: u64) -> Option<SgsIndex> {
    let total: u64 = routes.iter().map(|r| u64::from(r.weight)).sum();
    if total == 0 {
        return routes.first().map(|r| r.sgs);
    }
    let mut x = key % total;
    for r in routes {
        if x < u64::from(r.weight) {
            return Some(r.sgs);
        }
        x -= u64::from(r.weight);
    }
    None
}

impl UserRouteTable {
    /// A table that picks the least-loaded route by `load` (same rule as the kernel's).
    pub fn with_load(load: Arc<LoadBoard>) -> Self {
        Self { routes: RwLock::default(), load: Some(load) }
    }

    /// Every DAG's routes, by DAG id.
    pub fn snapshot(&self) -> Vec<(u32, Vec<Route>)> {
        let m = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(&d, r)| (d, r.to_vec())).collect();
        v.sort_by_key(|(d, _)| *d);
        v
    }

    /// Removes every route.
    pub fn clear(&self) {
        self.routes.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl RouteTable for UserRouteTable {
    fn publish(&self, dag: u32, routes: &[Route]) {
        let mut m = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.is_empty() {
            m.remove(&dag);
        } else {
            m.insert(dag, routes.into());
        }
    }

    fn lookup(&self, dag: u32, key: u64) -> Option<SgsIndex> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner()).get(&dag).cloned()?;
        match &self.load {
            Some(board) => {
                let s = pick_least_loaded(&routes, key, |s| board.queued(s))?;
                board.bump(s);
                Some(s)
            }
            None => pick(&routes, key),
        }
    }

    fn kind(&self) -> &'static str {
        "userspace"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_follows_weights() {
        let t = UserRouteTable::default();
        t.publish(7, &[Route { sgs: 0, weight: 1 }, Route { sgs: 3, weight: 3 }]);
        let picks: Vec<_> = (0..8).map(|k| t.lookup(7, k).unwrap()).collect();
        assert_eq!(picks, vec![0, 3, 3, 3, 0, 3, 3, 3]);
        assert_eq!(t.lookup(8, 0), None);
        t.publish(7, &[]);
        assert_eq!(t.lookup(7, 0), None);
    }

    #[test]
    fn least_loaded_first_then_weights() {
        let board = Arc::new(LoadBoard::heap(4));
        let t = UserRouteTable::with_load(Arc::clone(&board));
        let routes = [Route { sgs: 0, weight: 1 }, Route { sgs: 2, weight: 3 }, Route { sgs: 3, weight: 1 }];
        t.publish(1, &routes);
        // Each SGS publishes what it holds before every request (no burst).
        let picks = |t: &UserRouteTable, held: [u32; 4]| {
            (0..5)
                .map(|k| {
                    for (s, &q) in held.iter().enumerate() {
                        board.set(s, q, 0);
                    }
                    t.lookup(1, k).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(&t, [0; 4]), vec![0, 2, 2, 2, 3], "equal loads: weights");
        assert_eq!(picks(&t, [0, 0, 5, 0]), vec![0, 3, 0, 3, 0], "SGS 2 is busier: the others share by weight");
        assert_eq!(picks(&t, [1, 0, 5, 0]), vec![3; 5], "the least loaded alone");
        assert_eq!(board.queued(9), 0, "past the board reads 0");
        assert_eq!(pick_least_loaded(&[Route { sgs: 1, weight: 0 }], 7, |_| 0), Some(1), "zero weights: first");
        assert_eq!(pick_least_loaded(&[], 7, |_| 0), None);
    }

    #[test]
    fn a_burst_between_publishes_spreads_instead_of_herding() {
        let board = Arc::new(LoadBoard::heap(2));
        let t = UserRouteTable::with_load(Arc::clone(&board));
        t.publish(1, &[Route { sgs: 0, weight: 1 }, Route { sgs: 1, weight: 1 }]);
        // At the last publish SGS 0 held 3 and SGS 1 held 6; 11 requests come
        // before either publishes again: SGS 0 takes 3 until the two are level,
        // then they alternate (by weight) — not all 11 to SGS 0.
        board.set(0, 3, 0);
        board.set(1, 6, 0);
        let picks: Vec<_> = (0..11).map(|k| t.lookup(1, k).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&s| s == 0).count(), 7);
        assert_eq!(&picks[..3], &[0, 0, 0]);
        assert_eq!((board.queued(0), board.queued(1)), (10, 10), "each pick counted on its SGS");
        // The SGS's next publish replaces the count with what it holds.
        board.set(0, 1, 2);
        assert_eq!((board.queued(0), board.idle(0)), (1, 2));
    }
}
