#!/usr/bin/env bash
# Writes deploy/.env, the settings and secrets docker compose reads (mode 600, never committed).
#
# Usage:
#   deploy/init-env.sh                        a single host (docker-compose.yml): the control plane
#                                             and one worker per GPU; on a GPU host, completes the
#                                             file copied from the control plane (see gpu-host)
#   deploy/init-env.sh control-plane ADDRESS  a control plane (compose.control-plane.yml) that GPU
#                                             hosts reach at ADDRESS (a host name or IPv4 address
#                                             of a private network): RabbitMQ and Garage publish
#                                             their worker-facing ports there
#   deploy/init-env.sh gpu-host [FILE]        on the control plane: the settings of a GPU host
#                                             (the control plane's address, the broker password,
#                                             the workers' S3 key, the metrics and trace tokens)
#                                             into FILE
#                                             (default deploy/gpu-host.env, mode 600); copy it to
#                                             each GPU host as deploy/.env and run
#                                             deploy/init-env.sh there, or make the Kubernetes
#                                             Secret of deploy/kubernetes/ from it
#
# An existing deploy/.env is kept: its passwords and keys are already in the volumes. Settings it
# lacks (added by later versions) are appended, secrets with fresh random values. Each run also
# rewrites this host's Prometheus targets in deploy/prometheus/targets/ (workers-*.yml,
# dcgm-*.yml), from COMPOSE_PROFILES and SYNCD_BIND_ADDRESS.
#
# Environment (each optional):
#   SYNCD_ENV_FILE      the file to write instead of deploy/.env
#   SYNCD_GPUS          how many GPUs this host gives workers (default: `nvidia-smi -L`, else 1)
#   SYNCD_BIND_ADDRESS  on a GPU host, where its metrics ports are published (default: this
#                       host's address on the route to the control plane)
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_FILE="${SYNCD_ENV_FILE:-$DEPLOY_DIR/.env}"
TARGETS_DIR="$DEPLOY_DIR/prometheus/targets"
# The most workers compose.gpu-host.yml defines (profiles gpus-1 ... gpus-8).
MAX_GPUS=8
umask 077

die() {
    echo "init-env: $*" >&2
    exit 1
}
note() { echo "init-env: $*"; }
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# The value of setting $1 in $2 (default: the env file); empty when it has none.
get() { sed -n "s/^$1=//p" "${2:-$ENV_FILE}" | tail -n 1; }
has() { grep -q "^$1=" "$ENV_FILE"; }

ADDED=0
# add KEY VALUE [COMMENT]: appends KEY=VALUE (after its comment) unless the file sets KEY.
add() {
    has "$1" && return 0
    [[ -z "${3:-}" ]] || printf '# %s\n' "$3" >>"$ENV_FILE"
    printf '%s=%s\n' "$1" "$2" >>"$ENV_FILE"
    ADDED=$((ADDED + 1))
}
# set_value KEY VALUE: sets KEY, replacing the value it had. Values here are addresses and names
# (checked by valid_address), so they hold no character sed would read.
set_value() {
    if has "$1"; then
        sed -i "s|^$1=.*|$1=$2|" "$ENV_FILE"
    else
        add "$1" "$2"
    fi
}

