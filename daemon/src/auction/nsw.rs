//! The allocation step of the auction: pick at most one bid option per agent,
//! within the offered GPUs of each node, maximising Nash social welfare
//! Π v_i (here Σ log v_i, with v = 1/ρ).
//!
//! Small problems (≤ [`EXACT_LIMIT`] combinations) are solved exactly by
//! branch and bound; larger ones by a lazy greedy that repeatedly applies the
//! upgrade with the best welfare gain per extra GPU that still fits.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Largest search space (Π (options + 1)) solved exactly.
pub const EXACT_LIMIT: f64 = 200_000.0;

/// One bid option in solver form.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// `(node index, GPUs)`; node indices into [`Problem::capacity`].
    pub need: Vec<(usize, u32)>,
    pub size: u32,
    /// ln v = −ln ρ with this option.
    pub log_value: f64,
}

/// One agent: its value with nothing and its options.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    pub base: f64,
    pub options: Vec<Choice>,
}

/// An allocation problem: free GPUs per node and the agents' bids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Problem {
    pub capacity: Vec<u32>,
    pub agents: Vec<Agent>,
}

/// An allocation: each agent's option (or none) and Σ log v over the agents counted.
#[derive(Clone, Debug, PartialEq)]
pub struct Solution {
    pub choice: Vec<Option<usize>>,
    pub log_welfare: f64,
}

impl Problem {
    /// ln v of agent `i` under `choice`.
    pub fn value(&self, i: usize, choice: Option<usize>) -> f64 {
        match choice {
            Some(j) => self.agents[i].options[j].log_value,
            None => self.agents[i].base,
        }
    }

    fn search_space(&self, skip: Option<usize>) -> f64 {
        self.agents
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, a)| (a.options.len() + 1) as f64)
            .product()
    }
}

/// The welfare-maximising allocation, leaving agent `skip` out (it gets
/// nothing and its value is not counted); exact when small, greedy otherwise.
pub fn solve(p: &Problem, skip: Option<usize>) -> Solution {
    if p.search_space(skip) <= EXACT_LIMIT {
        solve_exact(p, skip)
    } else {
        solve_greedy(p, skip)
    }
}

fn fits(cap: &[u32], need: &[(usize, u32)]) -> bool {
    need.iter().all(|&(n, k)| cap[n] >= k)
}

fn apply(cap: &mut [u32], need: &[(usize, u32)], take: bool) {
    for &(n, k) in need {
        if take {
            cap[n] -= k;
        } else {
            cap[n] += k;
        }
    }
}

fn total(p: &Problem, choice: &[Option<usize>], skip: Option<usize>) -> f64 {
    (0..p.agents.len()).filter(|&i| Some(i) != skip).map(|i| p.value(i, choice[i])).sum()
}

/// Exhaustive branch and bound (ties: the first found, options in bid order).
pub fn solve_exact(p: &Problem, skip: Option<usize>) -> Solution {
    let n = p.agents.len();
    let best_of = |i: usize| p.agents[i].options.iter().map(|o| o.log_value).fold(p.agents[i].base, f64::max);
    let mut bound_from = vec![0.0; n + 1];
    for i in (0..n).rev() {
        bound_from[i] = bound_from[i + 1] + if Some(i) == skip { 0.0 } else { best_of(i) };
    }
    struct Dfs<'a> {
        p: &'a Problem,
        skip: Option<usize>,
        bound_from: Vec<f64>,
        cap: Vec<u32>,
        cur: Vec<Option<usize>>,
        best: Option<(f64, Vec<Option<usize>>)>,
    }
    impl Dfs<'_> {
        fn go(&mut self, i: usize, acc: f64) {
            if let Some((b, _)) = &self.best {
                if acc + self.bound_from[i] <= *b + 1e-12 {
                    return;
                }
            }
            if i == self.p.agents.len() {
                self.best = Some((acc, self.cur.clone()));
                return;
            }
            if Some(i) == self.skip {
                self.cur[i] = None;
                return self.go(i + 1, acc);
            }
            for j in 0..self.p.agents[i].options.len() {
                let need = &self.p.agents[i].options[j].need;
                if fits(&self.cap, need) {
                    apply(&mut self.cap, need, true);
                    self.cur[i] = Some(j);
                    self.go(i + 1, acc + self.p.agents[i].options[j].log_value);
                    apply(&mut self.cap, &self.p.agents[i].options[j].need, false);
                }
            }
            self.cur[i] = None;
            self.go(i + 1, acc + self.p.agents[i].base);
        }
    }
    let mut d = Dfs { p, skip, bound_from, cap: p.capacity.clone(), cur: vec![None; n], best: None };
    d.go(0, 0.0);
    let (log_welfare, choice) = d.best.unwrap_or((0.0, vec![None; n]));
    Solution { choice, log_welfare }
}

/// A candidate upgrade in the greedy's heap.
struct Upgrade {
    gain_per_gpu: f64,
    agent: usize,
    option: usize,
    version: u32,
}

