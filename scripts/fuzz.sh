#!/usr/bin/env bash
# Runs every fuzz target for a short while (FUZZ_SECONDS each, 30 by default) and exits non-zero,
# naming the crashing input, when the fuzzer finds a crash, a timeout or an out-of-memory.
#
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept
# them. cargo-fuzz itself is installed from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
TARGETS=(load_asset decode_messages decode_correspondences parse_run_file)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

# New corpus entries go to a scratch folder; the committed seeds are only read.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

status=0
for target in "${TARGETS[@]}"; do
    mkdir -p "$scratch/$target"
    echo "fuzzing $target for ${FUZZ_SECONDS}s"
    if ! cargo fuzz run --fuzz-dir fuzz "$target" "$scratch/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "FUZZ FAILURE: target $target found a crashing input; see fuzz/artifacts/$target/:" >&2
        ls -l "fuzz/artifacts/$target" >&2 || true
        status=1
    fi
done
exit "$status"
