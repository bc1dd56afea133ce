//! The soak's valid inputs and their known answers: the CIFAR-10 sample PNGs
//! (decoded for Infer, raw for the DAG) and Fashion-MNIST test images, each
//! with the full model's top-1 asked of the daemon before the load
//! (calibration requests for the cached model: whole model, no cache).

use std::path::Path;

use anyhow::{bail, Context};

use super::traffic::{argmax, dag_class, DAG};
use crate::bench::harness::Daemon;
use gatid::api::server::FLAG_CALIBRATE;
use gatid::api::wire::{Dtype, Kind};
use gatid::client::Client;

/// One CIFAR-10 image: RGB HWC pixels, the PNG file, the full model's class.
pub(crate) struct CifarImage {
    pub pixels: Vec<u8>,
    pub png: Vec<u8>,
    pub class: usize,
}

/// Every input the valid clients send, with its expected answer.
pub(crate) struct Inputs {
    pub cifar: Vec<CifarImage>,
    /// 28×28 gray pixels and the full model's class.
    pub fmnist: Vec<(Vec<u8>, usize)>,
    /// Stages of the fmnist model: an answer with a lower `exit_stage` came from a cache.
    pub fmnist_stages: u16,
    /// The fmnist caches were trained once before the load started.
    pub trained_before_load: bool,
}

/// Longest wait for the first cache training before the load.
const TRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) const CIFAR_SHAPE: [u32; 3] = [32, 32, 3];
pub(crate) const FMNIST_SHAPE: [u32; 3] = [28, 28, 1];

fn cifar_pngs(root: &Path) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let dir = root.join("data/cifar10");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: run scripts/setup.sh", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no PNGs in {}", dir.display());
    files
        .iter()
        .map(|p| {
            let png = std::fs::read(p)?;
            let img = image::load_from_memory(&png).with_context(|| p.display().to_string())?.to_rgb8();
            anyhow::ensure!(img.dimensions() == (32, 32), "{} is not 32×32", p.display());
            Ok((img.into_raw(), png))
        })
        .collect()
}

fn fmnist_images(root: &Path, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = root.join("data/fashion-mnist/t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&path).with_context(|| format!("{}: run scripts/setup.sh", path.display()))?;
    let n = n.min(bytes.len().saturating_sub(16) / 784);
    anyhow::ensure!(n > 0, "{} holds no images", path.display());
    Ok((0..n).map(|i| bytes[16 + i * 784..16 + (i + 1) * 784].to_vec()).collect())
}

/// Loads the inputs and asks the daemon for each one's full-model answer.
pub(crate) fn load(root: &Path, daemon: &Daemon, quick: bool) -> anyhow::Result<Inputs> {
    let mut c = daemon.client()?;
    let mut cifar = Vec::new();
    for (k, (pixels, png)) in cifar_pngs(root)?.into_iter().enumerate() {
        let r = c.infer("cifar10", Dtype::U8, &CIFAR_SHAPE, &pixels, 0)?.ok()?;
        let class = argmax(&r.floats());
        let d = c.invoke_dag(DAG, &png, super::DAG_DEADLINE_US)?.ok()?;
        match dag_class(&d.payload) {
            Some(dc) if dc == class => {}
            other => bail!("image {k}: the `{DAG}` DAG answers class {other:?}, Infer on its pixels {class}"),
        }
        cifar.push(CifarImage { pixels, png, class });
    }
    let stages = c.model_info("fmnist")?["model"]["stages"].as_array().map_or(0, Vec::len) as u16;
    anyhow::ensure!(stages > 0, "fmnist reports no stages");
    let mut fmnist = Vec::new();
    for img in fmnist_images(root, if quick { 1000 } else { 2000 })? {
        let mut h = Client::infer_header("fmnist", Dtype::U8, &FMNIST_SHAPE, 0);
        h.flags.set(FLAG_CALIBRATE);
        let r = c.call(h, &img)?.ok()?;
        anyhow::ensure!(r.exit_stage == stages, "a calibration answer came from stage {} of {stages}", r.exit_stage);
        let class = argmax(&r.floats());
        fmnist.push((img, class));
    }
    // The calibration rows filled the cache's window: let its first training
    // finish before the load (the trainer is paced to a small share; under the load a round takes long).
    let trained = gatid::client::calibrate::wait_trained(&mut c, "fmnist", 0, TRAIN_WAIT)?;
    Ok(Inputs { cifar, fmnist, fmnist_stages: stages, trained_before_load: trained })
}

/// Runs each model once at every batch size from 1 to its `max_batch` (one
/// request of k rows each), before RSS is first measured. The working set of
/// a model is reached only when its largest batches have run: ORT's arena and
/// per-shape plans grow to the biggest batch seen, and under load batches grow
/// up to `max_batch`. Without this, the first burst of contention during the
/// load (queues fill, batches grow) raised RSS "after warm-up" in steps.
pub(crate) fn every_batch_size(daemon: &Daemon, inputs: &Inputs) -> anyhow::Result<()> {
    let mut c = daemon.client()?;
    let fmnist: Vec<&[u8]> = inputs.fmnist.iter().map(|(p, _)| p.as_slice()).collect();
    let cifar: Vec<&[u8]> = inputs.cifar.iter().map(|i| i.pixels.as_slice()).collect();
    for (model, shape, rows) in [("cifar10", CIFAR_SHAPE, &cifar), ("fmnist", FMNIST_SHAPE, &fmnist)] {
        let info = c.control_json(Kind::ModelInfo, gatid::id::model_id(model), &[])?;
        let max_batch = info["model"]["max_batch"].as_u64().context("ModelInfo has no max_batch")? as usize;
        for k in 1..=max_batch {
            let payload: Vec<u8> = (0..k).flat_map(|j| rows[j % rows.len()].iter().copied()).collect();
            let r = c.infer(model, Dtype::U8, &[k as u32, shape[0], shape[1], shape[2]], &payload, 0)?.ok()?;
            anyhow::ensure!(r.floats().len() == k * 10, "{model}: {k} rows answered with {} floats", r.floats().len());
        }
    }
    Ok(())
}

/// After the load: a new connection is served right and Health says ok.
pub(crate) fn still_serving(daemon: &Daemon, inputs: &Inputs) -> Result<(), String> {
    let check = || -> anyhow::Result<()> {
        let mut c = daemon.client()?;
        c.ping()?;
        let img = &inputs.cifar[0];
        let r = c.infer("cifar10", Dtype::U8, &CIFAR_SHAPE, &img.pixels, 0)?.ok()?;
        anyhow::ensure!(argmax(&r.floats()) == img.class, "wrong class after the load");
        let health = c.control_json(Kind::Health, 0, &[])?;
        anyhow::ensure!(health["status"] == "ok", "health after the load: {health}");
        Ok(())
    };
    check().map_err(|e| format!("{e:#}"))
}
