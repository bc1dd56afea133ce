//! Where a model is cut into stages, and which nodes each stage runs.
//!
//! A cut is a tensor that alone carries everything later nodes need (a
//! separator of the graph). `auto` takes the stage ends a model declares in
//! its ONNX metadata (`gati.cuts`, comma-separated tensor names: e.g. the
//! EfficientNet converter names the end of each stage, where a structural rule
//! would also cut after every residual block inside one); without it, `auto`
//! picks the ends of top-level blocks: a separator that closes a region with a
//! branch (a residual block) or a pooling node, moved past trailing activations
//! so the cut is the block's output.

use std::collections::{HashMap, HashSet};

use super::onnx_graph::OnnxModel;

/// A stage: nodes to run, the tensor it reads and the tensors it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub input: String,
    pub outputs: Vec<String>,
    pub nodes: Vec<usize>,
}

/// Why a model cannot be cut as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CutError {
    #[error("model must have exactly one input, has {0:?}")]
    Inputs(Vec<String>),
    #[error("no tensor named `{0}` is produced by the graph")]
    UnknownTensor(String),
    #[error("cut `{0}` is listed out of graph order")]
    Order(String),
    #[error("cut `{cut}` does not separate the graph: node `{node}` needs `{tensor}` from before it")]
    NotSeparator { cut: String, node: String, tensor: String },
    #[error("cut `{0}` is a graph output; nothing would run after it")]
    IsOutput(String),
    #[error("model has no graph outputs")]
    NoOutputs,
}

const POOLS: &[&str] = &["MaxPool", "AveragePool"];
const ABSORBED: &[&str] =
    &["Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "BatchNormalization", "Identity", "HardSwish", "Dropout"];

/// Tensor bookkeeping shared by auto detection and stage planning.
struct Flow<'m> {
    model: &'m OnnxModel,
    input: &'m str,
    producer: HashMap<&'m str, usize>,
    constant: HashSet<&'m str>,
}

impl<'m> Flow<'m> {
    fn new(model: &'m OnnxModel) -> Result<Self, CutError> {
        let real = model.real_inputs();
        let [input] = real.as_slice() else {
            return Err(CutError::Inputs(real.iter().map(|s| s.to_string()).collect()));
        };
        let mut producer = HashMap::new();
        let mut constant: HashSet<&str> = model.initializers.iter().map(|i| i.name.as_str()).collect();
        constant.insert("");
        for (i, n) in model.nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            if n.inputs.iter().all(|t| constant.contains(t.as_str())) {
                constant.extend(n.outputs.iter().map(String::as_str));
            }
        }
        Ok(Self { model, input, producer, constant })
    }

    /// Node positions after which exactly one non-constant tensor is live and it
    /// is that node's output: (position, tensor).
    fn separators(&self) -> Vec<(usize, &'m str)> {
        let nodes = &self.model.nodes;
        let outputs: HashSet<&str> = self.model.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for t in &n.inputs {
                last_use.insert(t.as_str(), i);
            }
        }
        for o in &outputs {
            last_use.insert(o, usize::MAX);
        }
        let mut live: HashSet<&str> = HashSet::from([self.input]);
        let mut out = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for t in &n.outputs {
                if !self.constant.contains(t.as_str()) && last_use.get(t.as_str()).is_some_and(|&u| u > i) {
                    live.insert(t.as_str());
                }
            }
            live.retain(|t| last_use.get(t).is_some_and(|&u| u > i));
            if live.len() == 1 {
                let t = *live.iter().next().expect("len 1");
                if n.outputs.iter().any(|o| o == t) && !outputs.contains(t) {
                    out.push((i, t));
                }
            }
        }
        out
    }

    /// Whether the nodes in `(from, to]` branch: some tensor feeds two of them.
    fn has_branch(&self, from: Option<usize>, to: usize) -> bool {
        let start = from.map_or(0, |f| f + 1);
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &self.model.nodes[start..=to] {
            for t in n.inputs.iter().filter(|t| !self.constant.contains(t.as_str())) {
                *uses.entry(t.as_str()).or_default() += 1;
            }
        }
        uses.values().any(|&c| c > 1)
    }
}

/// ONNX metadata key under which a model declares its own `auto` cuts.
pub const CUTS_METADATA: &str = "gati.cuts";

/// The cuts `cuts = "auto"` uses: the model's declared stage ends (checked
/// like explicit cuts by [`plan_stages`]) or else the detected block ends.
pub fn auto_cuts(model: &OnnxModel) -> Result<Vec<String>, CutError> {
    if let Some(declared) = model.metadata(CUTS_METADATA) {
        return Ok(declared.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect());
    }
    let flow = Flow::new(model)?;
    let seps = flow.separators();
    let mut cuts: Vec<(usize, &str)> = Vec::new();
    let mut prev: Option<usize> = None;
    let mut k = 0;
    while k < seps.len() {
        let (pos, t) = seps[k];
        let op = model.nodes[pos].op_type.as_str();
        if flow.has_branch(prev, pos) || POOLS.contains(&op) {
            let mut end = (pos, t);
            while let Some(&(p2, t2)) = seps.get(k + 1) {
                if p2 == end.0 + 1 && ABSORBED.contains(&model.nodes[p2].op_type.as_str()) {
                    end = (p2, t2);
                    k += 1;
                } else {
                    break;
                }
            }
            cuts.push(end);
            prev = Some(end.0);
        }
        k += 1;
    }
    Ok(cuts.into_iter().map(|(_, t)| t.to_string()).collect())
}

