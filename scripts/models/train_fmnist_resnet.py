#!/usr/bin/env python3
"""Train a small ResNet on Fashion-MNIST on CPU with JAX (hand-written SGD),
export it to ONNX with onnx.helper, and verify the export with onnxruntime.

Architecture (NHWC while training, NCHW in the ONNX file):
  stem   : conv3x3 1->16, BN, ReLU (28x28)                  -> "stem_out"    [N,16,28,28]
  stage 1: 2 basic blocks, 16 ch, 14x14                     -> "block1_out", "block2_out"
  stage 2: 2 basic blocks, 32 ch, 7x7                       -> "block3_out", "block4_out"
  stage 3: 2 basic blocks, 64 ch, 4x4                       -> "block5_out", "block6_out"
  head   : global average pool -> linear 64->10             -> "logits"
  basic block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, Add, ReLU.  The first
  block of every stage has stride 2 (pad 1) and a 1x1 stride-2 conv+BN projection
  shortcut (--stage-strides 2,2,2).  Downsampling already in stage 1 makes an
  epoch ~4x cheaper than keeping stage 1 at 28x28 (which XLA:CPU runs at
  ~650 s/epoch on 2 cores) for ~0.5 % accuracy.
BatchNorm is folded into the convolutions for export.

ONNX contract:
  input  "input"  float32 [N,1,28,28] NCHW, ALREADY NORMALISED:
                  x = (pixel/255 - 0.2860) / 0.3530   (done by the daemon, not the model)
  output "logits" float32 [N,10]  (argmax = class; classes in common.FMNIST_CLASSES)

Writes models/fmnist_resnet.onnx and models/fmnist_resnet.json; the raw trained
parameters are also kept in data/fmnist_resnet_params.npz so that
`--export-only` can redo the export without retraining.
Exit status is non-zero if accuracy < 90 % or onnxruntime disagrees with JAX.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATA_DIR, FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, MODELS_DIR, PrereqError,
    atomic_write_bytes, atomic_write_text, die, rel, require,
)
import fmnist_data  # noqa: E402

OPSET = 17
IR_VERSION = 8
STAGES = (16, 32, 64)
# Spatial stride of the first block of each stage. (2, 2, 2): 28 -> 14 -> 7 -> 4.
STAGE_STRIDES = [2, 2, 2]
BLOCKS_PER_STAGE = 2
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # running = m * running + (1 - m) * batch
MIN_ACC = 0.90
MAX_ACC_DIFF = 0.001
MAX_ONNX_BYTES = 5_000_000
CONV_IMPL = "im2col"
PARAMS_NPZ = DATA_DIR / "fmnist_resnet_params.npz"


# ----------------------------------------------------------------------------- model

def block_specs():
    """[(name, cin, cout, stride)] for the residual blocks, in order."""
    specs, cin, i = [], STAGES[0], 1
    for s, cout in enumerate(STAGES):
        for b in range(BLOCKS_PER_STAGE):
            stride = STAGE_STRIDES[s] if b == 0 else 1
            specs.append((f"block{i}", cin, cout, stride))
            cin, i = cout, i + 1
    return specs


def init_params(seed: int):
    """He-normal conv init, zero-init gamma of each block's last BN (helps short runs)."""
    np = require("numpy")
    rng = np.random.default_rng(seed)

    def conv(kh, kw, cin, cout):
        std = (2.0 / (kh * kw * cin)) ** 0.5
        return (rng.standard_normal((kh, kw, cin, cout)) * std).astype(np.float32)

    def bn(c, gamma=1.0):
        return {"gamma": np.full(c, gamma, np.float32), "beta": np.zeros(c, np.float32)}

    def bn_state(c):
        return {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}

    params = {"stem": {"w": conv(3, 3, 1, STAGES[0]), "bn": bn(STAGES[0])}}
    state = {"stem": bn_state(STAGES[0])}
    for name, cin, cout, stride in block_specs():
        p = {"w1": conv(3, 3, cin, cout), "bn1": bn(cout),
             "w2": conv(3, 3, cout, cout), "bn2": bn(cout, 0.0)}
        s = {"bn1": bn_state(cout), "bn2": bn_state(cout)}
        if stride != 1 or cin != cout:
            p["ws"] = conv(1, 1, cin, cout)
            p["bns"] = bn(cout)
            s["bns"] = bn_state(cout)
        params[name], state[name] = p, s
    bound = 1.0 / STAGES[-1] ** 0.5
    params["fc"] = {"w": rng.uniform(-bound, bound, (STAGES[-1], 10)).astype(np.float32),
                    "b": np.zeros(10, np.float32)}
    return params, state


