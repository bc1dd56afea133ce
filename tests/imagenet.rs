//! The shipped ImageNet model through the daemon: `configs/cpu.toml`'s
//! `imagenet` entry (EfficientNet-Lite2, cut after each stage) classifies the
//! 100 ai-benchmark photos against their eye-checked labels
//! (../shared/data/ai-benchmark-labels.tsv, as scripts/models/efficientnet_lite2.py
//! prepared them in data/imagenet/).

mod common;

use common::{config, root, tempdir, TestDaemon};
use gatid::api::wire::Dtype;

const SIZE: usize = 260;

/// cpu.toml's `imagenet` model table, its path made absolute, as TOML text.
fn shipped_imagenet_entry() -> String {
    let text = std::fs::read_to_string(root().join("configs/cpu.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let models = table["models"].as_array().unwrap();
    let mut m = models
        .iter()
        .find(|m| m.get("name").and_then(toml::Value::as_str) == Some("imagenet"))
        .expect("configs/cpu.toml has an `imagenet` model")
        .as_table()
        .unwrap()
        .clone();
    let path = root().join("configs").join(m["path"].as_str().unwrap());
    assert!(path.exists(), "{} missing: run scripts/setup.sh first", path.display());
    m.insert("path".into(), toml::Value::String(path.display().to_string()));
    let mut wrap = toml::Table::new();
    wrap.insert("models".into(), toml::Value::Array(vec![toml::Value::Table(m)]));
    toml::to_string(&wrap).unwrap()
}

/// The 100 prepared photos (260x260 RGB u8) and their ImageNet labels.
fn photos() -> (Vec<Vec<u8>>, Vec<usize>) {
    let dir = root().join("data/imagenet");
    let px = std::fs::read(dir.join("photos_260_rgb.u8"))
        .unwrap_or_else(|e| panic!("{}/photos_260_rgb.u8: {e}; run scripts/setup.sh first", dir.display()));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("photos.json")).unwrap()).unwrap();
    let labels: Vec<usize> = meta["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let images: Vec<Vec<u8>> = px.chunks_exact(SIZE * SIZE * 3).map(<[u8]>::to_vec).collect();
    assert_eq!((images.len(), labels.len()), (100, 100));
    (images, labels)
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::MIN), |b, (k, &x)| if x > b.1 { (k, x) } else { b }).0
}

#[test]
fn efficientnet_classifies_the_ai_benchmark_photos() {
    let dir = tempdir("imagenet");
    let d = TestDaemon::start(&dir, &config(&dir, "", &[shipped_imagenet_entry()]));
    let mut c = d.client();
    // Cut after each of the seven stages (the model declares them).
    let info = c.model_info("imagenet").unwrap();
    let stages: Vec<&str> =
        info["model"]["stages"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        ["stage1_out", "stage2_out", "stage3_out", "stage4_out", "stage5_out", "stage6_out", "stage7_out", "logits"]
    );
    let (images, labels) = photos();
    let mut correct = 0;
    let mut wrong = Vec::new();
    for (i, (img, &label)) in images.iter().zip(&labels).enumerate() {
        let r = c.infer("imagenet", Dtype::U8, &[SIZE as u32, SIZE as u32, 3], img, 0).unwrap().ok().unwrap();
        let v = r.floats();
        assert_eq!(v.len(), 1000);
        let got = argmax(&v);
        if got == label {
            correct += 1;
        } else {
            wrong.push((i, got, label));
        }
    }
    let stage_us: Vec<u64> = info["model"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cost_us_batch1"].as_f64().unwrap() as u64)
        .collect();
    eprintln!("imagenet: stage costs at load (µs, batch 1): {stage_us:?}");
    eprintln!("imagenet: {correct}/100 top-1 correct; wrong (photo, got, label): {wrong:?}");
    assert!(correct >= 90, "{correct}/100 top-1 correct (want >= 90); wrong: {wrong:?}");
}
