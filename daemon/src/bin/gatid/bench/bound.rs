//! An upper bound on the share of deadlines *any* scheduler could meet on a
//! trace, given the node's measured capacity — so the dispatch benchmark can
//! say how much of a miss is the scheduler's and how much the trace's.
//!
//! Fluid model: the node does `capacity` requests/s of the mix, i.e. serves
//! `capacity × mean cost` cost-units per second, where a request's cost is its
//! kind's solo latency (measured alone, one outstanding). Take any window
//! [a, b): the requests that arrive in it *and* whose deadline falls in it
//! must all be served inside it, so the ones met cannot cost more than the
//! window's service. Keeping the cheapest ones first maximises their number
//! (a knapsack with unit values), so at least the rest miss. Windows are the
//! bursts (start to end + the longest deadline), disjoint; requests outside
//! them are counted as met. Preemption, perfect knowledge and zero overheads
//! are all granted, so no real scheduler can beat the bound — only tie it.

use std::time::Duration;

use super::loadgen::Arrival;

/// The bound for `arrivals` (those at or after `from` count): the share that
/// could be met at most.
///
/// `cost[k]` and `deadline[k]` are per request kind; `service` is cost-units
/// served per second; bursts start every `period` and last `length`.
pub fn deadline_met_bound(
    arrivals: &[Arrival],
    from: Duration,
    cost: &[f64],
    deadline: &[Duration],
    service: f64,
    period: Duration,
    length: Duration,
) -> f64 {
    let counted: Vec<&Arrival> = arrivals.iter().filter(|a| a.at >= from).collect();
    if counted.is_empty() {
        return 1.0;
    }
    let longest = deadline.iter().copied().max().unwrap_or_default();
    let end = counted.iter().map(|a| a.at).max().unwrap_or_default();
    let mut missed = 0usize;
    let mut a = Duration::ZERO;
    while a <= end {
        let b = a + length + longest;
        let mut costs: Vec<f64> =
            counted.iter().filter(|r| r.at >= a && r.at + deadline[r.kind] <= b).map(|r| cost[r.kind]).collect();
        costs.sort_by(f64::total_cmp);
        let mut budget = service * (b - a).as_secs_f64();
        let fit = costs
            .iter()
            .take_while(|&&c| {
                budget -= c;
                budget >= 0.0
            })
            .count();
        missed += costs.len() - fit;
        a += period.max(length + longest);
    }
    1.0 - missed as f64 / counted.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, kind: usize) -> Arrival {
        Arrival { at: Duration::from_millis(ms), kind }
    }

    #[test]
    fn overload_in_a_window_drops_the_dearest_first() {
        // Window [0, 1.1 s): 1.1 s of service; 4 cheap (0.1) + 2 dear (0.5)
        // requests = 1.4 s of work: the cheap ones and one dear one fit, one dear one misses.
        let arrivals = [at(0, 0), at(10, 0), at(20, 1), at(30, 0), at(40, 1), at(50, 0)];
        let cost = [0.1, 0.5];
        let deadline = [Duration::from_millis(1000); 2];
        let b = deadline_met_bound(
            &arrivals,
            Duration::ZERO,
            &cost,
            &deadline,
            1.0,
            Duration::from_secs(5),
            Duration::from_millis(100),
        );
        assert!((b - 5.0 / 6.0).abs() < 1e-9, "{b}");
        // Twice the service: everything fits.
        let b2 = deadline_met_bound(
            &arrivals,
            Duration::ZERO,
            &cost,
            &deadline,
            2.0,
            Duration::from_secs(5),
            Duration::from_millis(100),
        );
        assert_eq!(b2, 1.0);
    }
}
