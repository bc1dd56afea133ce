#!/usr/bin/env python3
"""Set-up entry point for the cache-benchmark workloads (see README.md here).

    .venv/bin/python scripts/workloads/prepare.py              # do what is missing
    .venv/bin/python scripts/workloads/prepare.py --force      # regenerate everything

Needs first: scripts/models/prepare.py (data/fashion-mnist/, models/cifar10_cnn.onnx)
and the Debian package opencv-doc (vtest.avi).  Steps:
  1. pip packages of scripts/workloads/requirements.txt (installed if missing,
     unless --no-install)
  2. data/workloads/fmnist_local_p0.9_seed1.idx, fmnist_shuffled_seed1.idx (+ .json)
  3. data/video/vtest_32x32_rgb.u8 + vtest.json (unless --skip-video)
  4. data/imagenet/: the ImageNet model's streams (imagenet_streams.py: recurring
     objects + the same frames shuffled; vtest / Megamind_bugy at 260x260 unless
     --skip-video); needs data/imagenet/photos.json from scripts/models/prepare.py
Each step is skipped when its outputs are up to date.  Exit status is non-zero
with an ERROR line on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(WORKLOADS_DIR))
sys.path.insert(0, str(WORKLOADS_DIR.parent / "models"))
from common import PrereqError, die, rel  # noqa: E402

REQ_FILE = WORKLOADS_DIR / "requirements.txt"
MODULES = [("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("PIL", "pillow"), ("av", "av")]


def log(msg: str) -> None:
    print(f"[workloads] {msg}", flush=True)


def missing_modules(skip_video: bool = False) -> list[str]:
    out = []
    for mod, pip_name in MODULES:
        if skip_video and mod in ("av", "onnxruntime", "PIL"):
            continue
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            out.append(pip_name)
    return out


def ensure_packages(allow_install: bool, skip_video: bool = False) -> None:
    miss = missing_modules(skip_video)
    if not miss:
        log("python packages: present")
        return
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
           "-r", str(REQ_FILE)]
    if not allow_install:
        raise PrereqError(f"missing python packages: {', '.join(miss)}.\n  {' '.join(cmd)}")
    log(f"installing missing packages ({', '.join(miss)}): {' '.join(cmd)}")
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise PrereqError(f"pip install failed (exit {r.returncode}): {' '.join(cmd)}")
    importlib.invalidate_caches()
    still = missing_modules(skip_video)
    if still:
        raise PrereqError(f"still missing after pip install: {', '.join(still)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--no-install", action="store_true", help="never run pip; fail instead")
    ap.add_argument("--skip-video", action="store_true",
                    help="only the Fashion-MNIST streams (no opencv-doc / av needed)")
    args = ap.parse_args(argv)
    t0 = time.time()
    step = "python packages"
    try:
        ensure_packages(not args.no_install, args.skip_video)
        step = "Fashion-MNIST streams"
        import fmnist_stream
        fmnist_stream.prepare(force=args.force)
        if not args.skip_video:
            step = "video frames"
            import video_frames
            video_frames.prepare(force=args.force)
        step = "ImageNet streams"
        import imagenet_streams
        imagenet_streams.prepare(force=args.force, skip_video=args.skip_video)
    except (PrereqError, RuntimeError, ValueError, OSError) as e:
        die(f"[workloads] step '{step}' failed: {type(e).__name__}: {e}")
    log(f"all done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
