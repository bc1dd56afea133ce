//! DAG graphs: adjacency, cycle detection, topological order and critical
//! paths, plus [`Dag`], a validated deployment the SGSs execute.
//!
//! The graph algorithms are shared with config validation, so what `gatid
//! check-config` accepts is what the scheduler can run.

use std::time::Duration;

use super::function::FnId;
use super::SchedError;

/// Directed graph over nodes `0..n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    pub succs: Vec<Vec<usize>>,
    pub preds: Vec<Vec<usize>>,
}

impl Graph {
    /// Builds the graph; duplicate edges are kept once, in first-seen order.
    pub fn new(n: usize, edges: &[(usize, usize)]) -> Self {
        let mut g = Self { succs: vec![Vec::new(); n], preds: vec![Vec::new(); n] };
        for &(a, b) in edges {
            if !g.succs[a].contains(&b) {
                g.succs[a].push(b);
                g.preds[b].push(a);
            }
        }
        g
    }

    pub fn len(&self) -> usize {
        self.succs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.succs.is_empty()
    }

    /// A cycle as a node sequence whose first and last node are the same.
    pub fn find_cycle(&self) -> Option<Vec<usize>> {
        // 0 = unvisited, 1 = on the DFS stack, 2 = done.
        let mut colour = vec![0u8; self.len()];
        let mut stack = Vec::new();
        for start in 0..self.len() {
            if colour[start] == 0 {
                if let Some(c) = self.dfs(start, &mut colour, &mut stack) {
                    return Some(c);
                }
            }
        }
        None
    }

