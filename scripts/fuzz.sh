#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/*.rs) for a bounded time, one at a
# time, and prints one line per target: target, executions, crashes, exec/s.
# Exits non-zero when any target crashed (the input is under
# fuzz/artifacts/<target>/; reproduce with `cargo +nightly fuzz run <target> <file>`).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s per target, all targets
#
# Environment: FUZZ_RSS_MB (default 2048) caps a run's memory and FUZZ_MALLOC_MB
# (default 1024) any single allocation (both count as crashes); FUZZ_SANITIZER
# (default address; `none` runs faster); FUZZ_RUNS stops each target after that
# many executions (the time limit still applies). See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
rss_mb=${FUZZ_RSS_MB:-2048}
malloc_mb=${FUZZ_MALLOC_MB:-1024}
sanitizer=${FUZZ_SANITIZER:-address}
runs=${FUZZ_RUNS:-}

# The tools, installed once (both steps are no-ops when already there).
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if (($# > 0)); then
    targets=("$@")
else
    targets=()
    for f in fuzz/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

# Seeds that are generated, not committed: the real models are megabytes, so
# only their prefixes (truncated models) join the corpus; the whole files are
# run once through the target below, as a check that real models pass.
seed_onnx() {
    local dir=fuzz/corpus/onnx m name
    mkdir -p "$dir"
    for m in models/*.onnx; do
        [[ -f $m ]] || continue
        name=$(basename "$m" .onnx)
        for n in 16 512 4096 16384; do
            head -c "$n" "$m" >"$dir/gen-$name-head$n"
        done
    done
}

log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
failed=0
if ! cargo +nightly fuzz build --sanitizer "$sanitizer" >"$log_dir/build.log" 2>&1; then
    tail -40 "$log_dir/build.log" >&2
    exit 2
fi
bin_dir=fuzz/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
printf '%-8s %12s %7s %10s\n' target executions crashes exec/s
for t in "${targets[@]}"; do
    if [[ ! -f fuzz/fuzz_targets/$t.rs ]]; then
        echo "no fuzz target $t" >&2
        exit 2
    fi
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    extra=()
    case $t in
        onnx)
            seed_onnx
            extra=(-max_len=16384)
            whole=()
            for m in models/*.onnx; do [[ -f $m ]] && whole+=("$m"); done
            # Files (not a directory) make libFuzzer run each once and stop.
            if ((${#whole[@]} > 0)) && ! "$bin_dir/onnx" "${whole[@]}" >"$log_dir/onnx-models.log" 2>&1; then
                echo "onnx: a real model crashed the target:" >&2
                tail -30 "$log_dir/onnx-models.log" >&2
                failed=1
            fi
            ;;
        config) extra=(-max_len=8192) ;;
        ring) extra=(-max_len=2048) ;;
        *) extra=(-max_len=4096) ;;
    esac
    if [[ -n $runs ]]; then extra+=(-runs="$runs"); fi
    before=$(find "fuzz/artifacts/$t" -type f | wc -l)
    log="$log_dir/$t.log"
    set +e
    cargo +nightly fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" -timeout=10 \
        -print_final_stats=1 "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "fuzz/artifacts/$t" -type f | wc -l)
    crashes=$((after - before))
    if ((rc != 0 && crashes == 0)); then crashes=1; fi
    # libFuzzer's final statistics; a crashed run may have none, so the last
    # status line (#N ...) counts instead.
    execs=$(awk '/stat::number_of_executed_units:/ { v = $2 } END { print v }' "$log")
    rate=$(awk '/stat::average_exec_per_sec:/ { v = $2 } END { print v }' "$log")
    if [[ -z $execs ]]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
        execs=${execs:-0}
        rate=-
    fi
    printf '%-8s %12s %7s %10s\n' "$t" "$execs" "$crashes" "$rate"
    if ((crashes > 0)); then
        failed=1
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -8 >&2 || true
    fi
done
exit "$failed"
