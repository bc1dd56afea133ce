//! The request streams of `gatid bench caches`: which frames each stream
//! requests, in what order, which part is reported as which start (cold /
//! warm / steady), and which frames warm-start the caches first.
//!
//! CIFAR-10 / Fashion-MNIST streams come from `data/video/` and
//! `data/workloads/`; the ImageNet ones from `data/imagenet/`
//! (scripts/workloads/imagenet_streams.py), mapped rather than read, since the
//! recurring-objects frames are 1.2 GB.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context};

/// Frames a stream requests: owned images or a mapped raw `u8` file.
pub(super) enum Frames {
    Owned(Vec<Vec<u8>>),
    Mapped { map: memmap2::Mmap, frame: usize },
}

impl Frames {
    fn mapped(path: &Path, frame: usize) -> anyhow::Result<Self> {
        let f = std::fs::File::open(path)
            .with_context(|| format!("{} missing: run scripts/setup.sh (workloads)", path.display()))?;
        // SAFETY: a read-only private mapping of a data file nothing in this
        // process writes; set-up replaces these files only by rename.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        if map.is_empty() || map.len() % frame != 0 {
            bail!("{}: {} bytes is not a whole number of {frame}-byte frames", path.display(), map.len());
        }
        Ok(Self::Mapped { map, frame })
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Owned(v) => v.len(),
            Self::Mapped { map, frame } => map.len() / frame,
        }
    }

    pub fn get(&self, i: usize) -> &[u8] {
        match self {
            Self::Owned(v) => &v[i],
            Self::Mapped { map, frame } => &map[i * frame..(i + 1) * frame],
        }
    }
}

/// One request stream, as measured.
pub(super) struct Workload {
    /// Stream name (`video`, `fmnist_local`, `recurring`, `vtest`, ...).
    pub name: &'static str,
    pub model: &'static str,
    pub shape: [u32; 3],
    pub frames: Frames,
    /// Frame index of each measured request, in order.
    pub order: Vec<u32>,
    /// Frames sent as calibration rows + `cache train` before measuring (warm start).
    pub warm: Vec<u32>,
    /// Reported parts of the measured requests: (start, request range).
    pub segments: Vec<(&'static str, Range<usize>)>,
}

impl Workload {
    /// The image of measured request `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        self.frames.get(self.order[i] as usize)
    }

    pub fn requests(&self) -> usize {
        self.order.len()
    }
}

const IMAGENET_FRAME: usize = 260 * 260 * 3;
const IMAGENET_SHAPE: [u32; 3] = [260, 260, 3];

/// Every stream name `--only` accepts.
pub(super) const NAMES: &[&str] = &[
    "video",
    "fmnist_local",
    "fmnist_shuffled",
    "recurring",
    "recurring_shuffled",
    "vtest",
    "vtest_warm",
    "megamind_bugy",
    "megamind_bugy_warm",
];

