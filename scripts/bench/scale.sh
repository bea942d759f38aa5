#!/usr/bin/env bash
# The scale benchmark: syncd's control plane with a simulated fleet, and Celery on the same broker
# and database with the same reliability settings, side by side, with and without S3 traffic.
#
# Usage: scripts/bench/scale.sh [OBJECTS] (default 10000; jobs = 2 x OBJECTS)
#   WORKERS=16   simulated syncd workers, and Celery worker processes
#   MODES="noop s3"  which work to compare: no-op (S3 traffic off) and with S3 traffic; at 100K
#                objects the S3 pair alone takes over an hour here, so MODES=noop measures the
#                control plane by itself
#   PROFILE=dev  reuses the debug build (dependencies at opt-level 2, the workspace's own crates
#                unoptimised: syncd's figures are then pessimistic) instead of a release build
#
# Builds the release binaries, makes a bench venv with Celery at $SYNCD_CACHE/bench-venv, runs
# target/release/syncd-bench-scale (see its documentation) and scripts/bench/celery_bench.py for
# the same number of jobs, and prints syncd's jobs/s over Celery's. Minutes to hours: never in CI.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
# shellcheck source=scripts/env.sh
. "$REPO_ROOT/scripts/env.sh"
set -a
# shellcheck disable=SC1091
. "$SYNCD_CACHE/services.env"
set +a

OBJECTS="${1:-10000}"
WORKERS="${WORKERS:-16}"
JOBS=$((2 * OBJECTS))
BENCH_VENV="$SYNCD_CACHE/bench-venv"
read -r -a MODES <<<"${MODES:-noop s3}"
for mode in "${MODES[@]}"; do
    [[ "$mode" == noop || "$mode" == s3 ]] || {
        echo "scale.sh: unknown mode '$mode' in MODES (noop, s3)" >&2
        exit 2
    }
done

cd "$REPO_ROOT"
PROFILE="${PROFILE:-release}"
cargo build --profile "$PROFILE" --locked -p syncd-tests -p syncd-coordinator --bins
BIN_DIR="$CARGO_TARGET_DIR/$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")"
if [[ ! -x "$BENCH_VENV/bin/celery" ]]; then
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install --quiet "celery[sqlalchemy]==5.7.*" psycopg2-binary boto3
fi

# The figure $1 of the last JSON line of stdin (a Celery worker may print after it at exit).
figure() {
    python3 -c "import json,sys; print(json.loads([l for l in sys.stdin.read().splitlines() if l.startswith('{')][-1])['$1'])"
}
declare -A ours theirs
for mode in "${MODES[@]}"; do
    skip=()
    [[ "$mode" == noop ]] && skip=(--skip-s3)
    echo "==> syncd, S3 traffic $([[ $mode == noop ]] && echo off || echo on)"
    out="$("$BIN_DIR/syncd-bench-scale" --objects "$OBJECTS" --workers "$WORKERS" "${skip[@]}" --json)"
    echo "$out" | grep -v '^{'
    ours[$mode]="$(echo "$out" | figure jobs_per_second)"
    echo "==> Celery, $mode work"
    out="$("$BENCH_VENV/bin/python" scripts/bench/celery_bench.py --tasks "$JOBS" --workers "$WORKERS" --work "$mode" --json)"
    echo "$out" | grep -v '^{'
    theirs[$mode]="$(echo "$out" | figure tasks_per_second)"
done
echo
echo "| work | syncd jobs/s | Celery tasks/s | syncd / Celery |"
echo "| --- | ---: | ---: | ---: |"
for mode in "${MODES[@]}"; do
    python3 -c "print(f'| $mode | {${ours[$mode]}:.0f} | {${theirs[$mode]}:.0f} | {${ours[$mode]}/${theirs[$mode]}:.2f}x |')"
done
