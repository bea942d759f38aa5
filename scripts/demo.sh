#!/usr/bin/env bash
# Runs the whole factory once, end to end, on this machine: set-up, release build, a coordinator
# and two workers, the demo run from deploy/demo/run.toml, and the finished dataset in S3, loaded
# with `datasets` and `webdataset` and exported to the SynCD trainer's layout.
#
# Every demo gets fresh state of its own, so it never mixes with tests or an earlier demo: a new
# database `syncd_demo`, a new RabbitMQ vhost `syncd_demo` and a new bucket `syncd-demo-<time>`.
# Processes log to $SYNCD_CACHE/demo/ and are stopped when the script exits, however it exits.
#
# Knobs (environment):
#   SYNCD_DEMO_WORKERS   number of workers (default 2)
#   SYNCD_DEMO_TIMEOUT   seconds to wait for the run to finish (default 7200)
#   SYNCD_DEMO_RUN_NAME  run name to poll (default: `name` in deploy/demo/run.toml)
#   SYNCD_DEMO_CONFIG    folder with coordinator.toml, worker.toml, run.toml (default deploy/demo)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"

CONFIG_DIR="${SYNCD_DEMO_CONFIG:-$REPO_ROOT/deploy/demo}"
COORDINATOR_CONFIG="$CONFIG_DIR/coordinator.toml"
WORKER_CONFIG="$CONFIG_DIR/worker.toml"
RUN_FILE="$CONFIG_DIR/run.toml"
WORKERS="${SYNCD_DEMO_WORKERS:-2}"
TIMEOUT="${SYNCD_DEMO_TIMEOUT:-7200}"
POLL_SECONDS=10
DEMO_DIR="$SYNCD_CACHE/demo"
DEMO_DATABASE="syncd_demo"
DEMO_VHOST="syncd_demo"
DEMO_BUCKET="syncd-demo-$(date -u +%Y%m%d-%H%M%S)"
COORDINATOR_METRICS="127.0.0.1:9464"
# Worker i (1-based) serves its metrics on 9464 + i: 9465, 9466, ...
WORKER_METRICS_BASE_PORT=9464
# Reduces `syncd run status RUN --json` to one word: a run is done when it is `completed` (its
# dataset written), and has failed when cancelled or when writing its dataset failed.
STATE_FILTER='if .dataset_state == "failed" then "failed" else .state end'
SUCCESS_STATES="completed"
FAILURE_STATES="failed cancelled"
PROGRESS_FILTER='{state, dataset_state, jobs, groups, dead_letters}'

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf '\ndemo: ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Background processes, stopped on exit by their own ids.
# ---------------------------------------------------------------------------------------------
PIDS=()
NAMES=()
stop_all() {
    local status=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        step "Stopping the factory"
        local i
        for i in "${!PIDS[@]}"; do
            kill -TERM "${PIDS[$i]}" 2>/dev/null && info "sent TERM to ${NAMES[$i]} (pid ${PIDS[$i]})"
        done
        local deadline=$((SECONDS + 30))
        for i in "${!PIDS[@]}"; do
            while kill -0 "${PIDS[$i]}" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
            if kill -0 "${PIDS[$i]}" 2>/dev/null; then
                kill -KILL "${PIDS[$i]}" 2>/dev/null && info "${NAMES[$i]} did not stop in 30 s: killed"
            fi
        done
        wait 2>/dev/null || true
    fi
    ((status == 0)) || printf '\ndemo: failed; logs are in %s\n' "$DEMO_DIR" >&2
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background with its output in $DEMO_DIR/$name.log.
start_process() {
    local name="$1"
    shift
    "$@" >"$DEMO_DIR/$name.log" 2>&1 </dev/null &
    PIDS+=("$!")
    NAMES+=("$name")
    info "$name started (pid $!, log $DEMO_DIR/$name.log)"
}

# Fails with the log's tail if any started process has exited.
check_processes() {
    local i
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            tail -n 30 "$DEMO_DIR/${NAMES[$i]}.log" >&2 || true
            die "${NAMES[$i]} exited unexpectedly (log: $DEMO_DIR/${NAMES[$i]}.log)"
        fi
    done
}

# Signed S3 request to the local Garage; prints the body, fails on an HTTP error. Garage needs
# x-amz-content-sha256, which curl does not send by itself; query values must be percent-encoded
# ('/' as %2F) because curl signs the query string as written.
s3() {
    local method="$1" path="$2"
    curl -fsS --max-time 30 -X "$method" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        --aws-sigv4 "aws:amz:$SYNCD_TEST_S3_REGION:s3" \
        --user "$SYNCD_TEST_S3_ACCESS_KEY_ID:$SYNCD_TEST_S3_SECRET_ACCESS_KEY" \
        "$SYNCD_TEST_S3_ENDPOINT$path"
}

# ---------------------------------------------------------------------------------------------
step "Set-up (venv, Garage, services)"
"$SCRIPT_DIR/setup.sh"
set -a
# shellcheck disable=SC1091
. "$SYNCD_CACHE/services.env"
set +a

step "Demo configuration ($CONFIG_DIR)"
missing=()
for file in "$COORDINATOR_CONFIG" "$WORKER_CONFIG" "$RUN_FILE"; do
    [[ -f "$file" ]] || missing+=("$file")
done
((${#missing[@]} == 0)) || die "missing demo configuration: ${missing[*]}"
RUN_NAME="${SYNCD_DEMO_RUN_NAME:-$(python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f).get("name", ""))
' "$RUN_FILE")}" || die "cannot read $RUN_FILE as TOML"
[[ -n "$RUN_NAME" ]] || die "$RUN_FILE has no top-level 'name' (or set SYNCD_DEMO_RUN_NAME)"
info "run '$RUN_NAME' with $WORKERS workers, at most $TIMEOUT s"

step "Release build (syncd-coordinator, syncd, syncd-worker)"
cargo build --release --locked -p syncd-coordinator -p syncd-worker
BIN="$CARGO_TARGET_DIR/release"
for binary in syncd-coordinator syncd syncd-worker; do
    [[ -x "$BIN/$binary" ]] || die "the build did not produce $BIN/$binary"
done

step "Fresh state: database $DEMO_DATABASE, vhost $DEMO_VHOST, bucket $DEMO_BUCKET"
PGOPTIONS="--client-min-messages=warning" psql "$SYNCD_TEST_DATABASE_URL" -v ON_ERROR_STOP=1 -qAt \
    -c "DROP DATABASE IF EXISTS $DEMO_DATABASE WITH (FORCE)" \
    -c "CREATE DATABASE $DEMO_DATABASE" >/dev/null || die "cannot create database $DEMO_DATABASE"
rabbitmqctl -q delete_vhost "$DEMO_VHOST" >/dev/null 2>&1 || true
rabbitmqctl -q add_vhost "$DEMO_VHOST" >/dev/null || die "cannot create RabbitMQ vhost $DEMO_VHOST"
rabbitmqctl -q set_permissions -p "$DEMO_VHOST" guest '.*' '.*' '.*' >/dev/null ||
    die "cannot grant guest access to vhost $DEMO_VHOST"
s3 PUT "/$DEMO_BUCKET" >/dev/null || die "cannot create bucket $DEMO_BUCKET in Garage"
mkdir -p "$DEMO_DIR"
rm -f "$DEMO_DIR"/*.log

step "Demo models"
# The aesthetic head ships as a PyTorch pickle, as LAION's do; workers read safetensors.
DEMO_AESTHETIC_HEAD="$DEMO_DIR/aesthetic.safetensors"
"$BIN/syncd-worker" convert-aesthetic worker/tests/fixtures/scoring/aesthetic_mlp.pth \
    --out "$DEMO_AESTHETIC_HEAD" || die "cannot convert the demo's aesthetic head"

# Connection settings: figment reads `SYNCD_` variables over the TOML files, `__` separating
# nested keys. It reads every `SYNCD_` variable, so each process gets exactly its own and none
# of this shell's (SYNCD_CACHE, SYNCD_TEST_*, ...).
NO_SYNCD_VARIABLES=()
while read -r name; do NO_SYNCD_VARIABLES+=(-u "$name"); done < <(compgen -e | grep '^SYNCD_' || true)
SHARED_SETTINGS=(
    "SYNCD_BROKER__URL=${SYNCD_TEST_AMQP_URL%/*}/$DEMO_VHOST"
    "SYNCD_STORAGE__ENDPOINT=$SYNCD_TEST_S3_ENDPOINT"
    "SYNCD_STORAGE__REGION=$SYNCD_TEST_S3_REGION"
    "SYNCD_STORAGE__BUCKET=$DEMO_BUCKET"
    "SYNCD_STORAGE__ACCESS_KEY_ID=$SYNCD_TEST_S3_ACCESS_KEY_ID"
    "SYNCD_STORAGE__SECRET_ACCESS_KEY=$SYNCD_TEST_S3_SECRET_ACCESS_KEY"
)
COORDINATOR_SETTINGS=(
    "${SHARED_SETTINGS[@]}"
    "SYNCD_DATABASE__URL=${SYNCD_TEST_DATABASE_URL%/*}/$DEMO_DATABASE"
)
# Runs the admin CLI against the demo's state.
syncd_cli() {
    env "${NO_SYNCD_VARIABLES[@]}" "${COORDINATOR_SETTINGS[@]}" "$BIN/syncd" --config "$COORDINATOR_CONFIG" "$@"
}

step "Starting the coordinator and $WORKERS workers"
start_process coordinator env "${NO_SYNCD_VARIABLES[@]}" "${COORDINATOR_SETTINGS[@]}" \
    "SYNCD_METRICS__LISTEN=$COORDINATOR_METRICS" "$BIN/syncd-coordinator" --config "$COORDINATOR_CONFIG"
deadline=$((SECONDS + 60))
until curl -fsS -o /dev/null --max-time 2 "http://$COORDINATOR_METRICS/metrics" 2>/dev/null; do
    check_processes
    ((SECONDS < deadline)) || die "the coordinator's metrics endpoint http://$COORDINATOR_METRICS/metrics did not answer within 60 s"
    sleep 1
done
info "coordinator answers on http://$COORDINATOR_METRICS/metrics"
for ((i = 1; i <= WORKERS; i++)); do
    start_process "worker-$i" env "${NO_SYNCD_VARIABLES[@]}" "${SHARED_SETTINGS[@]}" \
        "SYNCD_METRICS__LISTEN=127.0.0.1:$((WORKER_METRICS_BASE_PORT + i))" \
        "SYNCD_SCORING__AESTHETIC_HEAD=$DEMO_AESTHETIC_HEAD" \
        "$BIN/syncd-worker" run --config "$WORKER_CONFIG"
done
sleep 2
check_processes

step "Creating run '$RUN_NAME' from $RUN_FILE"
syncd_cli run create "$RUN_FILE" || die "syncd run create failed"

step "Waiting for run '$RUN_NAME' (polling every $POLL_SECONDS s, at most $TIMEOUT s)"
started=$SECONDS
state=""
while :; do
    check_processes
    if status_json="$(syncd_cli run status "$RUN_NAME" --json 2>"$DEMO_DIR/cli.err")"; then
        state="$(jq -r "($STATE_FILTER) // empty" <<<"$status_json" 2>/dev/null || true)"
        info "[$((SECONDS - started)) s] $(jq -c "$PROGRESS_FILTER" <<<"$status_json" 2>/dev/null || echo "$status_json")"
    else
        info "[$((SECONDS - started)) s] run status failed: $(tail -n1 "$DEMO_DIR/cli.err")"
    fi
    [[ " $SUCCESS_STATES $FAILURE_STATES " == *" $state "* && -n "$state" ]] && break
    ((SECONDS - started < TIMEOUT)) || die "run '$RUN_NAME' not finished after $TIMEOUT s (last state: ${state:-unknown})"
    sleep "$POLL_SECONDS"
done

step "Summary"
syncd_cli run list || true
jq . <<<"$status_json"
[[ " $SUCCESS_STATES " == *" $state "* ]] || die "run '$RUN_NAME' ended in state '$state'"

step "Dataset"
# The summary names the dataset's index.json; the shards lie beside it.
index_key="$(jq -r '.dataset_index // empty' <<<"$status_json")"
[[ -n "$index_key" ]] || index_key="datasets/$RUN_NAME/index.json"
prefix="${index_key%index.json}"
listing="$(s3 GET "/$DEMO_BUCKET?list-type=2&prefix=${prefix//\//%2F}")" || die "cannot list s3://$DEMO_BUCKET/$prefix"
mapfile -t keys < <(grep -o '<Key>[^<]*</Key>' <<<"$listing" | sed -e 's/<Key>//' -e 's/<\/Key>//')
shards=0
for key in "${keys[@]}"; do [[ "$key" == *.tar ]] && shards=$((shards + 1)); done
info "location: s3://$DEMO_BUCKET/$prefix (endpoint $SYNCD_TEST_S3_ENDPOINT, region $SYNCD_TEST_S3_REGION)"
info "$shards shard(s), ${#keys[@]} object(s) in the first listing page"
printf '      %s\n' "${keys[@]:0:20}"
[[ " ${keys[*]} " == *" $index_key "* ]] || die "no $index_key in bucket $DEMO_BUCKET"
((shards > 0)) || die "no shard under s3://$DEMO_BUCKET/$prefix"
s3 GET "/$DEMO_BUCKET/$index_key" | jq . | head -n 40
samples="$(s3 GET "/$DEMO_BUCKET/$index_key" | jq -r .samples)"

step "Reading the dataset with datasets and webdataset, and in the SynCD trainer's layout"
# A copy of the dataset folder (the demo's fits in the first listing page), loaded by the test
# readers: `datasets` on the Parquet files and on the folder, `webdataset` on the tar shards.
DATASET_COPY="$DEMO_DIR/dataset"
EXPORT_DIR="$DEMO_DIR/export-syncd"
rm -rf "$DATASET_COPY" "$EXPORT_DIR"
mkdir -p "$DATASET_COPY"
for key in "${keys[@]}"; do
    s3 GET "/$DEMO_BUCKET/$key" >"$DATASET_COPY/${key##*/}" || die "cannot download $key"
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$SYNCD_VENV/bin/python" tests/python/load_dataset.py "$DATASET_COPY" >"$DEMO_DIR/load_dataset.json" ||
    die "the dataset did not load with datasets and webdataset"
jq -r '"    datasets \(.datasets_version): \(.parquet | length) rows from the Parquet files, \(.folder | length) from the folder; webdataset: \(.webdataset | length) samples"' \
    "$DEMO_DIR/load_dataset.json"
loaded="$(jq '[.parquet, .folder, .webdataset] | map(length) | unique' -c "$DEMO_DIR/load_dataset.json")"
[[ "$loaded" == "[$samples]" ]] || die "the readers saw $loaded samples, the index says $samples"
syncd_cli run export "$RUN_NAME" --format syncd --out "$EXPORT_DIR" || die "syncd run export failed"
"$SYNCD_VENV/bin/python" tests/python/syncd_layout_reader.py "$EXPORT_DIR" >"$DEMO_DIR/syncd_layout.json" ||
    die "the export did not read in the SynCD trainer's layout"
read_items="$(jq '.items | length' "$DEMO_DIR/syncd_layout.json")"
info "SynCD layout at $EXPORT_DIR: $read_items items read back as the trainer reads them"
[[ "$read_items" == "$samples" ]] || die "the SynCD-layout reader read $read_items items, the index says $samples"
step "Demo finished: run '$RUN_NAME' complete, dataset at s3://$DEMO_BUCKET/$prefix"
