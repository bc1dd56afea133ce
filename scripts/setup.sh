#!/usr/bin/env bash
# Installs everything gati needs on a fresh Debian machine and builds it.
# Idempotent: a second run only checks. `scripts/setup.sh run` then starts the
# daemon in the foreground on the default CPU config (configs/cpu.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages: the Fashion-MNIST data set; the real video of the cache
#    workloads (opencv-doc ships vtest.avi); systemd tools for the unit tests
#    (systemd-analyze, systemd-socket-activate); promtool for the metrics test
#    (tests/operator.rs; Debian ships it only in the server package, whose
#    service is neither started nor needed); clang + libbpf-dev build the eBPF
#    steering program (ebpf/*.bpf.c; without them gatid builds and reports
#    kernel steering unavailable); util-linux (setpriv, unshare) and iproute2 (ip)
#    for the steering tests' private network namespaces; etcd-server (3.4,
#    /usr/bin/etcd) for the cluster's membership and arbiter election (the test
#    tests/cluster_etcd.rs starts its own; the packaged service is not needed)
#    and protobuf-compiler (protoc) for the etcd-client crate's build, with
#    libprotobuf-dev for the well-known types it imports
#    (google/protobuf/descriptor.proto: only a Recommends of protoc's package,
#    which --no-install-recommends skips).
apt_pkgs=(dataset-fashion-mnist opencv-doc systemd prometheus clang libbpf-dev util-linux iproute2 etcd-server protobuf-compiler libprotobuf-dev)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  say "apt: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Python venv with ONNX Runtime (its shared library is what gatid loads),
#    the conversion tools and NVRTC (the tests compile kernels/cu/*.cu to PTX
#    with it; no GPU needed); then the models and data sets.
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.gati-requirements
want=$(cat scripts/models/requirements.txt scripts/models/requirements-nodeps.txt scripts/workloads/requirements.txt kernels/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "pip: installing scripts/models/requirements*.txt"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/models/requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r scripts/models/requirements-nodeps.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/workloads/requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check -r kernels/requirements.txt
  echo "$want" > "$stamp"
fi
ort=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)
ln -sfn "$root/$ort" .venv/libonnxruntime.so
say "ONNX Runtime: $ort"
.venv/bin/python scripts/models/prepare.py
.venv/bin/python scripts/workloads/prepare.py

# 3. Build.
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (stable >= 1.95) first" >&2
  exit 1
fi
say "cargo build --release"
cargo build --release --quiet
say "done: target/release/gatid, target/release/gatictl"

if [ "${1:-}" = run ]; then
  config=${GATI_CONFIG:-configs/cpu.toml}
  say "starting gatid on $config (Ctrl-C stops it; gatictl talks to it from another shell)"
  exec target/release/gatid serve --config "$config"
fi