    fn dfs(&self, v: usize, colour: &mut [u8], stack: &mut Vec<usize>) -> Option<Vec<usize>> {
        colour[v] = 1;
        stack.push(v);
        for &w in &self.succs[v] {
            if colour[w] == 1 {
                let from = stack.iter().position(|&x| x == w).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(w);
                return Some(cycle);
            }
            if colour[w] == 0 {
                if let Some(c) = self.dfs(w, colour, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        colour[v] = 2;
        None
    }

    /// Kahn's order; `None` if the graph has a cycle.
    pub fn topo_order(&self) -> Option<Vec<usize>> {
        let mut indeg: Vec<usize> = self.preds.iter().map(Vec::len).collect();
        let mut ready: Vec<usize> = (0..self.len()).filter(|&v| indeg[v] == 0).rev().collect();
        let mut order = Vec::with_capacity(self.len());
        while let Some(v) = ready.pop() {
            order.push(v);
            for &w in &self.succs[v] {
                indeg[w] -= 1;
                if indeg[w] == 0 {
                    ready.push(w);
                }
            }
        }
        (order.len() == self.len()).then_some(order)
    }

    pub fn sinks(&self) -> Vec<usize> {
        (0..self.len()).filter(|&v| self.succs[v].is_empty()).collect()
    }

    pub fn sources(&self) -> Vec<usize> {
        (0..self.len()).filter(|&v| self.preds[v].is_empty()).collect()
    }

    /// For every node, the longest path from it to a sink, its own cost included.
    pub fn remaining(&self, topo: &[usize], cost: impl Fn(usize) -> Duration) -> Vec<Duration> {
        let mut rem = vec![Duration::ZERO; self.len()];
        for &v in topo.iter().rev() {
            let tail = self.succs[v].iter().map(|&w| rem[w]).max().unwrap_or_default();
            rem[v] = cost(v) + tail;
        }
        rem
    }

    /// The longest source-to-sink path and its length.
    pub fn critical_path(&self, topo: &[usize], cost: impl Fn(usize) -> Duration) -> (Duration, Vec<usize>) {
        let rem = self.remaining(topo, cost);
        let Some(mut v) = (0..self.len()).max_by_key(|&v| rem[v]) else {
            return (Duration::ZERO, Vec::new());
        };
        let total = rem[v];
        let mut path = vec![v];
        while let Some(&w) = self.succs[v].iter().max_by_key(|&&w| rem[w]) {
            path.push(w);
            v = w;
        }
        (total, path)
    }
}

/// A deployed DAG: nodes are functions of the node-wide function table.
#[derive(Debug)]
pub struct Dag {
    pub name: String,
    /// Index in the deployment's DAG list (the LB and stats use it).
    pub index: usize,
    /// Wire id (the same FNV-1a-32 scheme as model ids).
    pub id: u32,
    pub deadline: Duration,
    /// Node `i` runs function `nodes[i]`.
    pub nodes: Vec<FnId>,
    pub graph: Graph,
    pub topo: Vec<usize>,
    pub sources: Vec<usize>,
    pub sink: usize,
    pub min_sgs: usize,
    pub max_sgs: usize,
}

impl Dag {
    /// Checks the shape (acyclic, one sink) and precomputes the order.
    pub fn new(
        name: &str,
        index: usize,
        deadline: Duration,
        nodes: Vec<FnId>,
        edges: &[(usize, usize)],
        sgs: (usize, usize),
    ) -> Result<Self, SchedError> {
        let bad = |why: String| SchedError::BadDag { dag: name.to_string(), why };
        if nodes.is_empty() {
            return Err(bad("no functions".into()));
        }
        let graph = Graph::new(nodes.len(), edges);
        let topo = graph.topo_order().ok_or_else(|| bad("has a cycle".into()))?;
        let sinks = graph.sinks();
        let [sink] = sinks[..] else {
            return Err(bad(format!("{} sinks; exactly one is needed", sinks.len())));
        };
        Ok(Self {
            name: name.to_string(),
            index,
            id: crate::id::model_id(name),
            deadline,
            sources: graph.sources(),
            nodes,
            graph,
            topo,
            sink,
            min_sgs: sgs.0.max(1),
            max_sgs: sgs.1.max(sgs.0).max(1),
        })
    }

    /// Remaining critical-path time from each node given per-function costs.
    pub fn remaining(&self, cost: impl Fn(FnId) -> Duration) -> Vec<Duration> {
        self.graph.remaining(&self.topo, |v| cost(self.nodes[v]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn diamond_order_and_critical_path() {
        // 0 → 1 → 3, 0 → 2 → 3
        let g = Graph::new(4, &[(0, 1), (0, 2), (1, 3), (2, 3), (0, 1)]);
        assert_eq!(g.succs[0], vec![1, 2], "duplicate edge kept once");
        let topo = g.topo_order().unwrap();
        assert_eq!(topo[0], 0);
        assert_eq!(topo[3], 3);
        let cost = [1, 5, 2, 3];
        let (len, path) = g.critical_path(&topo, |v| ms(cost[v]));
        assert_eq!(len, ms(9));
        assert_eq!(path, vec![0, 1, 3]);
        assert_eq!(g.remaining(&topo, |v| ms(cost[v]))[2], ms(5));
        assert_eq!((g.sources(), g.sinks()), (vec![0], vec![3]));
        assert!(g.find_cycle().is_none());
    }

    #[test]
    fn cycle_is_named() {
        let g = Graph::new(4, &[(0, 1), (1, 2), (2, 3), (3, 1)]);
        assert_eq!(g.find_cycle(), Some(vec![1, 2, 3, 1]));
        assert!(g.topo_order().is_none());
        let err = Dag::new("d", 0, ms(10), vec![0, 1, 2, 3], &[(0, 1), (1, 2), (2, 3), (3, 1)], (1, 1));
        assert!(err.is_err());
    }

    #[test]
    fn two_sinks_refused() {
        let e = Dag::new("d", 0, ms(10), vec![0, 1, 2], &[(0, 1), (0, 2)], (1, 1)).unwrap_err();
        assert!(e.to_string().contains("2 sinks"), "{e}");
    }
}
