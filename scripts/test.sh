#!/usr/bin/env bash
# Runs the whole test suite (after the same set-up as the README's first command).
# Tests that need root skip with a printed reason when run unprivileged.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export ORT_DYLIB_PATH="$(pwd)/.venv/libonnxruntime.so"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: every test binary runs, so one failure does not hide others.
cargo test --release --workspace --no-fail-fast -- --test-threads=2 "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# The fuzz targets are their own workspace (docs/fuzzing.md), so the test
# build never compiles them: check that they still build against the library
# (stable toolchain, no instrumentation; ~1.5 min from nothing on 2 cores).
if ! cargo check --manifest-path fuzz/Cargo.toml --bins --quiet 2>&1 | tee -a "$log"; then
    echo "fuzz targets: do not compile (cargo check --manifest-path fuzz/Cargo.toml --bins)"
    rc=1
fi
set -e
# One closing line for the whole suite (cargo prints one per test binary).
# Ignored tests are the root-only ones in a build without root (daemon/build.rs):
# they are counted as skipped, and their reasons listed.
grep -E '^test .* \.\.\. ignored' "$log" | sed 's/^/skipped: /' || true
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$rc"