impl PartialEq for Upgrade {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Upgrade {}
impl PartialOrd for Upgrade {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Upgrade {
    fn cmp(&self, o: &Self) -> Ordering {
        // Max-heap on gain; ties to the lower agent index, then option.
        self.gain_per_gpu.total_cmp(&o.gain_per_gpu).then(o.agent.cmp(&self.agent)).then(o.option.cmp(&self.option))
    }
}

/// Lazy greedy: start from nothing; repeatedly apply the feasible upgrade
/// (an option worth more than the agent's current one) with the largest
/// welfare gain per extra GPU (an upgrade that needs no more GPUs first).
pub fn solve_greedy(p: &Problem, skip: Option<usize>) -> Solution {
    let n = p.agents.len();
    let mut cap = p.capacity.clone();
    let mut choice: Vec<Option<usize>> = vec![None; n];
    let mut version = vec![0u32; n];
    let mut heap = BinaryHeap::new();
    let best_upgrade = |i: usize, cur: Option<usize>, cap: &mut Vec<u32>| -> Option<(f64, usize)> {
        let (cur_v, cur_size) = (p.value(i, cur), cur.map_or(0, |j| p.agents[i].options[j].size));
        if let Some(j) = cur {
            apply(cap, &p.agents[i].options[j].need, false);
        }
        let mut best: Option<(f64, usize)> = None;
        for (j, o) in p.agents[i].options.iter().enumerate() {
            if o.log_value <= cur_v || Some(j) == cur || !fits(cap, &o.need) {
                continue;
            }
            let extra = o.size.saturating_sub(cur_size);
            let g = if extra == 0 { f64::INFINITY } else { (o.log_value - cur_v) / f64::from(extra) };
            if best.is_none_or(|(bg, _)| g > bg) {
                best = Some((g, j));
            }
        }
        if let Some(j) = cur {
            apply(cap, &p.agents[i].options[j].need, true);
        }
        best
    };
    for i in (0..n).filter(|&i| Some(i) != skip) {
        if let Some((g, j)) = best_upgrade(i, None, &mut cap) {
            heap.push(Upgrade { gain_per_gpu: g, agent: i, option: j, version: 0 });
        }
    }
    while let Some(u) = heap.pop() {
        let i = u.agent;
        if u.version != version[i] {
            continue;
        }
        let cur = choice[i];
        if let Some(j) = cur {
            apply(&mut cap, &p.agents[i].options[j].need, false);
        }
        let need = &p.agents[i].options[u.option].need;
        if fits(&cap, need) {
            apply(&mut cap, need, true);
            choice[i] = Some(u.option);
        } else if let Some(j) = cur {
            apply(&mut cap, &p.agents[i].options[j].need, true);
        }
        version[i] += 1;
        if let Some((g, j)) = best_upgrade(i, choice[i], &mut cap) {
            heap.push(Upgrade { gain_per_gpu: g, agent: i, option: j, version: version[i] });
        }
    }
    let log_welfare = total(p, &choice, skip);
    Solution { choice, log_welfare }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(node: usize, k: u32, v: f64) -> Choice {
        Choice { need: vec![(node, k)], size: k, log_value: v }
    }

    #[test]
    fn exact_finds_the_product_optimum() {
        // Two agents, 2 GPUs: giving both to one (ln 3) loses to one each (ln 2 + ln 2).
        let p = Problem {
            capacity: vec![2],
            agents: vec![
                Agent { base: 0.0, options: vec![opt(0, 1, 2f64.ln()), opt(0, 2, 3f64.ln())] },
                Agent { base: 0.0, options: vec![opt(0, 1, 2f64.ln()), opt(0, 2, 3f64.ln())] },
            ],
        };
        let s = solve_exact(&p, None);
        assert_eq!(s.choice, vec![Some(0), Some(0)]);
        assert!((s.log_welfare - 4f64.ln()).abs() < 1e-9);
        let g = solve_greedy(&p, None);
        assert!((g.log_welfare - s.log_welfare).abs() < 1e-9);
        let without = solve_exact(&p, Some(0));
        assert_eq!(without.choice, vec![None, Some(1)]);
    }

    #[test]
    fn greedy_respects_capacity() {
        let agents = (0..50)
            .map(|i| Agent {
                base: -1.0,
                options: vec![opt(i % 3, 1, -0.5), opt(i % 3, 2, -0.2), opt((i + 1) % 3, 4, -0.1)],
            })
            .collect();
        let p = Problem { capacity: vec![4, 4, 4], agents };
        let s = solve(&p, None);
        let mut used = [0u32; 3];
        for (i, c) in s.choice.iter().enumerate() {
            if let Some(j) = c {
                for &(n, k) in &p.agents[i].options[*j].need {
                    used[n] += k;
                }
            }
        }
        assert!(used.iter().all(|&u| u <= 4), "{used:?}");
        assert_eq!(used.iter().sum::<u32>(), 12);
    }
}