/// Splits the model at `cuts` (tensor names in graph order) into stage plans.
pub fn plan_stages(model: &OnnxModel, cuts: &[String]) -> Result<Vec<StagePlan>, CutError> {
    let flow = Flow::new(model)?;
    let graph_outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
    if graph_outputs.is_empty() {
        return Err(CutError::NoOutputs);
    }
    let mut last_pos = None;
    for c in cuts {
        let &pos = flow.producer.get(c.as_str()).ok_or_else(|| CutError::UnknownTensor(c.clone()))?;
        if graph_outputs.contains(c) {
            return Err(CutError::IsOutput(c.clone()));
        }
        if last_pos.is_some_and(|p| pos <= p) {
            return Err(CutError::Order(c.clone()));
        }
        last_pos = Some(pos);
    }
    let mut stages = Vec::new();
    let mut input = flow.input.to_string();
    let ends = cuts.iter().map(|c| vec![c.clone()]).chain(std::iter::once(graph_outputs));
    for outputs in ends {
        let nodes = reach_back(&flow, &input, &outputs)?;
        stages.push(StagePlan { input: input.clone(), outputs: outputs.clone(), nodes });
        input = outputs[0].clone();
    }
    Ok(stages)
}

/// Nodes needed to compute `outputs` from `input` (plus constants), in graph order.
/// Any non-constant edge from before the cut other than `input` itself means the
/// cut does not separate the graph; the first such edge is reported.
fn reach_back(flow: &Flow<'_>, input: &str, outputs: &[String]) -> Result<Vec<usize>, CutError> {
    let cut_pos = flow.producer.get(input).copied();
    let leak = |node: &str, tensor: &str| CutError::NotSeparator {
        cut: input.to_string(),
        node: node.to_string(),
        tensor: tensor.to_string(),
    };
    let mut need: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let mut seen: HashSet<usize> = HashSet::new();
    while let Some(t) = need.pop() {
        if t == input || flow.constant.contains(t) {
            continue;
        }
        let Some(&p) = flow.producer.get(t) else { return Err(leak("", t)) };
        if !seen.insert(p) {
            continue;
        }
        let node = &flow.model.nodes[p];
        for i in node.inputs.iter().map(String::as_str) {
            if i == input || flow.constant.contains(i) {
                continue;
            }
            match flow.producer.get(i) {
                // Produced before (or by) the node that makes the cut: crosses the cut.
                Some(&q) if cut_pos.is_some_and(|c| q <= c) => return Err(leak(&node.name, i)),
                Some(_) => need.push(i),
                // A graph input other than this stage's input.
                None => return Err(leak(&node.name, i)),
            }
        }
    }
    let mut nodes: Vec<usize> = seen.into_iter().collect();
    nodes.sort_unstable();
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited protobuf field (tags < 16, lengths < 128 suffice here).
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    /// Found by fuzzing (fuzz/ `onnx`): a graph with a node and an input but no
    /// outputs made `plan_stages` index the empty output list.
    #[test]
    fn a_graph_without_outputs_is_an_error_not_a_panic() {
        let node = [field(1, b"x"), field(2, b"y"), field(4, b"Relu")].concat();
        let graph = [field(1, &node), field(11, &field(1, b"x"))].concat();
        let model = OnnxModel::decode(&field(7, &graph)).unwrap();
        assert_eq!(plan_stages(&model, &[]), Err(CutError::NoOutputs));
        assert_eq!(plan_stages(&model, &["y".into()]), Err(CutError::NoOutputs));
        assert!(auto_cuts(&model).is_ok());
    }

    /// A model that declares its stage ends in metadata gets those as `auto`
    /// cuts, not the structural ones (here: none, two plain Relus).
    #[test]
    fn declared_cuts_win_over_detection() {
        let relu = |i: &[u8], o: &[u8]| field(1, &[field(1, i), field(2, o), field(4, b"Relu")].concat());
        let out = field(12, &field(1, b"z"));
        let graph = [relu(b"x", b"y"), relu(b"y", b"z"), field(11, &field(1, b"x")), out].concat();
        let plain = OnnxModel::decode(&field(7, &graph)).unwrap();
        assert_eq!(auto_cuts(&plain).unwrap(), Vec::<String>::new());
        let meta = field(14, &[field(1, CUTS_METADATA.as_bytes()), field(2, b"y")].concat());
        let declared = OnnxModel::decode(&[meta, field(7, &graph)].concat()).unwrap();
        assert_eq!(declared.metadata(CUTS_METADATA).as_deref(), Some("y"));
        assert_eq!(auto_cuts(&declared).unwrap(), ["y"]);
        assert_eq!(plan_stages(&declared, &auto_cuts(&declared).unwrap()).unwrap().len(), 2);
    }
}
