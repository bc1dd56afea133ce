#!/usr/bin/env python3
"""Request streams for the ImageNet model (EfficientNet-Lite2, 260x260 RGB), real
images only, seeded; written to data/imagenet/ (git-ignored):

    .venv/bin/python scripts/workloads/imagenet_streams.py            # skip what is up to date
    .venv/bin/python scripts/workloads/imagenet_streams.py --force    # regenerate

recurring_k30_seed1.u8 (+ .json)
    A camera watching objects that come and go: K = 30 of the 100 ai-benchmark
    photos (chosen by the seed); the object in view changes with probability
    0.1 per frame (to one of the other K - 1, uniformly); every frame is a
    fresh view of the object through a moving, imperfect camera: random-resized
    crop (area 0.5-1.0 of the photo, aspect 3/4-4/3 log-uniform, position
    uniform), horizontal flip (p 0.5), rotation uniform in +-15 degrees
    (bilinear, black corners), brightness and contrast each x U(0.75, 1.25)
    (contrast around the frame's mean grey), Gaussian noise sigma 4, rounded
    and clipped to u8, at 260x260 (PIL bicubic from the crop).  6000 frames:
    the first 2000 are the warm-up, the rest the steady state.
    Raw u8 [6000, 260, 260, 3] NHWC RGB, no header; frame f at byte f*202800.
recurring_k30_seed1_shuffled.idx (+ .json)
    The same 6000 frames in a uniformly shuffled order (no locality): raw
    little-endian u32 frame indices into recurring_k30_seed1.u8.
vtest_260.u8, megamind_bugy_260.u8 (+ .json)
    Every frame, in order, of vtest.avi (795 frames, 768x576) and
    Megamind_bugy.avi (270 frames, 720x528) from Debian opencv-doc
    (examples/data/), decoded with PyAV to RGB24 and resized whole (aspect not
    kept) to 260x260 with PIL BOX (area average).

Random numbers: numpy.random.default_rng(seed) (PCG64), drawn in a fixed order
documented in recurring(); the json records the object sequence, its labels
and the sha256 of every file.  Needs scripts/models/prepare.py first (the
ai-benchmark photos; data/imagenet/photos.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

WORKLOADS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(WORKLOADS_DIR.parent / "models"))
from common import DATA_DIR, PrereqError, atomic_write_bytes, atomic_write_text, die, package_dir, rel  # noqa: E402

FORMAT_VERSION = 1
OUT = DATA_DIR / "imagenet"
SIZE = 260
FRAME = SIZE * SIZE * 3
K = 30
P_CHANGE = 0.1
FRAMES = 6000
WARMUP = 2000
SEED = 1
VIDEOS = {"vtest": "vtest.avi", "megamind_bugy": "Megamind_bugy.avi"}
VIDEO_DIR = Path("/usr/share/doc/opencv-doc/examples/data")


def log(msg: str) -> None:
    print(f"[imagenet-streams] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(data: Path, meta: Path) -> bool:
    if not (data.is_file() and meta.is_file()):
        return False
    try:
        m = json.loads(meta.read_text())
    except ValueError:
        return False
    return m.get("format_version") == FORMAT_VERSION and m.get("bytes") == data.stat().st_size


def view(photo, rng, np, Image):
    """One camera view of `photo` (PIL RGB); draws, in order: crop area,
    log-aspect, x, y, flip, angle, brightness, contrast, noise."""
    w, h = photo.size
    area = rng.uniform(0.5, 1.0) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, int(round(math.sqrt(area * aspect))))
    ch = min(h, int(round(math.sqrt(area / aspect))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    flip = rng.random() < 0.5
    angle = rng.uniform(-15.0, 15.0)
    bright = rng.uniform(0.75, 1.25)
    contrast = rng.uniform(0.75, 1.25)
    img = photo.crop((x, y, x + cw, y + ch))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.rotate(angle, resample=Image.BILINEAR)
    img = img.resize((SIZE, SIZE), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) * bright
    a = (a - a.mean()) * contrast + a.mean()
    a = a + rng.normal(0.0, 4.0, a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def recurring(force: bool) -> None:
    """rng draws: the K objects (rng.choice(100, K, replace=False)), the first
    object (integers(K)); then per frame t >= 1: random() < P_CHANGE, and on a
    change integers(K - 1) over the other objects (ascending slot order); then
    for every frame, in order, the draws of view()."""
    import numpy as np
    from PIL import Image
    data, meta = OUT / f"recurring_k{K}_seed{SEED}.u8", OUT / f"recurring_k{K}_seed{SEED}.json"
    sdata, smeta = OUT / f"recurring_k{K}_seed{SEED}_shuffled.idx", OUT / f"recurring_k{K}_seed{SEED}_shuffled.json"
    if not force and up_to_date(data, meta) and up_to_date(sdata, smeta):
        log(f"{rel(data)} + shuffled: up to date, skipped")
        return
    photos_meta = json.loads((OUT / "photos.json").read_text())
    src = package_dir("ai_benchmark", "ai-benchmark==0.1.2") / "data" / "classification"
    rng = np.random.default_rng(SEED)
    objects = sorted(int(i) for i in rng.choice(100, K, replace=False))
    slot = int(rng.integers(K))
    seq = [slot]
    for _ in range(1, FRAMES):
        if rng.random() < P_CHANGE:
            others = [s for s in range(K) if s != slot]
            slot = others[int(rng.integers(K - 1))]
        seq.append(slot)
    photos = [Image.open(src / photos_meta["images"][i]).convert("RGB") for i in objects]
    tmp = data.with_suffix(".u8.tmp")
    with open(tmp, "wb") as f:
        for t, s in enumerate(seq):
            f.write(view(photos[s], rng, np, Image).tobytes())
            if t % 1000 == 999:
                log(f"  {t + 1}/{FRAMES} frames")
    os.replace(tmp, data)
    photo_of = [objects[s] for s in seq]
    labels = [photos_meta["labels"][p] for p in photo_of]
    changes = sum(1 for a, b in zip(seq, seq[1:]) if a != b)
    common = {"format_version": FORMAT_VERSION, "seed": SEED, "k": K, "p_change": P_CHANGE,
              "frames": FRAMES, "warmup_frames": WARMUP, "height": SIZE, "width": SIZE,
              "channels": 3, "layout": "NHWC", "dtype": "u8"}
    atomic_write_text(meta, json.dumps({
        **common, "workload": "recurring", "file": data.name, "bytes": data.stat().st_size,
        "sha256": sha256(data), "objects": objects, "object_changes": changes,
        "augmentation": "random-resized crop area 0.5-1.0, aspect 3/4-4/3; hflip 0.5; "
                        "rotation +-15 deg; brightness, contrast x U(0.75, 1.25); noise sigma 4",
        "photo_per_frame": photo_of, "label_per_frame": labels}) + "\n")
    perm = np.random.default_rng(SEED + 1).permutation(FRAMES).astype("<u4")
    atomic_write_bytes(sdata, perm.tobytes())
    atomic_write_text(smeta, json.dumps({
        **common, "workload": "recurring_shuffled", "file": sdata.name, "frames_file": data.name,
        "bytes": sdata.stat().st_size, "sha256": sha256(sdata),
        "order": "numpy default_rng(seed + 1).permutation(frames), u32 LE frame indices"}) + "\n")
    log(f"{rel(data)}: {FRAMES} frames, {changes} object changes; {rel(sdata)}")


def video(name: str, file: str, force: bool) -> None:
    import av
    import numpy as np
    from PIL import Image
    data, meta = OUT / f"{name}_{SIZE}.u8", OUT / f"{name}_{SIZE}.json"
    if not force and up_to_date(data, meta):
        log(f"{rel(data)}: up to date, skipped")
        return
    src = VIDEO_DIR / file
    if not src.is_file():
        raise PrereqError(f"{src} missing: apt-get install -y --no-install-recommends opencv-doc")
    tmp = data.with_suffix(".u8.tmp")
    n = 0
    with av.open(str(src)) as c, open(tmp, "wb") as f:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        w, h = stream.codec_context.width, stream.codec_context.height
        for frame in c.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            f.write(np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BOX), np.uint8).tobytes())
            n += 1
    os.replace(tmp, data)
    atomic_write_text(meta, json.dumps({
        "format_version": FORMAT_VERSION, "workload": name, "source": str(src),
        "source_sha256": sha256(src), "original_width": w, "original_height": h,
        "frames": n, "height": SIZE, "width": SIZE, "channels": 3, "layout": "NHWC",
        "dtype": "u8", "resize": "whole frame to 260x260, PIL BOX (aspect not kept)",
        "file": data.name, "bytes": data.stat().st_size, "sha256": sha256(data)}) + "\n")
    log(f"{rel(data)}: {n} frames")


def prepare(force: bool = False, skip_video: bool = False) -> None:
    if not (OUT / "photos.json").is_file():
        raise PrereqError(f"{rel(OUT / 'photos.json')} missing: run scripts/models/prepare.py first")
    recurring(force)
    if not skip_video:
        for name, file in VIDEOS.items():
            video(name, file, force)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--skip-video", action="store_true")
    args = ap.parse_args(argv)
    try:
        prepare(args.force, args.skip_video)
    except (PrereqError, RuntimeError, ValueError, OSError) as e:
        die(f"[imagenet-streams] {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
