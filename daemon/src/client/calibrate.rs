//! Calibration sets for `gatictl cache train`: image files the caches are
//! warm-started from, sent as calibration rows (`FLAG_CALIBRATE`).
//!
//! Accepted: IDX image files (`*-images-idx3-ubyte`, as Fashion-MNIST ships)
//! and raw u8 frames (`H×W×C` bytes each, HWC, the model's input size).

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Client, ClientError};
use crate::api::wire::Dtype;
use crate::api::wire::FLAG_CALIBRATE;

/// Images of one calibration set.
#[derive(Debug)]
pub struct CalibrationSet {
    /// Height, width, channels of every image.
    pub shape: [u32; 3],
    pub images: Vec<Vec<u8>>,
}

/// Reads `path`; `hwc` is the model's input size (for raw frames).
pub fn read(path: &Path, hwc: [u32; 3]) -> Result<CalibrationSet, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() >= 16 && bytes[..4] == [0, 0, 8, 3] {
        let dim = |i: usize| u32::from_be_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let (n, h, w) = (dim(1) as usize, dim(2), dim(3));
        let size = (h * w) as usize;
        if size == 0 || bytes.len() != 16 + n * size {
            return Err(format!("{}: IDX header says {n}×{h}×{w}, file has {} bytes", path.display(), bytes.len()));
        }
        return Ok(CalibrationSet {
            shape: [h, w, 1],
            images: bytes[16..].chunks_exact(size).map(<[u8]>::to_vec).collect(),
        });
    }
    let size = hwc.iter().product::<u32>() as usize;
    if size == 0 || bytes.is_empty() || bytes.len() % size != 0 {
        return Err(format!(
            "{}: neither an IDX image file nor raw {}×{}×{} u8 frames ({} bytes)",
            path.display(),
            hwc[0],
            hwc[1],
            hwc[2],
            bytes.len()
        ));
    }
    Ok(CalibrationSet { shape: hwc, images: bytes.chunks_exact(size).map(<[u8]>::to_vec).collect() })
}

/// Waits until `model`'s caches have been trained more than `after` times
/// (the `gati_cache_generation` gauge); `false` if `timeout` passed first.
pub fn wait_trained(client: &mut Client, model: &str, after: u64, timeout: Duration) -> Result<bool, ClientError> {
    let until = Instant::now() + timeout;
    loop {
        let text = client.stats_text()?;
        if crate::telemetry::summary::model_value(&text, crate::telemetry::names::CACHE_GENERATION, model)
            .unwrap_or(0.0)
            > after as f64
        {
            return Ok(true);
        }
        if Instant::now() > until {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `set` to `model` as calibration rows, `batch` images per request
/// (at most the model's `max_batch`: a request of more rows is refused);
/// calls `progress(sent)` after each request. Returns the rows sent.
pub fn send(
    client: &mut Client,
    model: &str,
    set: &CalibrationSet,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<usize, ClientError> {
    let info = client.control_json(crate::api::wire::Kind::ModelInfo, crate::id::model_id(model), &[])?;
    let max_batch = info["model"]["max_batch"].as_u64().map_or(batch, |m| m as usize);
    let mut sent = 0;
    for chunk in set.images.chunks(batch.min(max_batch).max(1)) {
        let shape = [chunk.len() as u32, set.shape[0], set.shape[1], set.shape[2]];
        let mut header = Client::infer_header(model, Dtype::U8, &shape, 0);
        header.flags.set(FLAG_CALIBRATE);
        client.call(header, &chunk.concat())?.ok()?;
        sent += chunk.len();
        progress(sent);
    }
    Ok(sent)
}
