//! Shedding under overload: when the SGS's queue cannot all make its
//! deadlines on the cores it may use, answer the requests whose loss frees
//! the most core time now, instead of letting least-slack order run them
//! late one after another.
//!
//! This is Moore–Hodgson's rule (most deadlines met on one machine: schedule
//! by deadline; whenever a job would finish late, drop the longest scheduled
//! so far) played forward over the queue on `cores` servers. Times are each
//! function's quickest recent run, like the hopeless-request check: a
//! request is shed only if it cannot make it even then, so a burst of
//! outside CPU contention that inflates the averages does not shed work that
//! would have made it. It runs on arrivals, only when the queue holds more
//! leased invocations than there are leases. Measured with `gatid bench
//! dispatch --ablation`.

use std::time::{Duration, Instant};

use super::core::Core;
use super::slots::Key;
use crate::sched::request::DagResult;

/// At most this many requests are shed per arrival.
const MAX_SHED: usize = 16;

/// One queued invocation as the simulation sees it.
struct Job {
    latest_start: Instant,
    req: Key,
    /// Core time it holds a lease for.
    work: Duration,
    /// From its start to the end of its request's critical path.
    path: Duration,
    deadline: Instant,
}

impl Core {
    /// Sheds requests that cannot all be served in time (see the module doc).
    pub(super) fn shed(&mut self, now: Instant) {
        if !self.dep.policy.shed || !self.deadline_aware() {
            return;
        }
        let Some(cores) = self.leases.budget() else { return };
        let mut jobs: Vec<Job> = self
            .ready
            .entries()
            .filter(|(_, r)| self.leased(r.func))
            .filter_map(|(latest_start, r)| {
                let req = self.reqs.get(r.req)?;
                let work = self.est[r.func].best();
                Some(Job { latest_start, req: r.req, work, path: req.floor_from(r.node), deadline: req.deadline })
            })
            .collect();
        if jobs.len() <= cores {
            return;
        }
        jobs.sort_by_key(|j| j.latest_start);
        // When each lease frees: this SGS's running leased invocations, the rest now.
        let mut free: Vec<Instant> = self
            .workers
            .iter()
            .filter_map(|(_, w)| w.job.filter(|j| j.leased).map(|j| (j.started + self.est[w.func].best()).max(now)))
            .collect();
        free.truncate(cores);
        free.resize(cores, now);
        let mut shed = Vec::new();
        while shed.len() < MAX_SHED {
            let Some(late) = first_late(&jobs, &free) else { break };
            // The longest of the jobs up to the late one frees the most time.
            let Some(k) = (0..=late).max_by_key(|&k| jobs[k].work) else { break };
            shed.push(jobs.remove(k).req);
        }
        for key in shed {
            self.finish(key, DagResult::DeadlineMissed);
        }
    }
}

/// Plays `jobs` (latest-start order) onto the earliest free of `free` leases;
/// the index of the first that would finish its request late.
fn first_late(jobs: &[Job], free: &[Instant]) -> Option<usize> {
    let mut free = free.to_vec();
    for (i, j) in jobs.iter().enumerate() {
        let (slot, start) = free.iter().copied().enumerate().min_by_key(|&(_, t)| t)?;
        if start + j.path > j.deadline {
            return Some(i);
        }
        free[slot] = start + j.work;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_late_job_is_found_on_the_earliest_free_lease() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let job = |ls: u64, work: u64, deadline: u64| Job {
            latest_start: t0 + ms(ls),
            req: (0, 0),
            work: ms(work),
            path: ms(work),
            deadline: t0 + ms(deadline),
        };
        // Two leases: 8 and 8 in parallel, then 1 at 8 ms (deadline 10: fits),
        // then 5 at 8 ms on the other lease (deadline 12: late).
        let jobs = [job(0, 8, 10), job(1, 8, 10), job(2, 1, 10), job(3, 5, 12)];
        assert_eq!(first_late(&jobs, &[t0, t0]), Some(3));
        assert_eq!(first_late(&jobs[..3], &[t0, t0]), None);
        // One lease busy until 5 ms: the second job of 8 cannot finish by 10.
        assert_eq!(first_late(&jobs[..2], &[t0 + ms(5), t0]), Some(1));
    }
}