def make_forward():
    jax = require("jax")
    jnp = jax.numpy
    lax = jax.lax

    def conv(x, w, stride):
        k = w.shape[0]
        p = k // 2
        if CONV_IMPL == "lax":
            return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # im2col + one matmul: faster than XLA:CPU's convolution for these small
        # shapes (same semantics: zero padding k//2, given stride).
        n, h, wd, c = x.shape
        ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
        cols = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                for i in range(k) for j in range(k)]
        cols = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
        y = cols.reshape(n * ho * wo, k * k * c) @ w.reshape(k * k * c, -1)
        return y.reshape(n, ho, wo, -1)

    def bn(x, p, s, train):
        if train:
            mean = jnp.mean(x, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
            n = x.shape[0] * x.shape[1] * x.shape[2]
            new_s = {"mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * mean,
                     "var": BN_MOMENTUM * s["var"] + (1 - BN_MOMENTUM) * var * n / (n - 1)}
        else:
            mean, var, new_s = s["mean"], s["var"], s
        y = (x - mean) * lax.rsqrt(var + BN_EPS) * p["gamma"] + p["beta"]
        return y, new_s

    def forward(params, state, x, train):
        new_state = {}
        h, st = bn(conv(x, params["stem"]["w"], 1), params["stem"]["bn"], state["stem"], train)
        new_state["stem"] = st
        h = jax.nn.relu(h)
        for name, cin, cout, stride in block_specs():
            p, s = params[name], state[name]
            ns = {}
            y, ns["bn1"] = bn(conv(h, p["w1"], stride), p["bn1"], s["bn1"], train)
            y = jax.nn.relu(y)
            y, ns["bn2"] = bn(conv(y, p["w2"], 1), p["bn2"], s["bn2"], train)
            if "ws" in p:
                sc, ns["bns"] = bn(conv(h, p["ws"], stride), p["bns"], s["bns"], train)
            else:
                sc = h
            h = jax.nn.relu(y + sc)
            new_state[name] = ns
        feat = jnp.mean(h, axis=(1, 2))
        logits = feat @ params["fc"]["w"] + params["fc"]["b"]
        return logits, new_state

    return forward


def architecture_summary() -> str:
    res, parts = 28, [f"stem conv3x3 1->{STAGES[0]}-BN-ReLU @28x28"]
    cin = STAGES[0]
    for name, bcin, cout, stride in block_specs():
        res = (res + 2 - 3) // stride + 1
        proj = " +1x1 projection" if (stride != 1 or bcin != cout) else ""
        parts.append(f"{name} {bcin}->{cout} stride {stride}{proj} @{res}x{res}")
    parts.append(f"GAP; linear {STAGES[-1]}->10; BN folded into convs")
    return "; ".join(parts)


def param_count(params) -> int:
    jax = require("jax")
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- training

def train(args, src):
    np = require("numpy")
    jax = require("jax", "jax", "requirements-train.txt")
    jnp = jax.numpy

    xtr, ytr = fmnist_data.load_split(src, "train")
    xte, yte = fmnist_data.load_split(src, "test")
    norm = lambda a: ((a.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[..., None]
    xtr, xte = norm(xtr), norm(xte)
    ytr, yte = ytr.astype(np.int32), yte.astype(np.int32)
    print(f"[train] train {xtr.shape}, test {xte.shape}; jax {jax.__version__} on {jax.devices()}")

    params, state = init_params(args.seed)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = jax.tree_util.tree_map(jnp.asarray, state)
    mom = jax.tree_util.tree_map(jnp.zeros_like, params)
    n_params = param_count(params)
    print(f"[train] params: {n_params}")
    forward = make_forward()

    # weight decay only on conv / linear weights (not BN, not biases)
    wd_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: str(path[-1].key if hasattr(path[-1], "key") else path[-1]).startswith("w"), params)

    def loss_fn(params, state, x, y):
        logits, new_state = forward(params, state, x, True)
        logp = jax.nn.log_softmax(logits)
        onehot = jax.nn.one_hot(y, 10)
        target = onehot * (1 - args.label_smoothing) + args.label_smoothing / 10
        loss = -jnp.mean(jnp.sum(target * logp, axis=1))
        return loss, (new_state, logits)

    @jax.jit
    def train_step(params, state, mom, x, y, lr):
        (loss, (new_state, logits)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        g = jax.tree_util.tree_map(lambda g, p, m: g + args.weight_decay * p * m, g, params, wd_mask)
        mom = jax.tree_util.tree_map(lambda m, g: args.momentum * m + g, mom, g)
        # Nesterov momentum SGD
        params = jax.tree_util.tree_map(lambda p, m, g: p - lr * (g + args.momentum * m), params, mom, g)
        correct = jnp.sum(jnp.argmax(logits, 1) == y)
        return params, new_state, mom, loss, correct

    @jax.jit
    def eval_logits(params, state, x):
        return forward(params, state, x, False)[0]

    def evaluate(params, state, x, y, bs=1000):
        outs = [np.asarray(eval_logits(params, state, x[i:i + bs])) for i in range(0, len(x), bs)]
        logits = np.concatenate(outs)
        return float((logits.argmax(1) == y).mean()), logits

    rng = np.random.default_rng(args.seed)
    bs = args.batch_size
    steps_per_epoch = len(xtr) // bs  # drop last partial batch: one compiled shape
    total = steps_per_epoch * args.epochs
    warm = max(1, int(total * args.warmup_frac))

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return args.lr * 0.5 * (1 + np.cos(np.pi * t))

    pad = args.crop_pad
    if pad:
        xtr_p = np.pad(xtr, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    t_start = time.time()
    step = 0
    history = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        perm = rng.permutation(len(xtr))
        correct_sum, seen = 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            if pad:
                # random translation by up to `pad` pixels: crop a 28x28 window out of
                # the background-padded image (cheap numpy gather)
                ox = rng.integers(0, 2 * pad + 1, bs)
                oy = rng.integers(0, 2 * pad + 1, bs)
                rows = oy[:, None] + np.arange(28)[None, :]
                cols = ox[:, None] + np.arange(28)[None, :]
                xb = xtr_p[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
            else:
                xb = xtr[idx]
            if args.flip:
                f = rng.random(bs) < 0.5
                xb[f] = xb[f, :, ::-1]
            yb = ytr[idx]
            params, state, mom, loss, correct = train_step(params, state, mom, xb, yb,
                                                           np.float32(lr_at(step)))
            step += 1
            correct_sum = correct_sum + correct  # stays on device: no per-step sync
            seen += bs
            if args.bench:
                if step == 3:
                    loss.block_until_ready()
                    t_bench = time.time()
                elif step == 3 + args.bench:
                    loss.block_until_ready()
                    dt = (time.time() - t_bench) / args.bench
                    print(f"[bench] {dt * 1000:.0f} ms/step at batch {bs} "
                          f"-> {dt * steps_per_epoch:.0f} s/epoch (compile+3 steps: {t_bench - t0:.1f}s)")
                    sys.exit(0)
        correct_sum = int(correct_sum)
        t_train = time.time() - t0
        acc, _ = evaluate(params, state, xte, yte)
        dt = time.time() - t0
        history.append({"epoch": epoch, "train_acc": correct_sum / seen, "test_acc": acc,
                        "epoch_seconds": round(dt, 1)})
        print(f"[train] epoch {epoch:2d}/{args.epochs}  train_acc {correct_sum / seen * 100:5.2f}%  "
              f"test_acc {acc * 100:5.2f}%  loss {float(loss):.3f}  "
              f"time {t_train:.0f}s (+eval {dt - t_train:.0f}s)  total {time.time() - t_start:.0f}s",
              flush=True)
    train_seconds = time.time() - t_start
    acc, logits = evaluate(params, state, xte, yte)
    params_np = jax.tree_util.tree_map(np.asarray, params)
    state_np = jax.tree_util.tree_map(np.asarray, state)
    info = {"epochs": args.epochs, "train_seconds": round(train_seconds, 1), "history": history,
            "jax_version": jax.__version__, "param_count": n_params, "jax_test_accuracy": acc}
    return params_np, state_np, info, logits


def flatten_tree(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_tree(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten_tree(flat):
    tree = {}
    for k, v in flat.items():
        parts = k.split("/")
        d = tree
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return tree


def save_params(params, state, info, path=PARAMS_NPZ):
    import io
    np = require("numpy")
    flat = {f"params/{k}": v for k, v in flatten_tree(params).items()}
    flat.update({f"state/{k}": v for k, v in flatten_tree(state).items()})
    flat["info_json"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    atomic_write_bytes(path, buf.getvalue())


def load_params(path=PARAMS_NPZ):
    np = require("numpy")
    if not path.is_file():
        raise PrereqError(f"{path} not found: run without --export-only to train first")
    with np.load(path) as z:
        info = json.loads(bytes(z["info_json"]).decode())
        params = unflatten_tree({k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")})
        state = unflatten_tree({k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")})
    return params, state, info


# ----------------------------------------------------------------------------- export

def fold_bn(w_hwio, p, s):
    """Fold BN into a bias-free conv; returns (OIHW weight, bias)."""
    np = require("numpy")
    scale = p["gamma"] / np.sqrt(s["var"] + BN_EPS)
    w = (w_hwio * scale).transpose(3, 2, 0, 1)  # HWIO * per-O scale -> OIHW
    b = p["beta"] - s["mean"] * scale
    return np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)


def export_onnx(params, state):
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def conv(name, x, w_hwio, p, s, stride, out):
        w, b = fold_bn(w_hwio, p, s)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        inits.append(numpy_helper.from_array(b, f"{name}.bias"))
        k = w.shape[2]
        pd = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[pd, pd, pd, pd], dilations=[1, 1], group=1))
        return out

    def relu(name, x, out):
        nodes.append(helper.make_node("Relu", [x], [out], name=name))
        return out

    h = conv("stem_conv", "input", params["stem"]["w"], params["stem"]["bn"], state["stem"], 1, "stem_conv_out")
    h = relu("stem_relu", h, "stem_out")
    for name, cin, cout, stride in block_specs():
        p, s = params[name], state[name]
        y = conv(f"{name}_conv1", h, p["w1"], p["bn1"], s["bn1"], stride, f"{name}_conv1_out")
        y = relu(f"{name}_relu1", y, f"{name}_relu1_out")
        y = conv(f"{name}_conv2", y, p["w2"], p["bn2"], s["bn2"], 1, f"{name}_conv2_out")
        if "ws" in p:
            sc = conv(f"{name}_shortcut", h, p["ws"], p["bns"], s["bns"], stride, f"{name}_shortcut_out")
        else:
            sc = h
        nodes.append(helper.make_node("Add", [y, sc], [f"{name}_add_out"], name=f"{name}_add"))
        h = relu(f"{name}_relu", f"{name}_add_out", f"{name}_out")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap_out"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap_out"], ["features"], name="flatten", axis=1))
    inits.append(numpy_helper.from_array(params["fc"]["w"].astype("float32"), "fc.weight"))
    inits.append(numpy_helper.from_array(params["fc"]["b"].astype("float32"), "fc.bias"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc",
                                  alpha=1.0, beta=1.0, transA=0, transB=0))
    graph = helper.make_graph(
        nodes, "fmnist_resnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gati scripts/models/train_fmnist_resnet.py",
                              producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = (
        "ResNet (stem + 6 basic blocks, 16/32/64 ch) trained on Fashion-MNIST with JAX. "
        f"Input 'input' float32 [N,1,28,28] NCHW, pre-normalised: (pixel/255 - {FMNIST_MEAN}) / {FMNIST_STD}. "
        "Output 'logits' float32 [N,10]. Classes: " + ", ".join(FMNIST_CLASSES))
    helper.set_model_props(model, {
        "input_layout": "NCHW",
        "normalisation": f"(x/255 - {FMNIST_MEAN}) / {FMNIST_STD}",
        "classes": json.dumps(FMNIST_CLASSES),
    })
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_accuracy(model_path: Path, src: Path):
    """(accuracy, logits) of an exported model on the 10k test set via onnxruntime."""
    np = require("numpy")
    ort = require("onnxruntime")
    xte, yte = fmnist_data.load_split(src, "test")
    x = ((xte.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    outs = [sess.run(["logits"], {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)]
    logits = np.concatenate(outs)
    return float((logits.argmax(1) == yte).mean()), logits


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    global CONV_IMPL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--warmup-frac", type=float, default=0.03)
    ap.add_argument("--crop-pad", type=int, default=0, help="random translation augmentation (pixels)")
    ap.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                    help="random horizontal flip augmentation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-strides", default=",".join(map(str, STAGE_STRIDES)),
                    help="stride of the first block of each stage (recorded in the JSON)")
    ap.add_argument("--note", default="", help="free-text note stored in the JSON")
    ap.add_argument("--conv-impl", choices=["im2col", "lax"], default=CONV_IMPL)
    ap.add_argument("--bench", type=int, default=0, help="time N training steps and exit")
    ap.add_argument("--export-only", action="store_true",
                    help=f"skip training, export from {rel(PARAMS_NPZ)}")
    ap.add_argument("--out", type=Path, default=MODELS_DIR / "fmnist_resnet.onnx")
    args = ap.parse_args(argv)
    CONV_IMPL = args.conv_impl
    STAGE_STRIDES[:] = [int(v) for v in args.stage_strides.split(",")]
    if len(STAGE_STRIDES) != len(STAGES):
        die(f"--stage-strides needs {len(STAGES)} values")

    try:
        src = fmnist_data.find_source_dir()
        require("numpy")
        require("onnx")
        require("onnxruntime")
        if not args.export_only:
            require("jax", "jax", "requirements-train.txt")
    except PrereqError as e:
        die(str(e))

    if args.export_only:
        params, state, info = load_params()
        hp = info.setdefault("hyperparameters", {})
        hp.setdefault("conv_impl", args.conv_impl)
        if "stage_strides" in hp:
            STAGE_STRIDES[:] = hp["stage_strides"]
        else:
            hp["stage_strides"] = list(STAGE_STRIDES)
        if args.note:
            info["note"] = args.note
            save_params(params, state, info)  # keep the note for later re-exports
        jax_logits = None
    else:
        params, state, info, jax_logits = train(args, src)
        info["hyperparameters"] = {k: getattr(args, k) for k in
                                   ("epochs", "batch_size", "lr", "momentum", "weight_decay",
                                    "label_smoothing", "warmup_frac", "crop_pad", "flip", "seed",
                                    "conv_impl")}
        info["hyperparameters"]["stage_strides"] = list(STAGE_STRIDES)
        if args.note:
            info["note"] = args.note
        save_params(params, state, info)
        print(f"[train] saved raw parameters to {rel(PARAMS_NPZ)}")

    model = export_onnx(params, state)
    data = model.SerializeToString()
    if len(data) >= MAX_ONNX_BYTES:
        die(f"ONNX model is {len(data)} bytes, limit {MAX_ONNX_BYTES}")
    atomic_write_bytes(args.out, data)
    print(f"[export] wrote {rel(args.out)} ({len(data) / 1e6:.2f} MB, opset {OPSET})")

    ort_acc, ort_logits = onnx_accuracy(args.out, src)
    jax_acc = info["jax_test_accuracy"]
    print(f"[verify] test accuracy: JAX {jax_acc * 100:.2f}%  onnxruntime {ort_acc * 100:.2f}%")
    if jax_logits is not None:
        import numpy as np
        d = float(np.abs(jax_logits - ort_logits).max())
        print(f"[verify] max |logit diff| JAX vs onnxruntime: {d:.2e}")
    ok = True
    if abs(ort_acc - jax_acc) > MAX_ACC_DIFF:
        print(f"ERROR: onnxruntime accuracy differs from JAX by more than {MAX_ACC_DIFF * 100:.1f}%",
              file=sys.stderr)
        ok = False
    if ort_acc < MIN_ACC:
        print(f"ERROR: accuracy {ort_acc * 100:.2f}% below {MIN_ACC * 100:.0f}%", file=sys.stderr)
        ok = False

    meta = {
        "model": rel(args.out),
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test",
        "test_accuracy": round(ort_acc, 4),
        "test_accuracy_onnxruntime": ort_acc,
        "test_accuracy_jax": jax_acc,
        "epochs": info["epochs"],
        "train_seconds": info["train_seconds"],
        "param_count": info["param_count"],
        "date": info.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": {"name": "input", "dtype": "float32", "shape": ["N", 1, 28, 28], "layout": "NCHW",
                  "normalisation": {"scale": 1 / 255.0, "mean": FMNIST_MEAN, "std": FMNIST_STD,
                                    "formula": "(pixel/255 - mean) / std"}},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", 10]},
        "classes": FMNIST_CLASSES,
        "intermediate_tensors": ["stem_out"] + [f"block{i}_out" for i in range(1, 7)],
        "architecture": architecture_summary(),
        "training": {"note": info.get("note", ""), "framework": f"jax {info.get('jax_version')}", "optimizer": "SGD nesterov, cosine lr",
                     "hyperparameters": info.get("hyperparameters"), "history": info.get("history"),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip()},
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION, "bytes": len(data)},
    }
    if not args.export_only:
        info["date"] = meta["date"]
        save_params(params, state, info)  # remember the training date for re-exports
    meta_path = args.out.with_suffix(".json")
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"[export] wrote {rel(meta_path)}")
    if not ok:
        return 1
    print(f"[verify] OK: {ort_acc * 100:.2f}% >= {MIN_ACC * 100:.0f}%, export matches JAX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
