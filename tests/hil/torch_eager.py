#!/usr/bin/env python3
"""PyTorch eager on the same weights as gati's GPU executor: each ONNX model
gati serves is rebuilt as a list of torch ops (one eager call per ONNX node,
the baseline the issue compares with), checked against ONNX Runtime's answer,
and timed at batch 1 and 32 on the GPU (CUDA events, median of 50 after 10
warm-ups). Writes {model: {b1_ms, b32_ms, max_abs_diff_vs_ort}} as JSON.

--dry-run: no torch needed; only reads each graph and checks every node is
one this script can run (what CI's machine can do)."""
import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

KNOWN = {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "MaxPool", "GlobalAveragePool", "ReduceMean",
         "Flatten", "Reshape", "Gemm", "MatMul", "Transpose", "Identity", "Dropout", "Constant"}

MODELS = {"fmnist_resnet": ("models/fmnist_resnet.onnx", (1, 28, 28)),
          "cifar10_cnn": ("models/cifar10_cnn.onnx", (32, 32, 3))}
# The real-model issue's ImageNet model, where its set-up made it.
if os.path.exists("models/efficientnet_lite2.onnx"):
    MODELS["efficientnet_lite2"] = ("models/efficientnet_lite2.onnx", (3, 260, 260))


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def graph_of(path):
    m = onnx.load(path)
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type not in KNOWN:
            raise SystemExit(f"{path}: node {n.name} ({n.op_type}) is not supported by torch_eager.py")
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(attrs(n)["value"])
    inputs = [i.name for i in g.input if i.name not in consts]
    return g, consts, inputs[0], g.output[0].name


def build(path, torch, dev):
    """A function x -> y running the graph op by op in eager mode."""
    F = torch.nn.functional
    g, consts, inp, out = graph_of(path)
    w = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in consts.items() if v.dtype == np.float32}

    def run(x):
        env = {inp: x}
        val = lambda name: env[name] if name in env else w[name]
        for n in g.node:
            a, op = attrs(n), n.op_type
            if op == "Constant":
                continue
            x0 = val(n.input[0])
            if op == "Conv":
                pads = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(x0, w[n.input[1]], w[n.input[2]] if len(n.input) > 2 and n.input[2] else None,
                             stride=a.get("strides", [1, 1]), padding=(pads[0], pads[1]),
                             dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
            elif op == "BatchNormalization":
                y = F.batch_norm(x0, w[n.input[3]], w[n.input[4]], w[n.input[1]], w[n.input[2]], False, 0.0,
                                 a.get("epsilon", 1e-5))
            elif op == "Relu":
                y = torch.relu(x0)
            elif op == "Clip":
                lo = float(consts[n.input[1]]) if len(n.input) > 1 and n.input[1] else a.get("min", -np.inf)
                hi = float(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] else a.get("max", np.inf)
                y = torch.clamp(x0, lo, hi)
            elif op == "Add":
                y = x0 + val(n.input[1])
            elif op == "MaxPool":
                pads = a.get("pads", [0, 0, 0, 0])
                y = F.max_pool2d(x0, a["kernel_shape"], a.get("strides", a["kernel_shape"]), (pads[0], pads[1]))
            elif op == "GlobalAveragePool":
                y = x0.mean(dim=(2, 3), keepdim=True)
            elif op == "ReduceMean":
                y = x0.mean(dim=tuple(a.get("axes", [2, 3])), keepdim=bool(a.get("keepdims", 1)))
            elif op == "Flatten":
                y = torch.flatten(x0, a.get("axis", 1))
            elif op == "Reshape":
                shape = [int(s) for s in consts[n.input[1]]]
                y = x0.reshape([x0.shape[0] if s == 0 else s for s in shape])
            elif op in ("Gemm", "MatMul"):
                b = w[n.input[1]]
                if op == "Gemm" and a.get("transB", 0):
                    b = b.t()
                y = x0 @ b * (a.get("alpha", 1.0) if op == "Gemm" else 1.0)
                if op == "Gemm" and len(n.input) > 2 and n.input[2]:
                    y = y + a.get("beta", 1.0) * w[n.input[2]]
            elif op == "Transpose":
                y = x0.permute(*a["perm"])
            else:  # Identity, Dropout
                y = x0
            env[n.output[0]] = y
        return env[out]

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default="bench/results/torch_eager.json")
    args = ap.parse_args()
    if args.dry_run:
        for name, (path, _) in MODELS.items():
            g, _, _, _ = graph_of(path)
            print(f"{name}: {len(g.node)} nodes, all supported (dry run: not timed)")
        return
    import torch
    import onnxruntime as ort
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result = {}
    for name, (path, row) in MODELS.items():
        run = build(path, torch, dev)
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        probe = np.random.default_rng(0).random((4, *row), dtype=np.float32)
        want = sess.run(None, {sess.get_inputs()[0].name: probe})[0]
        with torch.no_grad():
            got = run(torch.from_numpy(probe).to(dev)).cpu().numpy()
            r = {"max_abs_diff_vs_ort": float(np.abs(got - want).max())}
            for b in (1, 32):
                x = torch.from_numpy(np.random.default_rng(b).random((b, *row), dtype=np.float32)).to(dev)
                for _ in range(10):
                    run(x)
                times = []
                for _ in range(50):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    run(x)
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e))
                r[f"b{b}_ms"] = float(np.median(times))
        result[name] = r
        print(f"{name}: {r}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