valid_address() { [[ "$1" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; }
is_loopback() { [[ "$1" == 127.* || "$1" == localhost ]]; }

gpu_count() {
    local count="${SYNCD_GPUS:-}"
    if [[ -z "$count" ]]; then
        count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
        [[ "$count" =~ ^[1-9][0-9]*$ ]] || count=1
    fi
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "SYNCD_GPUS must be a positive number, not '$count'"
    if ((count > MAX_GPUS)); then
        note "this host has $count GPUs; compose.gpu-host.yml defines workers for $MAX_GPUS"
        count=$MAX_GPUS
    fi
    echo "$count"
}

# This host's IPv4 address on the route to $1 (a host name or IPv4 address); empty if unknown.
route_source() {
    local ip="$1"
    if [[ ! "$ip" =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
        ip="$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }')"
    fi
    [[ -n "$ip" ]] || return 0
    ip -4 -o route get "$ip" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'
}

# The settings every control plane has (single host or not), appended when missing.
control_plane_settings() {
    add POSTGRES_PASSWORD "$(random_hex 16)" "Passwords of PostgreSQL (user syncd) and RabbitMQ (user syncd, the only one)."
    add RABBITMQ_PASSWORD "$(random_hex 16)"
    add GARAGE_RPC_SECRET "$(random_hex 32)" "Garage: RPC secret and admin token."
    add GARAGE_ADMIN_TOKEN "$(random_hex 32)"
    add GARAGE_DEFAULT_ACCESS_KEY "GK$(random_hex 12)" "The coordinator's S3 key (Garage's default key): GK + 24 hex digits, a 64-hex-digit secret."
    add GARAGE_DEFAULT_SECRET_KEY "$(random_hex 32)"
    add GARAGE_WORKER_ACCESS_KEY "GK$(random_hex 12)" "The workers' key: the working bucket only (deploy/garage/init-keys.sh)."
    add GARAGE_WORKER_SECRET_KEY "$(random_hex 32)"
    add SYNCD_BUCKET syncd
    add SYNCD_DATASET_BUCKET syncd-datasets
    add SYNCD_METRICS_TOKEN "$(random_hex 24)" "Bearer token of every /metrics (coordinator, workers, Garage; dcgm-exporter's basic-auth password)."
    add SYNCD_TRACES_TOKEN "$(random_hex 24)" "Bearer token the OpenTelemetry collector (port 4318) asks of the coordinator and the workers sending spans."
    add GRAFANA_ADMIN_PASSWORD "$(random_hex 12)" "Grafana (user admin) and Prometheus (basic auth, user prometheus)."
    add PROMETHEUS_PASSWORD "$(random_hex 16)"
    add SYNCD_MODELS_DIR /srv/syncd/models "Host folder with the model weights, mounted read-only into the workers at /models."
    add SYNCD_TORCH_CUDA cu130 "Worker image: cu130 (NVIDIA driver R580+) or cu128 / cu126 (CUDA 12 drivers)."
    add SYNCD_BIND_ADDRESS 127.0.0.1 "Where RabbitMQ (5672), Garage (3900, 3901) and the trace collector (4318) are published for GPU hosts, and this host's worker metrics."
    add SYNCD_ADMIN_BIND_ADDRESS 127.0.0.1 "Where PostgreSQL, the RabbitMQ UI, Garage admin, Prometheus, Grafana and the coordinator's metrics are published."
    add SYNCD_PUBLIC_ADDRESS 127.0.0.1 "How GPU hosts reach this host (Garage's public RPC and S3 address; deploy/init-env.sh gpu-host)."
    add SYNCD_HOST_NAME "$(hostname -s 2>/dev/null || echo local)" "Prefix of this host's worker names (HOST-gpuN)."
}

# write_targets SUFFIX DCGM_TARGET WORKER_TARGET...: rewrites this host's Prometheus targets,
# workers-SUFFIX.yml and dcgm-SUFFIX.yml (file_sd lists, labelled with the host name).
write_targets() {
    local suffix="$1" dcgm_target="$2" host_name targets="" target
    shift 2
    host_name="$(get SYNCD_HOST_NAME)"
    for target in "$@"; do
        targets+="${targets:+, }\"$target\""
    done
    mkdir -p "$TARGETS_DIR"
    (
        umask 022
        printf '# Written by deploy/init-env.sh: the workers of %s.\n- targets: [%s]\n  labels:\n    host: %s\n' \
            "$host_name" "$targets" "$host_name" >"$TARGETS_DIR/workers-$suffix.yml"
        printf '# Written by deploy/init-env.sh: the GPUs of %s.\n- targets: ["%s"]\n  labels:\n    host: %s\n' \
            "$host_name" "$dcgm_target" "$host_name" >"$TARGETS_DIR/dcgm-$suffix.yml"
    )
}

profile_count() {
    local profiles count
    profiles="$(get COMPOSE_PROFILES)"
    count="$(sed -n 's/.*gpus-\([0-9]*\).*/\1/p' <<<"$profiles")"
    echo "${count:-1}"
}

new_file() {
    [[ -f "$ENV_FILE" ]] && return 1
    printf '# Settings of the syncd compose deployment, written by deploy/init-env.sh. Never commit this file.\n' >"$ENV_FILE"
}

cmd_control_plane() {
    local address="${1:-}" created=0
    if [[ -n "$address" ]]; then
        valid_address "$address" || die "'$address' is not a host name or IPv4 address"
    fi
    if new_file; then
        created=1
        add SYNCD_ROLE control-plane "control-plane (with or without workers of its own) or gpu-host."
    elif [[ "$(get SYNCD_ROLE)" == gpu-host ]]; then
        die "$ENV_FILE is a GPU host's; run deploy/init-env.sh without arguments to complete it"
    elif ! has SYNCD_ROLE; then
        # A file of an earlier version, when compose ran everything on one host.
        add SYNCD_ROLE control-plane
        add COMPOSE_PROFILES "gpus-$(gpu_count)" "Workers on this host: gpus-K runs worker-0 ... worker-(K-1) (docker-compose.yml)."
    fi
    if ((created)) && [[ -z "$address" ]]; then
        add COMPOSE_PROFILES "gpus-$(gpu_count)" "Workers on this host: gpus-K runs worker-0 ... worker-(K-1) (docker-compose.yml)."
    fi
    control_plane_settings
    if [[ -n "$address" ]]; then
        set_value SYNCD_PUBLIC_ADDRESS "$address"
        set_value SYNCD_BIND_ADDRESS "$address"
        note "GPU hosts reach this control plane at $address (SYNCD_PUBLIC_ADDRESS, SYNCD_BIND_ADDRESS)"
    fi
    chmod 600 "$ENV_FILE"
    if ((created)); then
        note "wrote $ENV_FILE (mode 600)"
    else
        note "$ENV_FILE exists; kept it ($ADDED new setting(s) added)"
    fi
    if has COMPOSE_PROFILES; then
        local i targets=()
        for ((i = 0; i < $(profile_count); i++)); do targets+=("worker-$i:9465"); done
        write_targets local dcgm-exporter:9400 "${targets[@]}"
        note "Prometheus targets of this host's $(profile_count) worker(s): $TARGETS_DIR/workers-local.yml"
    else
        rm -f "$TARGETS_DIR/workers-local.yml" "$TARGETS_DIR/dcgm-local.yml"
    fi
}

cmd_gpu_host_file() {
    local out="${1:-$DEPLOY_DIR/gpu-host.env}" address
    [[ -f "$ENV_FILE" ]] || die "no $ENV_FILE: run deploy/init-env.sh control-plane ADDRESS first"
    [[ "$(get SYNCD_ROLE)" != gpu-host ]] || die "$ENV_FILE is a GPU host's; run this on the control plane"
    address="$(get SYNCD_PUBLIC_ADDRESS)"
    if [[ -z "$address" ]] || is_loopback "$address"; then
        die "GPU hosts cannot reach SYNCD_PUBLIC_ADDRESS=${address:-unset}: run deploy/init-env.sh control-plane ADDRESS first"
    fi
    if is_loopback "$(get SYNCD_BIND_ADDRESS)"; then
        note "warning: SYNCD_BIND_ADDRESS=$(get SYNCD_BIND_ADDRESS) publishes RabbitMQ and Garage on this host only;" \
            "set it to $address and run docker compose up -d again"
    fi
    local key value
    for key in RABBITMQ_PASSWORD GARAGE_WORKER_ACCESS_KEY GARAGE_WORKER_SECRET_KEY SYNCD_METRICS_TOKEN SYNCD_TRACES_TOKEN; do
        [[ -n "$(get "$key")" ]] || die "$ENV_FILE has no $key: run deploy/init-env.sh first"
    done
    (
        umask 077
        {
            echo "# Settings of a syncd GPU host, written by 'deploy/init-env.sh gpu-host' on the control plane."
            echo "# Copy to the GPU host as deploy/.env (mode 600) and run deploy/init-env.sh there; or"
            echo "# kubectl -n syncd create secret generic syncd-worker --from-env-file=THIS_FILE. Never commit it."
            echo "SYNCD_ROLE=gpu-host"
            echo "SYNCD_CONTROL_PLANE_HOST=$address"
            for key in RABBITMQ_PASSWORD GARAGE_WORKER_ACCESS_KEY GARAGE_WORKER_SECRET_KEY SYNCD_METRICS_TOKEN \
                SYNCD_TRACES_TOKEN SYNCD_BUCKET SYNCD_MODELS_DIR SYNCD_TORCH_CUDA; do
                value="$(get "$key")"
                [[ -z "$value" ]] || echo "$key=$value"
            done
        } >"$out.tmp"
        chmod 600 "$out.tmp"
        mv "$out.tmp" "$out"
    )
    note "wrote $out (mode 600): copy it to each GPU host as deploy/.env, then run deploy/init-env.sh there"
}

cmd_gpu_host_complete() {
    local key control_plane bind count host_name
    # A file written by an older control plane lacks SYNCD_TRACES_TOKEN: it must come from there
    # (the collector checks it), so write and copy the file again rather than invent one here.
    for key in SYNCD_CONTROL_PLANE_HOST RABBITMQ_PASSWORD GARAGE_WORKER_ACCESS_KEY GARAGE_WORKER_SECRET_KEY \
        SYNCD_METRICS_TOKEN SYNCD_TRACES_TOKEN; do
        [[ -n "$(get "$key")" ]] ||
            die "$ENV_FILE has no $key: copy the file 'deploy/init-env.sh gpu-host' writes on the control plane"
    done
    control_plane="$(get SYNCD_CONTROL_PLANE_HOST)"
    add SYNCD_MODELS_DIR /srv/syncd/models "Host folder with the model weights, mounted read-only into the workers at /models."
    add SYNCD_TORCH_CUDA cu130 "Worker image: cu130 (NVIDIA driver R580+) or cu128 / cu126 (CUDA 12 drivers)."
    add SYNCD_HOST_NAME "$(hostname -s 2>/dev/null || echo gpu-host)" "Prefix of this host's worker names (HOST-gpuN)."
    add COMPOSE_PROFILES "gpus-$(gpu_count)" "Workers on this host: gpus-K runs worker-0 ... worker-(K-1), one per GPU."
    if ! has SYNCD_BIND_ADDRESS; then
        bind="${SYNCD_BIND_ADDRESS:-$(route_source "$control_plane")}"
        if [[ -z "$bind" ]]; then
            bind=127.0.0.1
            note "warning: no route to $control_plane found; metrics stay on 127.0.0.1 (set SYNCD_BIND_ADDRESS)"
        fi
        add SYNCD_BIND_ADDRESS "$bind" "Where this host publishes its workers' metrics (9465 + N) and dcgm-exporter (9400) for the control plane's Prometheus."
    fi
    chmod 600 "$ENV_FILE"
    note "completed $ENV_FILE ($ADDED new setting(s) added)"
    bind="$(get SYNCD_BIND_ADDRESS)"
    host_name="$(get SYNCD_HOST_NAME)"
    count="$(profile_count)"
    local i targets=()
    for ((i = 0; i < count; i++)); do targets+=("$bind:$((9465 + i))"); done
    write_targets "$host_name" "$bind:9400" "${targets[@]}"
    note "$count worker(s) (COMPOSE_PROFILES=$(get COMPOSE_PROFILES)); Prometheus targets written to"
    note "  $TARGETS_DIR/workers-$host_name.yml and dcgm-$host_name.yml:"
    note "  copy both into deploy/prometheus/targets/ on the control plane ($control_plane)"
    if is_loopback "$bind"; then
        note "warning: SYNCD_BIND_ADDRESS=$bind: the control plane's Prometheus cannot scrape this host"
    fi
}

case "${1:-}" in
    "")
        if [[ -f "$ENV_FILE" && "$(get SYNCD_ROLE)" == gpu-host ]]; then
            cmd_gpu_host_complete
        else
            cmd_control_plane
        fi
        ;;
    control-plane)
        [[ $# -eq 2 ]] || die "usage: deploy/init-env.sh control-plane ADDRESS"
        cmd_control_plane "$2"
        ;;
    gpu-host)
        [[ $# -le 2 ]] || die "usage: deploy/init-env.sh gpu-host [FILE]"
        cmd_gpu_host_file "${2:-}"
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        ;;
    *)
        die "unknown command '$1' (see --help)"
        ;;
esac
