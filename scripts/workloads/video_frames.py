#!/usr/bin/env python3
"""Video workload: every frame of OpenCV's `vtest.avi` (fixed camera, pedestrians),
in order, downscaled to 32x32 RGB for the CIFAR-10 CNN.

    .venv/bin/python scripts/workloads/video_frames.py           # skip if up to date
    .venv/bin/python scripts/workloads/video_frames.py --force   # redo

Source: Debian package `opencv-doc` (examples/data/vtest.avi; 768x576, 10 fps,
MS-MPEG4v3).  Found with `dpkg -L opencv-doc`, or given by --src / $VTEST_AVI.
Decoded with PyAV (`av`, bundles ffmpeg; scripts/workloads/requirements.txt).

Writes
  data/video/vtest_32x32_rgb.u8   raw uint8 [frames, 32, 32, 3] (NHWC, row-major,
                                  RGB, no header): frame f starts at byte f*3072
  data/video/vtest.json           metadata (see README.md), sha256 of the .u8, and
                                  the CIFAR-10 CNN's per-frame argmax predictions,
                                  class histogram and consecutive-same-class fraction

Resizing: each decoded frame is converted to RGB24 by ffmpeg (swscale) and
area-averaged over the FULL frame (no crop, aspect ratio not kept): when the
frame size is a multiple of 32 (768x576 is: 24x18-pixel blocks), output =
(sum of the block + n/2) // n in integers, n = block pixel count; otherwise
PIL Image.BOX.  Idempotent: skipped when both outputs exist, the json has this
script's format version and the .u8's sha256 matches the one recorded.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Keep CPU use modest (numpy's BLAS would otherwise use every core).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

WORKLOADS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(WORKLOADS_DIR.parent / "models"))
from common import (  # noqa: E402
    CIFAR10_CLASSES, DATA_DIR, MODELS_DIR, PrereqError, atomic_write_bytes,
    atomic_write_text, die, rel,
)

FORMAT_VERSION = 1
DEB_PACKAGE = "opencv-doc"
DEFAULT_SRC = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
OUT_DIR = DATA_DIR / "video"
OUT_U8 = OUT_DIR / "vtest_32x32_rgb.u8"
OUT_JSON = OUT_DIR / "vtest.json"
CIFAR_ONNX = MODELS_DIR / "cifar10_cnn.onnx"
H = W = 32
C = 3
FRAME_BYTES = H * W * C
BATCH = 128
REQ_FILE = WORKLOADS_DIR / "requirements.txt"


def log(msg: str) -> None:
    print(f"[video] {msg}", flush=True)


def import_or_hint(module: str, pip_name: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PrereqError(
            f"Python module '{module}' is not importable ({e}).\n"
            f"  Install it with: {sys.executable} -m pip install -r {rel(REQ_FILE)}"
            f"   (package '{pip_name}')") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_source(override: str | None = None) -> Path:
    """Path of vtest.avi (or vtest.avi.gz), with an installation hint if absent."""
    if override or os.environ.get("VTEST_AVI"):
        p = Path(override or os.environ["VTEST_AVI"])
        if not p.is_file():
            raise PrereqError(f"video source {p} does not exist")
        return p
    cands: list[Path] = []
    try:
        out = subprocess.run(["dpkg", "-L", DEB_PACKAGE], capture_output=True, text=True,
                             check=False).stdout
        cands += [Path(l) for l in out.splitlines()
                  if l.endswith("/vtest.avi") or l.endswith("/vtest.avi.gz")]
    except OSError:
        pass
    cands += [DEFAULT_SRC, DEFAULT_SRC.with_name("vtest.avi.gz")]
    for p in cands:
        if p.is_file():
            return p
    raise PrereqError(
        f"vtest.avi not found: the Debian package '{DEB_PACKAGE}' is not installed.\n"
        f"  Install it with: apt-get update && apt-get install -y --no-install-recommends "
        f"{DEB_PACKAGE}\n  (or point --src / $VTEST_AVI at a copy of vtest.avi)")


def downscale(rgb, np, Image):
    """[h, w, 3] uint8 -> [32, 32, 3] uint8 area average over the full frame:
    integer block sums (rows, then columns), rounded half up: (sum + n//2) // n."""
    h, w, _ = rgb.shape
    if h % H == 0 and w % W == 0:
        bh, bw = h // H, w // W
        n = bh * bw
        s = rgb.reshape(H, bh, w * C).sum(axis=1, dtype=np.uint32)       # [32, w*3]
        s = s.reshape(H, W, bw, C).sum(axis=2, dtype=np.uint32)          # [32, 32, 3]
        return ((s + n // 2) // n).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((W, H), Image.BOX), dtype=np.uint8)


def decode(src: Path):
    av = import_or_hint("av", "av")
    np = import_or_hint("numpy", "numpy")
    Image = import_or_hint("PIL.Image", "pillow")
    data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else None
    container = av.open(io.BytesIO(data) if data is not None else str(src))
    try:
        if not container.streams.video:
            raise RuntimeError(f"{src} has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # keep CPU use modest
        rate = stream.average_rate or stream.guessed_rate
        meta = {
            "codec": stream.codec_context.name,
            "original_width": stream.codec_context.width,
            "original_height": stream.codec_context.height,
            "original_pix_fmt": stream.codec_context.pix_fmt,
            "fps": float(rate) if rate else None,
            "fps_rational": str(rate) if rate else None,
            "container_frame_count": stream.frames,
        }
        frames = []
        pts = []
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            frames.append(downscale(rgb, np, Image))
            pts.append(frame.pts)
    finally:
        container.close()
    if not frames:
        raise RuntimeError(f"no frames decoded from {src}")
    if any(b is not None and a is not None and b <= a for a, b in zip(pts, pts[1:])):
        raise RuntimeError("decoded frames are not in increasing pts order")
    meta["av_version"] = av.__version__
    meta["ffmpeg_version"] = getattr(av, "ffmpeg_version_info", None)
    return np.stack(frames), meta


def run_lengths(seq) -> list[int]:
    runs, cur = [], 1
    for a, b in zip(seq, seq[1:]):
        if a == b:
            cur += 1
        else:
            runs.append(cur)
            cur = 1
    runs.append(cur)
    return runs


def classify(frames) -> dict:
    np = import_or_hint("numpy", "numpy")
    ort = import_or_hint("onnxruntime", "onnxruntime")
    if not CIFAR_ONNX.is_file():
        raise PrereqError(f"{rel(CIFAR_ONNX)} is missing: run "
                          f".venv/bin/python scripts/models/prepare.py first")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(CIFAR_ONNX), so, providers=["CPUExecutionProvider"])
    logits = []
    for i in range(0, len(frames), BATCH):
        x = frames[i:i + BATCH].astype(np.float32)  # NHWC, raw 0-255 RGB
        logits.append(sess.run(["logits"], {"input": x})[0])
    logits = np.concatenate(logits)
    pred = logits.argmax(axis=1)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    hist = np.bincount(pred, minlength=len(CIFAR10_CLASSES))
    same = float((pred[1:] == pred[:-1]).mean()) if len(pred) > 1 else 1.0
    runs = run_lengths(pred.tolist())
    return {
        "model": rel(CIFAR_ONNX),
        "model_sha256": sha256_file(CIFAR_ONNX),
        "onnxruntime_version": ort.__version__,
        "input": "float32 [N,32,32,3] NHWC, raw 0-255 RGB (the .u8 values as floats)",
        "class_names": CIFAR10_CLASSES,
        "class_histogram": {CIFAR10_CLASSES[c]: int(hist[c]) for c in range(len(hist))},
        "class_histogram_list": [int(v) for v in hist],
        "consecutive_same_class_fraction": same,
        "class_runs": len(runs),
        "mean_class_run_length": len(pred) / len(runs),
        "max_class_run_length": max(runs),
        "mean_top1_probability": float(prob.max(axis=1).mean()),
        "predictions": [int(v) for v in pred],
    }


def frame_stats(frames) -> dict:
    np = import_or_hint("numpy", "numpy")
    f = frames.astype(np.int16)
    d = np.abs(f[1:] - f[:-1]).reshape(len(frames) - 1, -1)
    per = d.mean(axis=1)
    return {
        "consecutive_mean_abs_diff": float(per.mean()),
        "consecutive_mean_abs_diff_max": float(per.max()),
        "identical_consecutive_frames": int((d.max(axis=1) == 0).sum()),
        "distinct_frames": int(len({fr.tobytes() for fr in frames})),
        "mean_abs_diff_vs_first_frame": float(np.abs(f - f[0]).mean()),
    }


def up_to_date() -> tuple[bool, str]:
    if not OUT_U8.is_file() or not OUT_JSON.is_file():
        return False, "outputs missing"
    try:
        meta = json.loads(OUT_JSON.read_text())
    except ValueError:
        return False, "json unreadable"
    if meta.get("format_version") != FORMAT_VERSION or "cifar10" not in meta:
        return False, "json from another format version"
    if OUT_U8.stat().st_size != meta.get("frame_count", -1) * FRAME_BYTES:
        return False, "size mismatch"
    if sha256_file(OUT_U8) != meta.get("sha256"):
        return False, "sha256 mismatch"
    return True, f"{meta['frame_count']} frames, sha256 {meta['sha256'][:12]}..."


def prepare(force: bool = False, src_override: str | None = None) -> dict:
    if not force:
        ok, why = up_to_date()
        if ok:
            log(f"{rel(OUT_U8)}: up to date ({why}), skipped")
            return json.loads(OUT_JSON.read_text())
        log(f"regenerating: {why}")
    t0 = time.time()
    src = find_source(src_override)
    log(f"decoding {src}")
    frames, vmeta = decode(src)
    t_dec = time.time() - t0
    n = len(frames)
    data = frames.tobytes()
    assert len(data) == n * FRAME_BYTES
    t1 = time.time()
    cls = classify(frames)
    t_cls = time.time() - t1
    meta = {
        "format_version": FORMAT_VERSION,
        "workload": "video",
        "source": str(src),
        "source_package": DEB_PACKAGE,
        "source_bytes": src.stat().st_size,
        "source_sha256": sha256_file(src),
        "file": OUT_U8.name,
        "frame_count": n,
        "height": H, "width": W, "channels": C,
        "layout": "NHWC", "dtype": "u8", "color": "RGB",
        "frame_bytes": FRAME_BYTES,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **vmeta,
        "resize": ("area average over the full frame (no crop, aspect not kept): "
                   "(block sum + n/2) // n when the size divides by 32, else PIL BOX"),
        "color_conversion": "ffmpeg swscale via PyAV frame.to_ndarray(format='rgb24')",
        "frame_stats": frame_stats(frames),
        "cifar10": cls,
        "seconds": {"decode_resize": round(t_dec, 2), "classify": round(t_cls, 2)},
    }
    if vmeta.get("container_frame_count") and vmeta["container_frame_count"] != n:
        log(f"WARNING: container says {vmeta['container_frame_count']} frames, decoded {n}")
    atomic_write_bytes(OUT_U8, data)
    atomic_write_text(OUT_JSON, json.dumps(meta, indent=1) + "\n")
    log(f"{rel(OUT_U8)}: {n} frames from {vmeta['original_width']}x{vmeta['original_height']} "
        f"@ {vmeta['fps']} fps in {time.time() - t0:.1f}s; CIFAR-10 consecutive-same-class "
        f"{cls['consecutive_same_class_fraction']:.4f}")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--src", help="path of vtest.avi (default: from dpkg -L opencv-doc)")
    args = ap.parse_args(argv)
    try:
        meta = prepare(args.force, args.src)
    except (PrereqError, RuntimeError, OSError, ValueError) as e:
        die(f"[video] {type(e).__name__}: {e}")
    c = meta["cifar10"]
    print(json.dumps({k: meta[k] for k in ("frame_count", "original_width", "original_height",
                                            "fps", "sha256")}))
    print(json.dumps({"class_histogram": c["class_histogram"],
                      "consecutive_same_class_fraction": c["consecutive_same_class_fraction"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
