//! The ready queue: function invocations whose inputs are complete, ordered by
//! least slack.
//!
//! slack = deadline − now − expected remaining critical-path time (the node's
//! own time included). `now` shifts every slack equally, so the queue is keyed
//! by the *latest start* = deadline − remaining, fixed when the node becomes
//! ready; the smallest latest start is the least slack.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::function::FnId;

/// One ready function invocation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The request's slot and generation in its SGS.
    pub req: (u32, u32),
    /// Node index in the request's DAG.
    pub node: usize,
    pub func: FnId,
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    latest_start: Instant,
    seq: u64,
    item: Ready,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.latest_start, self.seq).cmp(&(other.latest_start, other.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Latest start of a node: its request's deadline minus the remaining critical path.
pub fn latest_start(deadline: Instant, remaining: Duration) -> Instant {
    deadline.checked_sub(remaining).unwrap_or(deadline)
}

/// Slack at `now` of work that must start by `latest_start`, in signed nanoseconds.
pub fn slack_ns(latest_start: Instant, now: Instant) -> i64 {
    if latest_start >= now {
        i64::try_from((latest_start - now).as_nanos()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from((now - latest_start).as_nanos()).unwrap_or(i64::MAX)
    }
}

/// Ready invocations, least slack first; ties in arrival order.
#[derive(Debug, Default)]
pub struct ReadyQueue {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

impl ReadyQueue {
    pub fn push(&mut self, latest_start: Instant, item: Ready) {
        self.seq += 1;
        self.heap.push(Reverse(Entry { latest_start, seq: self.seq, item }));
    }

    /// The least-slack invocation whose function `runnable` accepts (e.g. has an
    /// idle worker); others stay queued in order.
    pub fn pop_runnable(&mut self, mut runnable: impl FnMut(FnId) -> bool) -> Option<(Instant, Ready)> {
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(Reverse(e)) = self.heap.pop() {
            if runnable(e.item.func) {
                found = Some((e.latest_start, e.item));
                break;
            }
            skipped.push(e);
        }
        self.heap.extend(skipped.into_iter().map(Reverse));
        found
    }

    /// Least-slack entry's latest start.
    pub fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.latest_start)
    }

    /// Every entry (latest start, invocation), in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (Instant, Ready)> + '_ {
        self.heap.iter().map(|Reverse(e)| (e.latest_start, e.item))
    }

    /// Ready invocations per function (for cold-start decisions).
    pub fn waiting_for(&self, func: FnId) -> usize {
        self.heap.iter().filter(|Reverse(e)| e.item.func == func).count()
    }

    /// Removes every entry of a request (answered early).
    pub fn remove_request(&mut self, req: (u32, u32)) {
        self.heap.retain(|Reverse(e)| e.item.req != req);
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(slot: u32, func: FnId) -> Ready {
        Ready { req: (slot, 0), node: 0, func }
    }

    #[test]
    fn least_slack_first_regardless_of_arrival() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = ReadyQueue::default();
        // deadline 50 ms, 10 ms of work left → latest start 40 ms
        q.push(latest_start(t0 + ms(50), ms(10)), item(1, 0));
        // deadline 30 ms, 25 ms left → 5 ms: the least slack although it came second
        q.push(latest_start(t0 + ms(30), ms(25)), item(2, 0));
        // deadline 100 ms, nothing much left → 99 ms
        q.push(latest_start(t0 + ms(100), ms(1)), item(3, 0));
        // same latest start as slot 2: arrival order breaks the tie
        q.push(latest_start(t0 + ms(10), ms(5)), item(4, 0));
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_runnable(|_| true)).map(|(_, r)| r.req.0).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
        assert_eq!(slack_ns(t0 + ms(5), t0 + ms(7)), -2_000_000);
        assert_eq!(slack_ns(t0 + ms(7), t0 + ms(5)), 2_000_000);
    }

    #[test]
    fn blocked_functions_are_skipped_but_kept_in_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = ReadyQueue::default();
        q.push(t0 + ms(1), item(1, 7));
        q.push(t0 + ms(2), item(2, 8));
        q.push(t0 + ms(3), item(3, 7));
        assert_eq!(q.waiting_for(7), 2);
        let (_, r) = q.pop_runnable(|f| f != 7).unwrap();
        assert_eq!(r.req.0, 2);
        assert!(q.pop_runnable(|f| f != 7).is_none());
        assert_eq!(q.len(), 2);
        q.remove_request((3, 0));
        assert_eq!(q.pop_runnable(|_| true).unwrap().1.req.0, 1);
        assert!(q.is_empty());
    }
}
