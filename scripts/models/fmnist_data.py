#!/usr/bin/env python3
"""Prepare the Fashion-MNIST test set from the Debian package
`dataset-fashion-mnist` (IDX *-ubyte.gz under /usr/share/datasets/fashion-mnist).

Writes (idempotent, overwritten every run):
  data/fashion-mnist/test_images.npy          uint8 [10000,28,28]
  data/fashion-mnist/test_labels.npy          uint8 [10000]
  data/fashion-mnist/t10k-images-idx3-ubyte   decompressed IDX (big-endian header:
                                              magic 0x00000803, n, 28, 28, then n*784 bytes)
  data/fashion-mnist/t10k-labels-idx1-ubyte   decompressed IDX (magic 0x00000801, n, then n bytes)
  data/fashion-mnist/calib-images-idx3-ubyte  the first 10 000 training images (IDX), a calibration
                                              set for `gatictl cache train`
  data/fashion-mnist/samples/NNNN_L.png       the first 20 test images (NNNN = test index, L = label)

The source directory can be overridden with $FMNIST_DIR or --src.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATA_DIR, FMNIST_CLASSES, PrereqError, atomic_write_bytes, die, rel, require,
)

DEB_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
N_SAMPLES = 20


def find_source_dir(override: str | None = None) -> Path:
    """Directory holding the four Fashion-MNIST *-ubyte.gz files."""
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    elif os.environ.get("FMNIST_DIR"):
        candidates.append(Path(os.environ["FMNIST_DIR"]))
    else:
        try:
            out = subprocess.run(["dpkg", "-L", DEB_PACKAGE], capture_output=True, text=True,
                                 check=False).stdout
            for line in out.splitlines():
                if line.endswith(FILES["test_images"]):
                    candidates.append(Path(line).parent)
        except OSError:
            pass
        candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    for d in candidates:
        if all((d / f).is_file() for f in FILES.values()):
            return d
    raise PrereqError(
        "Fashion-MNIST IDX files not found (looked in: "
        + ", ".join(str(c) for c in candidates) + ").\n"
        f"  Install them with: apt-get install -y {DEB_PACKAGE}\n"
        "  or point $FMNIST_DIR at a directory containing "
        + ", ".join(FILES.values()))


def read_idx_bytes(path: Path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


def parse_idx(raw: bytes, path: Path | str = "?"):
    """Parse an IDX file (ubyte only) into a numpy uint8 array."""
    np = require("numpy")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: IDX dtype 0x{dtype_code:02x} is not ubyte")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    off = 4 + 4 * ndim
    n = int(np.prod(dims))
    if len(raw) != off + n:
        raise ValueError(f"{path}: size {len(raw)} != header-implied {off + n}")
    return np.frombuffer(raw, dtype=np.uint8, offset=off).reshape(dims)


def load_split(src: Path, split: str):
    """Return (images uint8 [n,28,28], labels uint8 [n]) for split 'train' or 'test'."""
    imgs = parse_idx(read_idx_bytes(src / FILES[f"{split}_images"]), src / FILES[f"{split}_images"])
    labs = parse_idx(read_idx_bytes(src / FILES[f"{split}_labels"]), src / FILES[f"{split}_labels"])
    if imgs.ndim != 3 or imgs.shape[1:] != (28, 28) or labs.shape != (imgs.shape[0],):
        raise ValueError(f"unexpected shapes {imgs.shape} / {labs.shape} for {split}")
    if labs.max() > 9:
        raise ValueError(f"{split} labels out of range")
    return imgs, labs


def _npy_bytes(arr) -> bytes:
    import io
    np = require("numpy")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def prepare(out_dir: Path, src: Path | None = None, quiet: bool = False) -> Path:
    np = require("numpy")
    Image = require("PIL.Image", "pillow")
    src = src or find_source_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    raw_imgs = read_idx_bytes(src / FILES["test_images"])
    raw_labs = read_idx_bytes(src / FILES["test_labels"])
    imgs = parse_idx(raw_imgs, src / FILES["test_images"])
    labs = parse_idx(raw_labs, src / FILES["test_labels"])
    if imgs.shape != (10000, 28, 28) or labs.shape != (10000,):
        raise ValueError(f"unexpected test set shapes {imgs.shape} / {labs.shape}")

    atomic_write_bytes(out_dir / "t10k-images-idx3-ubyte", raw_imgs)
    atomic_write_bytes(out_dir / "t10k-labels-idx1-ubyte", raw_labs)
    # A calibration set for `gatictl cache train`: the first 10 000 *training*
    # images (disjoint from the test images the benchmark streams replay).
    train = read_idx_bytes(src / FILES["train_images"])
    n_calib = 10_000
    atomic_write_bytes(out_dir / "calib-images-idx3-ubyte",
                       struct.pack(">IIII", 0x803, n_calib, 28, 28) + train[16:16 + n_calib * 784])
    atomic_write_bytes(out_dir / "test_images.npy", _npy_bytes(np.ascontiguousarray(imgs)))
    atomic_write_bytes(out_dir / "test_labels.npy", _npy_bytes(np.ascontiguousarray(labs)))

    sdir = out_dir / "samples"
    if sdir.exists():
        shutil.rmtree(sdir)
    sdir.mkdir()
    for i in range(N_SAMPLES):
        Image.fromarray(np.ascontiguousarray(imgs[i])).save(sdir / f"{i:04d}_{int(labs[i])}.png")

    if not quiet:
        counts = np.bincount(labs, minlength=10)
        print(f"[fmnist] source {src}")
        print(f"[fmnist] wrote {rel(out_dir)}/: test_images.npy {imgs.shape} uint8, "
              f"test_labels.npy {labs.shape} uint8, t10k-*-ubyte (raw IDX), "
              f"samples/ ({N_SAMPLES} PNGs)")
        print(f"[fmnist] label counts {counts.tolist()}  classes: {', '.join(FMNIST_CLASSES)}")
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=None, help="directory with the *-ubyte.gz files")
    ap.add_argument("--out", type=Path, default=DATA_DIR / "fashion-mnist")
    args = ap.parse_args(argv)
    try:
        src = find_source_dir(args.src)
        prepare(args.out, src)
    except (PrereqError, ValueError) as e:
        die(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
