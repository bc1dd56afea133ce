#!/usr/bin/env bash
# Runs the whole test suite (after the same set-up as the README's first command).
# Tests that need root skip with a printed reason when run unprivileged.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export ORT_DYLIB_PATH="$(pwd)/.venv/libonnxruntime.so"
cargo test --release --workspace -- --test-threads=2 "$@"
