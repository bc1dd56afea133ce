//! `onnx`: the ONNX graph reader and the cut/stage planner on hostile model files.
//!
//! Input: a model file's bytes. Properties: `OnnxModel::decode` never panics;
//! on whatever decodes, `auto_cuts` and `plan_stages` (auto cuts, no cuts, and
//! a cut at each node's first output) never panic, and a plan they accept only
//! names nodes that exist, each stage's nodes in graph order. Every accepted
//! stage re-encodes (`encode_subgraph`) and the result decodes again.

#![no_main]

use gatid::infer::cuts::{auto_cuts, plan_stages};
use gatid::infer::onnx_graph::OnnxModel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = OnnxModel::decode(data) else { return };
    let _ = model.real_inputs();
    let mut tries: Vec<Vec<String>> = vec![Vec::new()];
    if let Ok(cuts) = auto_cuts(&model) {
        tries.push(cuts);
    }
    // A few explicit cuts: each of the first nodes' first output, alone (bounded).
    for n in model.nodes.iter().take(4) {
        if let Some(o) = n.outputs.first() {
            tries.push(vec![o.clone()]);
        }
    }
    for cuts in &tries {
        let Ok(stages) = plan_stages(&model, cuts) else { continue };
        assert_eq!(stages.len(), cuts.len() + 1, "one stage per cut plus the last");
        for s in &stages {
            assert!(s.nodes.windows(2).all(|w| w[0] < w[1]), "stage nodes in graph order");
            assert!(s.nodes.iter().all(|&i| i < model.nodes.len()), "stage names a node that exists");
            let outputs: Vec<&str> = s.outputs.iter().map(String::as_str).collect();
            if s.nodes.is_empty() {
                continue;
            }
            let bytes = model.encode_subgraph(&s.nodes, &[s.input.as_str()], &outputs);
            let back = OnnxModel::decode(&bytes).expect("an encoded stage decodes");
            assert_eq!(back.nodes.len(), s.nodes.len(), "the stage keeps its nodes");
        }
    }
});