/// The streams (or only the one called `only`). `quick`: shorter ones, and of
/// the ImageNet streams only 300 steady recurring-objects frames after a warm
/// start on 700 warm-up frames.
pub(super) fn load(root: &Path, quick: bool, only: Option<&str>) -> anyhow::Result<Vec<Workload>> {
    if let Some(o) = only.filter(|o| !NAMES.contains(o)) {
        bail!("no workload called `{o}` ({})", NAMES.join(", "));
    }
    let wanted = |n: &str| only.is_none_or(|o| o == n);
    let mut all = Vec::new();
    if wanted("video") {
        let frames = std::fs::read(root.join("data/video/vtest_32x32_rgb.u8"))
            .context("data/video missing: run scripts/setup.sh")?;
        let frames: Vec<Vec<u8>> = frames.chunks_exact(32 * 32 * 3).map(<[u8]>::to_vec).collect();
        let n = if quick { frames.len() } else { 3 * frames.len() };
        let order = (0..n).map(|i| (i % frames.len()) as u32).collect();
        all.push(cold("video", "cifar10", [32, 32, 3], Frames::Owned(frames), order));
    }
    if wanted("fmnist_local") || wanted("fmnist_shuffled") {
        let idx = std::fs::read(root.join("data/fashion-mnist/t10k-images-idx3-ubyte"))
            .context("data/fashion-mnist missing")?;
        let images: Vec<Vec<u8>> = idx[16..].chunks_exact(784).map(<[u8]>::to_vec).collect();
        let n = if quick { 2000 } else { 10_000 };
        for (name, file) in
            [("fmnist_local", "fmnist_local_p0.9_seed1.idx"), ("fmnist_shuffled", "fmnist_shuffled_seed1.idx")]
        {
            if wanted(name) {
                let order = read_u32s(&root.join("data/workloads").join(file))?.into_iter().take(n).collect();
                all.push(cold(name, "fmnist", [28, 28, 1], Frames::Owned(images.clone()), order));
            }
        }
    }
    let dir = root.join("data/imagenet");
    // Recurring objects: 6000 frames, the first 2000 the warm-up (quick: 600, 200).
    let (n, warmup) = if quick { (600, 200) } else { (6000, 2000) };
    let steady = |name, frames, order: Vec<u32>| Workload {
        segments: vec![("cold", 0..warmup), ("steady", warmup..order.len())],
        ..cold(name, "imagenet", IMAGENET_SHAPE, frames, order)
    };
    if wanted("recurring") && quick {
        // Quick: the caches warm-start on the first 700 warm-up frames
        // (`cache train`; a training needs ~600 rows to certify anything at
        // half the 1 % budget), then 300 steady-state frames are measured.
        let frames = Frames::mapped(&dir.join("recurring_k30_seed1.u8"), IMAGENET_FRAME)?;
        all.push(Workload {
            warm: (0..700).collect(),
            segments: vec![("warm", 0..300)],
            ..cold("recurring", "imagenet", IMAGENET_SHAPE, frames, (2000..2300).collect())
        });
    } else if wanted("recurring") {
        let frames = Frames::mapped(&dir.join("recurring_k30_seed1.u8"), IMAGENET_FRAME)?;
        all.push(steady("recurring", frames, (0..n as u32).collect()));
    }
    if wanted("recurring_shuffled") && (!quick || only.is_some()) {
        let frames = Frames::mapped(&dir.join("recurring_k30_seed1.u8"), IMAGENET_FRAME)?;
        let order: Vec<u32> = read_u32s(&dir.join("recurring_k30_seed1_shuffled.idx"))?;
        let order = if quick { order.into_iter().filter(|&f| (f as usize) < n).collect() } else { order };
        all.push(steady("recurring_shuffled", frames, order));
    }
    for (name, warm_name, file) in
        [("vtest", "vtest_warm", "vtest_260.u8"), ("megamind_bugy", "megamind_bugy_warm", "megamind_bugy_260.u8")]
    {
        if quick && only.is_none() {
            break;
        }
        if wanted(name) {
            let frames = Frames::mapped(&dir.join(file), IMAGENET_FRAME)?;
            let order = (0..frames.len() as u32).collect();
            all.push(cold(name, "imagenet", IMAGENET_SHAPE, frames, order));
        }
        if wanted(warm_name) {
            // The first half warm-starts the caches; the second half is measured.
            let frames = Frames::mapped(&dir.join(file), IMAGENET_FRAME)?;
            let half = frames.len() as u32 / 2;
            let order: Vec<u32> = (half..frames.len() as u32).collect();
            let n = order.len();
            all.push(Workload {
                warm: (0..half).collect(),
                segments: vec![("warm", 0..n)],
                ..cold(name, "imagenet", IMAGENET_SHAPE, frames, order)
            });
        }
    }
    Ok(all)
}

/// A stream measured from cold caches as one segment.
fn cold(name: &'static str, model: &'static str, shape: [u32; 3], frames: Frames, order: Vec<u32>) -> Workload {
    let n = order.len();
    Workload { name, model, shape, frames, order, warm: Vec::new(), segments: vec![("cold", 0..n)] }
}

fn read_u32s(path: &Path) -> anyhow::Result<Vec<u32>> {
    let b = std::fs::read(path).with_context(|| format!("{} missing: run scripts/setup.sh", path.display()))?;
    Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
