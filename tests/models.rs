//! Model loading in-process: cutting at named tensors, auto cuts, staged ==
//! whole model, and errors for cuts that do not separate the graph.

mod common;

use common::*;
use gatid::config::{Cuts, InputConfig, Layout, ModelConfig, OutputKind, Resize};
use gatid::infer::cuts::{auto_cuts, plan_stages, CutError};
use gatid::infer::model::probe_input;
use gatid::infer::onnx_graph::OnnxModel;
use gatid::infer::{InferError, LoadedModel};

fn fmnist_cfg(cuts: Cuts) -> ModelConfig {
    ModelConfig {
        name: "fmnist".into(),
        path: model_path("fmnist_resnet.onnx"),
        cuts,
        max_queue_rows: None,
        input: InputConfig {
            layout: Layout::NCHW,
            height: 28,
            width: 28,
            channels: 1,
            scale: 1.0,
            mean: vec![],
            std: vec![],
            resize: Resize::Bilinear,
        },
        output: OutputKind::Logits,
        labels: vec![],
        max_batch: 8,
        max_queue_delay_us: 0,
        intra_threads: 1,
        cache: None,
        backend: Default::default(),
        device: 0,
        fallback: Default::default(),
    }
}

#[test]
fn auto_cuts_find_block_ends() {
    let fm = OnnxModel::decode(&std::fs::read(model_path("fmnist_resnet.onnx")).unwrap()).unwrap();
    assert_eq!(
        auto_cuts(&fm).unwrap(),
        ["block1_out", "block2_out", "block3_out", "block4_out", "block5_out", "block6_out"]
    );
    let cf = OnnxModel::decode(&std::fs::read(model_path("cifar10_cnn.onnx")).unwrap()).unwrap();
    assert_eq!(auto_cuts(&cf).unwrap(), ["pool1_out", "pool2_out", "pool3_out"]);
}

#[test]
fn staged_equals_whole_model_for_every_cut_choice() {
    ort_env();
    let whole = |rows: usize| {
        let x = probe_input(rows, &[1, 28, 28]);
        (x.clone(), ort_direct(&model_path("fmnist_resnet.onnx"), &[rows, 1, 28, 28], &x))
    };
    for cuts in [
        Cuts::Mode("none".into()),
        Cuts::Mode("auto".into()),
        Cuts::Tensors(vec!["block2_out".into(), "block5_out".into()]),
    ] {
        let mut m = LoadedModel::load(&fmnist_cfg(cuts.clone())).unwrap();
        let (x, want) = whole(3);
        let got = m.pipeline.run(&[3, 1, 28, 28], &x).unwrap();
        assert_eq!(got.data.len(), want.len());
        let diff = got.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{cuts:?}: max diff {diff}");
        let n = match &cuts {
            Cuts::Mode(m) if m == "none" => 1,
            Cuts::Mode(_) => 7,
            Cuts::Tensors(t) => t.len() + 1,
        };
        assert_eq!(got.stage_times.len(), n);
        assert!(m.cost.stages.iter().all(|s| s.predict(1).as_nanos() > 0), "stage costs measured");
    }
}

#[test]
fn bad_cuts_are_refused_with_a_reason() {
    let fm = OnnxModel::decode(&std::fs::read(model_path("fmnist_resnet.onnx")).unwrap()).unwrap();
    // A tensor inside a residual block: the skip connection crosses it.
    let inner = "block1_conv1_out".to_string();
    assert!(fm.nodes.iter().any(|n| n.outputs[0] == inner));
    match plan_stages(&fm, std::slice::from_ref(&inner)) {
        Err(CutError::NotSeparator { tensor, .. }) => assert_eq!(tensor, "stem_out", "the skip edge"),
        other => panic!("cut inside a block accepted: {other:?}"),
    }
    assert!(matches!(plan_stages(&fm, &["nope".into()]), Err(CutError::UnknownTensor(_))));
    assert!(matches!(plan_stages(&fm, &["block3_out".into(), "block1_out".into()]), Err(CutError::Order(_))));
    ort_env();
    let err = LoadedModel::load(&fmnist_cfg(Cuts::Tensors(vec!["nope".into()]))).err().unwrap();
    assert!(matches!(err, InferError::Cut(_)));
    // A config whose input does not match the model.
    let mut cfg = fmnist_cfg(Cuts::Mode("auto".into()));
    cfg.input.height = 32;
    assert!(matches!(LoadedModel::load(&cfg), Err(InferError::Shape(_))));
}
