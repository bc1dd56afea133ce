#!/usr/bin/env bash
# Hardware-in-loop check of gati's GPU path (issue 13), one call, < 5 min on an H200.
#
#   tests/hil/gpu.sh            on a machine with an NVIDIA GPU and driver
#   tests/hil/gpu.sh --dry-run  anywhere: the CPU parts only (CI's machine)
#
# Needs nothing fetched. It uses what the machine has: `cargo` if present to
# build (else a prebuilt target/release/gatid, or $GATI_HIL_BIN/gatid, carried
# along), python3 with torch + onnx + onnxruntime (the H200 image has them;
# the dry run uses .venv), and the CUDA libraries of the machine's nvidia-*
# Python wheels (NVRTC, cuBLAS, cuDNN) or its CUDA toolkit. The models and
# data come from scripts/setup.sh on the build machine (models/, data/).
# ORT_DYLIB_PATH, when set, wins over the Python environment's onnxruntime:
# gatid is built for ONNX Runtime >= 1.31 (ort's api-31) and the H200 image
# has 1.30, so bring the onnxruntime==1.31.1 wheel there and point at its
# onnxruntime/capi/libonnxruntime.so.1.31.1.
#
# Steps: 1 binary  2 libraries  3 PyTorch eager timings  4 kernels under
# compute-sanitizer memcheck (where the runtime allows)  5 `gatid bench gpu`:
# kernels vs CPU references, executor vs ONNX Runtime, timings, JSON
# (bench/results/gpu.json)  6 the system tests of the GPU path, if cargo is here.
set -euo pipefail
cd "$(dirname "$0")/../.."
dry=0
[ "${1:-}" = --dry-run ] && dry=1
say() { printf '\033[1m[hil]\033[0m %s\n' "$*"; }
t0=$(date +%s)

# 1. The binary.
if command -v cargo >/dev/null; then
  say "cargo build --release (gatid)"
  cargo build --release --quiet -p gatid --bin gatid
fi
gatid=${GATI_HIL_BIN:-target/release}/gatid
[ -x "$gatid" ] || { echo "no $gatid: build it where cargo is (cargo build --release) and bring it" >&2; exit 1; }

# 2. Libraries: ONNX Runtime and CUDA's, from the Python environment.
if [ $dry = 1 ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=${GATI_HIL_PYTHON:-python3}; fi
eval "$("$py" - <<'PY'
import glob, os, site, sys
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
ort = [f for r in roots for f in glob.glob(os.path.join(r, "onnxruntime/capi/libonnxruntime.so.*"))]
libs = sorted({os.path.dirname(f) for r in roots for f in glob.glob(os.path.join(r, "nvidia/**/lib*.so*"), recursive=True)})
libs += [d for d in ("/usr/local/cuda/lib64", "/usr/local/nvidia/lib64") if os.path.isdir(d)]
if ort and not os.environ.get("ORT_DYLIB_PATH"):
    print(f"export ORT_DYLIB_PATH={ort[0]}")
print("export GATI_CUDA_LIBRARY_PATH=" + ":".join(libs))
PY
)"
[ -f "${ORT_DYLIB_PATH:-}" ] || { echo "no ONNX Runtime library in $py's site-packages" >&2; exit 1; }
export LD_LIBRARY_PATH="${GATI_CUDA_LIBRARY_PATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "ONNX Runtime: $ORT_DYLIB_PATH"
say "CUDA library folders: ${GATI_CUDA_LIBRARY_PATH:-none}"
for f in models/fmnist_resnet.onnx models/cifar10_cnn.onnx data/fashion-mnist/t10k-images-idx3-ubyte; do
  [ -e "$f" ] || { echo "missing $f: run scripts/setup.sh on the build machine and bring models/ and data/" >&2; exit 1; }
done
mkdir -p bench/results

if [ $dry = 1 ]; then
  say "dry run: PyTorch eager graph check (no timing)"
  "$py" tests/hil/torch_eager.py --dry-run
  say "dry run: gatid bench gpu --dry-run (references; lowered plans on the CPU vs ONNX Runtime)"
  "$gatid" bench gpu --dry-run --out "${TMPDIR:-/tmp}/gati-gpu-dry-run.json"
  say "dry run done in $(( $(date +%s) - t0 )) s"
  exit 0
fi

# 3. PyTorch eager on the same weights.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
say "PyTorch eager timings"
PYTHONUNBUFFERED=1 "$py" tests/hil/torch_eager.py --out bench/results/torch_eager.json

# 4. The kernels under compute-sanitizer (memcheck), where the runtime allows it.
if command -v compute-sanitizer >/dev/null; then
  say "compute-sanitizer memcheck: kernels"
  set +e
  compute-sanitizer --tool memcheck --error-exitcode 3 "$gatid" bench gpu --kernels-only --out "${TMPDIR:-/tmp}/gati-gpu-memcheck.json"
  rc=$?
  set -e
  if [ $rc = 3 ]; then echo "memcheck found errors" >&2; exit 3; fi
  [ $rc = 0 ] || say "compute-sanitizer could not run here (exit $rc): skipped"
else
  say "no compute-sanitizer on this machine: memcheck skipped"
fi

# 5. The check and the JSON.
say "gatid bench gpu"
"$gatid" bench gpu --torch-json bench/results/torch_eager.json --out bench/results/gpu.json

# 6. The GPU path's system tests, where they can be built.
if command -v cargo >/dev/null; then
  say "cargo test: kernels, gpu_fallback"
  cargo test --release -q -p gati-kernels -- --test-threads=4
  cargo test --release -q -p gatid --test gpu_fallback -- --test-threads=2
fi
say "done in $(( $(date +%s) - t0 )) s"
