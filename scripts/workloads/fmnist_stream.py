#!/usr/bin/env python3
"""Fashion-MNIST request streams for the cache benchmark (algorithm: README.md).

    .venv/bin/python scripts/workloads/fmnist_stream.py                 # p_stay 0.9, seed 1, 10000
    .venv/bin/python scripts/workloads/fmnist_stream.py --p-stay 0.5 --seed 7 --length 20000
    .venv/bin/python scripts/workloads/fmnist_stream.py --self-test     # check pcg64_ref vs numpy

Writes into data/workloads/ (little-endian u32 test-set indices, no header):
  fmnist_local_p{P}_seed{S}[_n{L}].idx     class-run Markov stream ("gati-fmnist-local-v1")
  fmnist_shuffled_seed{S}[_n{L}].idx       uniform shuffle ("gati-fmnist-shuffled-v1")
each with a .json beside it (parameters, sha256, empirical p_stay, histogram...).
P is Python's format(p, 'g') (0.9 -> "0.9"); `_n{L}` only when L != 10000.

Labels come from data/fashion-mnist/t10k-labels-idx1-ubyte (made by
scripts/models/prepare.py).  Randomness: numpy default_rng(seed) (PCG64 seeded
by SeedSequence), consumed only as raw u64 draws through the primitives of
pcg64_ref.py, so the streams can be reproduced bit for bit in Rust.
Idempotent: a stream is skipped when its .idx and .json exist, the json's
parameters match and the .idx's sha256 matches the recorded one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import time
from pathlib import Path

WORKLOADS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(WORKLOADS_DIR))
sys.path.insert(0, str(WORKLOADS_DIR.parent / "models"))
from common import (  # noqa: E402
    DATA_DIR, FMNIST_CLASSES, PrereqError, atomic_write_bytes, atomic_write_text, die, rel,
)
import pcg64_ref  # noqa: E402
from pcg64_ref import bounded, fisher_yates, uniform01  # noqa: E402

OUT_DIR = DATA_DIR / "workloads"
LABELS_IDX = DATA_DIR / "fashion-mnist" / "t10k-labels-idx1-ubyte"
NUM_CLASSES = 10
DEFAULT_LENGTH = 10000
LOCAL_ALGO = "gati-fmnist-local-v1"
SHUFFLED_ALGO = "gati-fmnist-shuffled-v1"


def log(msg: str) -> None:
    print(f"[fmnist-stream] {msg}", flush=True)


def read_labels(path: Path = LABELS_IDX) -> tuple[list[int], str]:
    if not path.is_file():
        raise PrereqError(f"{rel(path)} is missing: run .venv/bin/python scripts/models/prepare.py")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{rel(path)}: truncated IDX header")
    magic, n = struct.unpack(">II", raw[:8])
    if magic != 0x00000801 or len(raw) != 8 + n:
        raise ValueError(f"{rel(path)}: not an IDX label file (magic {magic:#010x}, "
                         f"{len(raw)} bytes for n={n})")
    labels = list(raw[8:])
    if max(labels) >= NUM_CLASSES:
        raise ValueError(f"{rel(path)}: label {max(labels)} >= {NUM_CLASSES}")
    return labels, hashlib.sha256(raw).hexdigest()


def make_rng(seed: int):
    """numpy default_rng(seed) raw u64 stream (== pcg64_ref.Pcg64Ref(seed))."""
    return pcg64_ref.NumpyRaw(seed)


# ----------------------------------------------------------------------------- algorithms

def local_stream(labels: list[int], p_stay: float, seed: int, length: int) -> tuple[list[int], dict]:
    """gati-fmnist-local-v1: class-run Markov stream, images without replacement within
    an epoch (an epoch uses every test image exactly once).  See README.md."""
    rng = make_rng(seed)
    by_class = [[i for i, l in enumerate(labels) if l == c] for c in range(NUM_CLASSES)]
    pools: list[list[int]] = [[] for _ in range(NUM_CLASSES)]
    cursor = [0] * NUM_CLASSES
    out: list[int] = []
    classes: list[int] = []
    prev = -1
    epochs = forced_switches = forced_stays = 0
    for _ in range(length):
        if all(cursor[c] >= len(pools[c]) for c in range(NUM_CLASSES)):
            # new epoch: reshuffle every class's ascending index list, classes 0..9 in order
            for c in range(NUM_CLASSES):
                pools[c] = fisher_yates(rng, list(by_class[c]))
                cursor[c] = 0
            epochs += 1
        avail = [c for c in range(NUM_CLASSES) if cursor[c] < len(pools[c])]  # ascending
        if prev < 0:
            c = avail[bounded(rng, len(avail))]
        elif prev in avail:
            if uniform01(rng) < p_stay:
                c = prev
            else:
                others = [x for x in avail if x != prev]
                if others:
                    c = others[bounded(rng, len(others))]
                else:  # prev is the only class left in this epoch
                    c = prev
                    forced_stays += 1
        else:  # prev exhausted in this epoch: forced switch, no stay draw
            c = avail[bounded(rng, len(avail))]
            forced_switches += 1
        out.append(pools[c][cursor[c]])
        cursor[c] += 1
        classes.append(c)
        prev = c
    return out, {"epochs": epochs, "forced_switches": forced_switches,
                 "forced_stays": forced_stays}


def shuffled_stream(n_images: int, seed: int, length: int) -> tuple[list[int], dict]:
    """gati-fmnist-shuffled-v1: concatenated Fisher-Yates permutations of 0..n-1
    (a fresh one per epoch), truncated to `length`."""
    rng = make_rng(seed)
    out: list[int] = []
    epochs = 0
    while len(out) < length:
        out.extend(fisher_yates(rng, list(range(n_images))))
        epochs += 1
    return out[:length], {"epochs": epochs}


# ----------------------------------------------------------------------------- output

def stream_stats(stream: list[int], labels: list[int]) -> dict:
    cls = [labels[i] for i in stream]
    same = sum(a == b for a, b in zip(cls, cls[1:]))
    runs, cur = [], 1
    for a, b in zip(cls, cls[1:]):
        if a == b:
            cur += 1
        else:
            runs.append(cur)
            cur = 1
    runs.append(cur)
    hist = [0] * NUM_CLASSES
    for c in cls:
        hist[c] += 1
    return {
        "empirical_p_stay": same / (len(cls) - 1) if len(cls) > 1 else 1.0,
        "class_runs": len(runs),
        "mean_class_run_length": len(cls) / len(runs),
        "max_class_run_length": max(runs),
        "distinct_indices": len(set(stream)),
        "class_histogram": {FMNIST_CLASSES[c]: hist[c] for c in range(NUM_CLASSES)},
        "class_histogram_list": hist,
        "first_indices": stream[:16],
        "first_classes": cls[:16],
    }


def suffix(seed: int, length: int) -> str:
    return f"seed{seed}" + ("" if length == DEFAULT_LENGTH else f"_n{length}")


def local_name(p_stay: float, seed: int, length: int) -> str:
    return f"fmnist_local_p{format(p_stay, 'g')}_{suffix(seed, length)}"


def shuffled_name(seed: int, length: int) -> str:
    return f"fmnist_shuffled_{suffix(seed, length)}"


def up_to_date(idx: Path, js: Path, params: dict) -> bool:
    if not idx.is_file() or not js.is_file():
        return False
    try:
        meta = json.loads(js.read_text())
    except ValueError:
        return False
    if any(meta.get(k) != v for k, v in params.items()):
        return False
    return (idx.stat().st_size == 4 * params["length"]
            and hashlib.sha256(idx.read_bytes()).hexdigest() == meta.get("sha256"))


def write_stream(name: str, params: dict, gen, labels: list[int], force: bool,
                 out_dir: Path) -> dict:
    idx, js = out_dir / f"{name}.idx", out_dir / f"{name}.json"
    if not force and up_to_date(idx, js, params):
        meta = json.loads(js.read_text())
        log(f"{rel(idx)}: up to date, skipped (empirical p_stay {meta['empirical_p_stay']:.4f})")
        return meta
    t0 = time.time()
    stream, extra = gen()
    assert len(stream) == params["length"]
    data = struct.pack(f"<{len(stream)}I", *stream)
    meta = {**params, "file": idx.name, "dtype": "u32le", "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **extra,
            **stream_stats(stream, labels), "seconds": round(time.time() - t0, 3)}
    atomic_write_bytes(idx, data)
    atomic_write_text(js, json.dumps(meta, indent=1) + "\n")
    log(f"{rel(idx)}: {len(stream)} requests, {meta['distinct_indices']} distinct, "
        f"empirical p_stay {meta['empirical_p_stay']:.4f}, mean class run "
        f"{meta['mean_class_run_length']:.2f}")
    return meta


def prepare(p_stay: float = 0.9, seed: int = 1, length: int = DEFAULT_LENGTH,
            force: bool = False, out_dir: Path = OUT_DIR) -> tuple[dict, dict]:
    if not 0.0 <= p_stay <= 1.0:
        raise ValueError(f"p_stay must be in [0, 1], got {p_stay}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    labels, labels_sha = read_labels()
    common = {"source": rel(LABELS_IDX), "labels_sha256": labels_sha, "n_test": len(labels),
              "seed": seed, "length": length,
              "rng": "numpy default_rng(seed): PCG64(SeedSequence(seed)), raw u64 draws "
                     "(scripts/workloads/pcg64_ref.py)"}
    local = write_stream(
        local_name(p_stay, seed, length),
        {"workload": "fmnist_local", "algorithm": LOCAL_ALGO, "p_stay": p_stay, **common},
        lambda: local_stream(labels, p_stay, seed, length), labels, force, out_dir)
    shuf = write_stream(
        shuffled_name(seed, length),
        {"workload": "fmnist_shuffled", "algorithm": SHUFFLED_ALGO, **common},
        lambda: shuffled_stream(len(labels), seed, length), labels, force, out_dir)
    return local, shuf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p-stay", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--length", type=int, default=DEFAULT_LENGTH)
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--self-test", action="store_true",
                    help="check the pure-Python PCG64/SeedSequence reference against numpy "
                         "and the streams against it, then exit")
    args = ap.parse_args(argv)
    try:
        if args.self_test:
            self_test()
            return 0
        prepare(args.p_stay, args.seed, args.length, args.force)
    except (PrereqError, ValueError, OSError) as e:
        die(f"[fmnist-stream] {e}")
    return 0


def self_test() -> None:
    pcg64_ref.self_test()
    labels, _ = read_labels()
    global make_rng
    fast = make_rng
    try:
        for seed in (0, 1, 3):
            a = local_stream(labels, 0.9, seed, 12000)
            b = shuffled_stream(len(labels), seed, 12000)
            make_rng = pcg64_ref.Pcg64Ref
            assert local_stream(labels, 0.9, seed, 12000) == a, f"local seed {seed}"
            assert shuffled_stream(len(labels), seed, 12000) == b, f"shuffled seed {seed}"
            make_rng = fast
            assert sorted(a[0][:10000]) == list(range(10000)), "local epoch is not a permutation"
            assert sorted(b[0][:10000]) == list(range(10000)), "shuffle is not a permutation"
    finally:
        make_rng = fast
    log("self-test OK: pcg64_ref == numpy; streams identical with either; epochs are permutations")


if __name__ == "__main__":
    sys.exit(main())
