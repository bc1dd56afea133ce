//! The partial-allocation (PA) mechanism of Cole, Gkatzelis and Goel as
//! Themis uses it: allocate by maximising Nash social welfare over the bids
//! ([`nsw::solve`]), then give each winner only the fraction
//!
//!   c_i = Π_{j≠i} v_j(z) / Π_{j≠i} v_j(z_{−i})
//!
//! of its bundle, where z_{−i} is the best allocation without agent i: the
//! loss its presence costs the others. The withheld (1 − c_i) is the
//! leftover the arbiter hands to apps outside the auction.
//!
//! With an exact solver, c_i ∈ [0, 1] and an agent's utility c_i · v_i(z_i)
//! is Π_j v_j(z) over a term it cannot influence, so bidding its true values
//! is a best response (tests check both on exhaustive small cases). With the
//! greedy solver (large rounds) c_i is clamped into [0, 1].

use super::nsw::{self, Problem, Solution};

/// A winner: agent index, its option, and the fraction of it granted.
#[derive(Clone, Debug, PartialEq)]
pub struct Award {
    pub agent: usize,
    pub option: usize,
    pub fraction: f64,
}

/// The mechanism's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub solution: Solution,
    pub awards: Vec<Award>,
}

/// Runs the mechanism: the allocation, and fractions for every winner.
pub fn run(p: &Problem) -> Outcome {
    let solution = nsw::solve(p, None);
    let awards = solution
        .choice
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|option| Award { agent: i, option, fraction: fraction(p, &solution, i) }))
        .collect();
    Outcome { solution, awards }
}

/// c_i for agent `i` under `solution` (also defined for an agent that won nothing).
pub fn fraction(p: &Problem, solution: &Solution, i: usize) -> f64 {
    let others_with = solution.log_welfare - p.value(i, solution.choice[i]);
    let others_without = nsw::solve(p, Some(i)).log_welfare;
    (others_with - others_without).exp().clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auction::nsw::{solve_exact, Agent, Choice};

    /// A tiny deterministic generator (no dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random small problem: 2–3 agents, 1–2 nodes of 1–3 GPUs, options of 1–3 GPUs.
    fn random_problem(r: &mut Lcg) -> Problem {
        let nodes = 1 + r.below(2) as usize;
        let capacity: Vec<u32> = (0..nodes).map(|_| 1 + r.below(3) as u32).collect();
        let agents = (0..2 + r.below(2))
            .map(|_| {
                let base = -((1 + r.below(8)) as f64).ln();
                let options = (0..1 + r.below(3))
                    .map(|_| {
                        let node = r.below(nodes as u64) as usize;
                        let k = 1 + r.below(2) as u32;
                        let mut need = vec![(node, k)];
                        if nodes == 2 && r.below(3) == 0 {
                            need = vec![(0, 1), (1, k)];
                        }
                        let size = need.iter().map(|n| n.1).sum();
                        Choice { need, size, log_value: base + (1 + r.below(6)) as f64 * 0.3 }
                    })
                    .collect();
                Agent { base, options }
            })
            .collect();
        Problem { capacity, agents }
    }

    /// Agent `i`'s true utility c_i · v_i(z_i) when the mechanism runs on `reported`.
    fn utility(truth: &Problem, reported: &Problem, i: usize) -> f64 {
        let s = solve_exact(reported, None);
        let c = fraction(reported, &s, i);
        c * truth.value(i, s.choice[i]).exp()
    }

    #[test]
    fn fractions_lie_in_unit_interval() {
        let mut r = Lcg(1);
        for _ in 0..500 {
            let p = random_problem(&mut r);
            let s = solve_exact(&p, None);
            for i in 0..p.agents.len() {
                let c = fraction(&p, &s, i);
                // Unclamped value too: exactness makes the ratio ≤ 1 by itself.
                let raw = (s.log_welfare - p.value(i, s.choice[i]) - solve_exact(&p, Some(i)).log_welfare).exp();
                assert!((0.0..=1.0).contains(&c) && raw <= 1.0 + 1e-9, "c = {c}, raw = {raw}");
            }
        }
    }

    #[test]
    fn truthful_bidding_never_loses() {
        let mut r = Lcg(7);
        let mut checked = 0;
        for _ in 0..300 {
            let truth = random_problem(&mut r);
            for i in 0..truth.agents.len() {
                let honest = utility(&truth, &truth, i);
                // Every misreport on a grid: each option's value (and the base) moved.
                let grid = [-1.2, -0.6, -0.2, 0.2, 0.6, 1.2];
                let n_opts = truth.agents[i].options.len();
                let combos = grid.len().pow(n_opts as u32 + 1);
                for code in 0..combos {
                    let mut lie = truth.clone();
                    let mut c = code;
                    lie.agents[i].base += grid[c % grid.len()];
                    c /= grid.len();
                    for o in &mut lie.agents[i].options {
                        o.log_value += grid[c % grid.len()];
                        c /= grid.len();
                    }
                    let dishonest = utility(&truth, &lie, i);
                    assert!(dishonest <= honest + 1e-9, "agent {i} gains by lying: {dishonest} > {honest}\n{truth:?}");
                    checked += 1;
                }
                // Hiding options is a misreport too.
                let mut hide = truth.clone();
                hide.agents[i].options.clear();
                assert!(utility(&truth, &hide, i) <= honest + 1e-9);
            }
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[test]
    fn only_winners_get_awards() {
        let p = Problem {
            capacity: vec![1],
            agents: vec![
                Agent { base: -2.0, options: vec![Choice { need: vec![(0, 1)], size: 1, log_value: -0.1 }] },
                Agent { base: -0.5, options: vec![Choice { need: vec![(0, 1)], size: 1, log_value: -0.4 }] },
            ],
        };
        let out = run(&p);
        assert_eq!(out.awards.len(), 1);
        assert_eq!(out.awards[0].agent, 0);
        // Without agent 0, agent 1 would gain 0.1 in log value: c = e^{-0.1}.
        assert!((out.awards[0].fraction - (-0.1f64).exp()).abs() < 1e-9);
    }
}
