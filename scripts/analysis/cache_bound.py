#!/usr/bin/env python3
"""What learned caches could reach on the recurring-objects stream, offline.

    .venv/bin/pip install -r scripts/analysis/requirements.txt
    .venv/bin/python scripts/analysis/cache_bound.py            # ~6 min on 2 cores
    .venv/bin/python scripts/analysis/cache_bound.py --stream vtest_260 --train 0 397 --test 397 795

Runs the stream through models/efficientnet_lite2.onnx (onnxruntime) once, keeping
every cut's features as gatid computes them (cut 0: 8x8 thumbnail of the model input
and a 16-bin histogram per channel on the 0-255 pixel scale; cut i: stage i's output
averaged over space), cached in data/imagenet/analysis/. Then, per kind of predictor
(softmax regression, one hidden layer of 256, Freeze Inference's k-NN with k = 5)
trained on the warm-up frames and judged on the steady state:

- `cascade`: the best cascade of the cuts' predictors with thresholds chosen *in
  hindsight* on the judged frames themselves (coordinate search over each cut's
  confidence quantiles) so that at most `budget` of the frames disagree with the full
  model. No online cache can do better with the same predictors: it must pick its
  thresholds before it sees the frames. Speedup = 1 / mean cost, with stage costs as
  proportions of the whole model (lookups free).
- `oracle`: the earliest cut whose predictor is right (what `bench caches` calls
  `oracle_speedup`): it counts lucky guesses a selector cannot tell from the rest.
- `object identity at the input`: a predictor that knows *which photo* is in view
  (more than any cache can know) and answers the full model's most frequent class for
  it, for the objects whose frames agree with that most often, until the budget is
  spent. It bounds what any view-blind cache at the input can do at that budget.

Writes bench/results/cache_bound.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from common import DATA_DIR, REPO_ROOT as ROOT  # noqa: E402

DATA = DATA_DIR / "imagenet"
SIZE, THUMB, BINS = 260, 8, 16
CUTS = ["input"] + [f"stage{k}" for k in range(1, 8)]
# Stage costs as proportions of the whole model (stage 1..7, head), measured by gatid
# (bench caches' stage timings, session 5); cut c is reached after stages 1..c.
STAGE_COST = np.array([20.3, 30.5, 15.4, 13.8, 29.3, 28.2, 8.5, 13.7])


def features(stream: str) -> dict[str, np.ndarray]:
    cache = DATA / "analysis" / f"{stream}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    import onnx
    import onnxruntime as ort
    m = onnx.load(str(ROOT / "models" / "efficientnet_lite2.onnx"))
    cuts = [p.value for p in m.metadata_props if p.key == "gati.cuts"][0].split(",")
    for c in cuts:
        m.graph.output.append(onnx.helper.make_tensor_value_info(c, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so)
    raw = np.memmap(DATA / f"{stream}.u8", np.uint8, "r").reshape(-1, SIZE, SIZE, 3)
    cell = np.arange(SIZE) * THUMB // SIZE
    out: dict[str, list] = {k: [] for k in ["logits"] + CUTS}
    for i in range(0, len(raw), 16):
        px = np.asarray(raw[i:i + 16])
        x = ((px.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()
        res = sess.run(["logits"] + cuts, {"input": x})
        out["logits"].append(res[0])
        for k, r in enumerate(res[1:], 1):
            out[CUTS[k]].append(r.mean(axis=(2, 3)))
        th = np.stack([np.stack([x[:, :, cell == cy][:, :, :, cell == cx].mean(axis=(2, 3))
                                 for cx in range(THUMB)], -1) for cy in range(THUMB)], -2)
        q = (px.reshape(len(px), -1, 3).astype(np.int32) * BINS) // 256
        hist = np.stack([(q[:, :, c, None] == np.arange(BINS)).mean(1) for c in range(3)], 1)
        out["input"].append(np.hstack([th.reshape(len(px), -1), hist.reshape(len(px), -1)]))
        if i % 1600 == 0:
            print(f"  features: {i}/{len(raw)} frames", flush=True)
    arrays = {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def predict(kind: str, xtr, ytr, xte):
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.neural_network import MLPClassifier
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        sys.exit(f"{e}: {sys.executable} -m pip install -r {Path(__file__).parent / 'requirements.txt'}")
    sc = StandardScaler().fit(xtr)
    xtr, xte = sc.transform(xtr), sc.transform(xte)
    if kind == "knn":
        classes = np.unique(ytr)
        nn = KNeighborsClassifier(5).fit(xtr, np.searchsorted(classes, ytr))
        dist, idx = nn.kneighbors(xte, 5)
        labs, w = nn._y[idx], 1.0 / (dist + 1e-6)
        pred, conf = np.zeros(len(xte), np.int64), np.zeros(len(xte))
        for i in range(len(xte)):  # Freeze Inference's confidence, as gatid's knn.rs
            u = np.unique(labs[i])
            s = np.array([(labs[i] == l).mean() * w[i][labs[i] == l].sum() for l in u])
            j = s.argmax()
            pred[i], conf[i] = classes[u[j]], s[j] / s.sum() * (labs[i] == u[j]).mean()
        return pred, conf
    m = (LogisticRegression(max_iter=1000) if kind == "linear"
         else MLPClassifier((256,), alpha=1e-3, max_iter=400, random_state=1)).fit(xtr, ytr)
    pr = m.predict_proba(xte)
    return m.classes_[pr.argmax(1)], pr.max(1)


def first_exit(answered) -> np.ndarray:
    """Per row, the first cut (row of `answered`) that answers it; len(answered): none."""
    return np.where(answered.any(0), answered.argmax(0), len(answered))


def mean_cost(ex, reach) -> float:
    """Mean cost of rows exiting at cuts `ex` (len(reach): the whole model, cost 1)."""
    return float(np.where(ex < len(reach), reach[np.minimum(ex, len(reach) - 1)], 1.0).mean())


def cascade(pred, conf, y, reach, budget):
    ok = pred == y[None, :]
    cols = np.arange(len(y))

    def cost(th):
        ex = first_exit(conf >= th[:, None])
        wrong = (ex < len(reach)) & ~ok[np.minimum(ex, len(reach) - 1), cols]
        return mean_cost(ex, reach), wrong.mean(), np.bincount(ex, minlength=len(reach) + 1)

    th = np.full(len(reach), np.inf)
    grids = [np.unique(np.quantile(c, np.linspace(0, 1, 201))) for c in conf]
    best = cost(th)
    for _ in range(4):
        for c in range(len(reach)):
            for g in grids[c]:
                t2 = th.copy()
                t2[c] = g
                r = cost(t2)
                if r[1] <= budget and r[0] < best[0]:
                    th, best = t2, r
    return {"speedup": 1.0 / best[0], "disagreement": best[1], "exits": best[2].tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stream", default="recurring_k30_seed1")
    ap.add_argument("--train", nargs=2, type=int, default=[0, 2000], metavar=("LO", "HI"))
    ap.add_argument("--test", nargs=2, type=int, default=[2000, 6000], metavar=("LO", "HI"))
    ap.add_argument("--kinds", default="linear,mlp,knn")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache_bound.json"))
    args = ap.parse_args(argv)
    f = features(args.stream)
    y = f["logits"].argmax(1)
    tr, te = slice(*args.train), slice(*args.test)
    yte = y[te]
    share = STAGE_COST / STAGE_COST.sum()
    reach = np.concatenate([[0.0], np.cumsum(share)[:7]])
    thumb_dim = 3 * THUMB * THUMB
    inputs = {"thumbnail": f["input"][:, :thumb_dim], "thumbnail+histogram": f["input"]}
    result = {"stream": args.stream, "train": args.train, "test": args.test,
              "full_model_flips": float(np.mean(y[1:] != y[:-1])), "rows": []}
    print(f"{args.stream}: full model's answer changes on {result['full_model_flips']:.1%} of consecutive frames")
    print(f"{'input features':22s} {'predictor':8s} {'oracle':>7s} " + " ".join(f"{'@' + str(b):>7s}" for b in (0.005, 0.01, 0.02)))
    for iname, xin in inputs.items():
        for kind in args.kinds.split(","):
            t0 = time.time()
            pc = [predict(kind, x[tr], y[tr], x[te]) for x in [xin] + [f[c] for c in CUTS[1:]]]
            pred, conf = np.array([p for p, _ in pc]), np.array([c for _, c in pc])
            ok = pred == yte[None, :]
            oracle = 1.0 / mean_cost(first_exit(ok), reach)
            row = {"input": iname, "predictor": kind, "oracle_speedup": oracle,
                   "accuracy_per_cut": ok.mean(1).round(4).tolist(),
                   "cascade": {str(b): cascade(pred, conf, yte, reach, b) for b in (0.005, 0.01, 0.02)}}
            result["rows"].append(row)
            print(f"{iname:22s} {kind:8s} {oracle:7.2f} "
                  + " ".join(f"{row['cascade'][str(b)]['speedup']:7.2f}" for b in (0.005, 0.01, 0.02))
                  + f"   ({time.time() - t0:.0f} s)", flush=True)
    meta = DATA / f"{args.stream}.json"
    photo = json.loads(meta.read_text()).get("photo_per_frame") if meta.is_file() else None
    if photo:
        photo = np.array(photo)[te]
        per = []
        for o in np.unique(photo):
            yo = yte[photo == o]
            per.append((int((yo != np.bincount(yo).argmax()).sum()), len(yo)))
        per.sort(key=lambda e: e[0] / e[1])
        result["object_purity"] = sorted(1 - e / n for e, n in per)
        for b in (0.005, 0.01, 0.02):
            spent = answered = 0
            for e, n in per:
                if spent + e > b * len(yte):
                    break
                spent, answered = spent + e, answered + n
            share_answered = answered / len(yte)
            result[f"object_identity_at_input@{b}"] = {"answered": share_answered, "speedup": 1 / (1 - share_answered)}
            print(f"object identity at the input, budget {b}: answers {share_answered:.1%} -> {1 / (1 - share_answered):.2f}x")
        pure = sum(1 for p in result["object_purity"] if p == 1.0)
        print(f"objects whose every steady-state frame gets one answer from the full model: {pure} of {len(per)}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
