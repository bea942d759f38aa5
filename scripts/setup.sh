#!/usr/bin/env bash
# Prepares this machine for building, testing and running syncd, and starts the services.
#
# Idempotent: every step first checks whether its result is already there and skips if so, so a
# second run takes seconds and changes nothing. Meant for a Debian machine where we are root,
# PostgreSQL and RabbitMQ are installed from Debian's packages, and only package registries are
# reachable (crates.io, PyPI).
#
# Steps:
#   1. Python venv at $SYNCD_VENV from scripts/requirements-fixtures.txt (torch provides libtorch
#      to tch); skipped while the stamp file holds the requirements file's hash.
#   2. Garage (S3 store) built from crates.io into $SYNCD_CACHE/garage once; skipped when the
#      binary exists.
#   3. PostgreSQL and RabbitMQ started if they are not running; RabbitMQ's consumer timeout raised
#      (at runtime and in /etc/rabbitmq/rabbitmq.conf) so long GPU jobs are not cancelled.
#   4. Garage started as a single node with a default key and bucket; credentials generated once
#      into $SYNCD_CACHE/garage-data/credentials.env (mode 600); the key may create buckets, so
#      tests make isolated buckets of their own.
#   5. $SYNCD_CACHE/services.env written with the connection settings tests and demos source.
#   6. Slurm for the Slurm test: slurm-wlm and munge installed with apt when missing, and the
#      single-node cluster's configuration written ($SYNCD_CACHE/slurm, by
#      scripts/slurm-cluster.sh configure). The cluster is not started here: the test starts it.
#   7. Chromium (Debian's package) for the gallery test, which drives it headless; installed with
#      apt when missing.
#   8. Prometheus (Debian's package) for the live monitoring test and `promtool` for
#      scripts/check-deploy.sh; installed with apt when missing. The package's own service is
#      stopped and disabled (the test starts its own Prometheus on free ports). RabbitMQ's
#      rabbitmq_prometheus plugin enabled, serving queue depths on 127.0.0.1:15692.
#
# Usage: scripts/setup.sh [--services-only]
#   --services-only  skip steps 1 and 2 (fails if their results are missing).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

GARAGE_VERSION="2.5.0"
GARAGE_ROOT="$SYNCD_CACHE/garage"
GARAGE_BIN="$GARAGE_ROOT/bin/garage"
GARAGE_DATA="$SYNCD_CACHE/garage-data"
GARAGE_CONFIG="$GARAGE_DATA/garage.toml"
GARAGE_CREDENTIALS="$GARAGE_DATA/credentials.env"
GARAGE_S3_ADDR="127.0.0.1:3900"
GARAGE_RPC_ADDR="127.0.0.1:3901"
GARAGE_ADMIN_ADDR="127.0.0.1:3903"
GARAGE_BUCKET="syncd"
GARAGE_REGION="garage"
SERVICES_ENV="$SYNCD_CACHE/services.env"
REQUIREMENTS="$REPO_ROOT/scripts/requirements-fixtures.txt"
VENV_STAMP="$SYNCD_VENV/.requirements.sha256"
TORCH_VERSION_PREFIX="2.11.0"
# 24 hours: a FLUX group on a busy GPU must never hit RabbitMQ's 30-minute default ack timeout.
RABBITMQ_CONSUMER_TIMEOUT_MS=86400000
RABBITMQ_CONF="/etc/rabbitmq/rabbitmq.conf"

SERVICES_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --services-only) SERVICES_ONLY=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup: unknown argument '$arg' (see --help)" >&2
            exit 2
            ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf '\nsetup: ERROR: %s\n' "$*" >&2
    exit 1
}

mkdir -p "$SYNCD_CACHE"

# apt_install NAME PACKAGE...: installs Debian packages (without recommends) as root, logging to
# $SYNCD_CACHE/NAME-apt.log; when the first try fails (stale package lists), updates the lists
# and tries once more.
apt_install() {
    local name="$1"
    shift
    ((EUID == 0)) || die "$* missing, and installing needs root (apt-get install $*)"
    command -v apt-get >/dev/null || die "$* missing, and apt-get is not available to install it"
    info "installing $* with apt-get"
    local apt_log="$SYNCD_CACHE/$name-apt.log"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$apt_log" 2>&1; then
        info "installing failed; updating the package lists and trying again"
        { DEBIAN_FRONTEND=noninteractive apt-get update &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; } >>"$apt_log" 2>&1 ||
            die "apt-get install $* failed (log: $apt_log)"
    fi
}

# Random lowercase hex of the given number of bytes.
random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }


# ---------------------------------------------------------------------------------------------
# 1. Python venv
# ---------------------------------------------------------------------------------------------
setup_venv() {
    step "Python venv ($SYNCD_VENV)"
    [[ -f "$REQUIREMENTS" ]] || die "missing $REQUIREMENTS"
    local wanted
    wanted="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    # The stamp holds the hash of the requirements last installed; libtorch must still be there.
    if [[ -x "$SYNCD_VENV/bin/python" && -f "$VENV_STAMP" && "$(cat "$VENV_STAMP")" == "$wanted" &&
        -f "$TORCH_LIB/libtorch_cpu.so" ]]; then
        info "up to date with $(basename "$REQUIREMENTS") (stamp matches); skipping"
        return
    fi

    # env.sh points LD_LIBRARY_PATH at lib/python3.11/site-packages/torch/lib: the venv must be 3.11.
    local python
    python="$(find_python 'sys.version_info[:2] == (3, 11)')" ||
        die "Python 3.11 not found (needed for the venv; scripts/env.sh expects python3.11)"

    if [[ ! -x "$SYNCD_VENV/bin/python" ]]; then
        info "creating the venv with $python"
        "$python" -m venv "$SYNCD_VENV" || die "could not create the venv at $SYNCD_VENV"
    fi
    info "installing $(basename "$REQUIREMENTS") (torch is a large download the first time)"
    "$SYNCD_VENV/bin/python" -m pip install --progress-bar off --disable-pip-version-check -r "$REQUIREMENTS" ||
        die "pip install -r $REQUIREMENTS failed (see the pip output above)"
    "$SYNCD_VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION_PREFIX'))" ||
        die "the venv's torch is not $TORCH_VERSION_PREFIX after installing"
    echo "$wanted" >"$VENV_STAMP"
    info "venv ready (torch $("$SYNCD_VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
}

# ---------------------------------------------------------------------------------------------
# 2. Garage binary
# ---------------------------------------------------------------------------------------------
setup_garage_binary() {
    step "Garage $GARAGE_VERSION binary ($GARAGE_BIN)"
    if [[ -x "$GARAGE_BIN" ]]; then
        info "present ($("$GARAGE_BIN" --version 2>/dev/null | head -n1)); skipping"
        return
    fi
    command -v cargo >/dev/null || die "cargo not found: cannot build Garage"
    # One build at a time, even if two set-ups start together; the second waits, then skips.
    exec 9>"$SYNCD_CACHE/garage-build.lock"
    info "waiting for the build lock" && flock 9
    if [[ -x "$GARAGE_BIN" ]]; then
        info "built meanwhile by another set-up; skipping"
        exec 9>&-
        return
    fi
    local log="$SYNCD_CACHE/garage-build.log" other
    other="$(pgrep -d ' ' -f '[c]argo install garage' || true)"
    [[ -z "$other" ]] || info "a Garage build is already running (pid $other): cargo waits for it to finish"
    info "building from crates.io (about 30 minutes on 2 cores); log: $log"
    # A fixed target dir lets an interrupted build resume where it stopped; cargo's own lock on it
    # makes a build started by other means wait rather than collide. The log is appended to.
    cargo install garage --version "$GARAGE_VERSION" --locked \
        --root "$GARAGE_ROOT" --target-dir "$SYNCD_CACHE/garage-target" >>"$log" 2>&1 &
    local build_pid=$! started=$SECONDS next_report=$((SECONDS + ${GARAGE_BUILD_REPORT_SECONDS:-60}))
    # A line a minute, so that a long build is visibly alive.
    while kill -0 "$build_pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS >= next_report)); then
            next_report=$((next_report + ${GARAGE_BUILD_REPORT_SECONDS:-60}))
            info "[$(((SECONDS - started) / 60)) min] $(grep -a -E '^ *(Compiling|Blocking|Finished|Installing)' "$log" | tail -n1 | sed 's/^ *//')"
        fi
    done
    if ! wait "$build_pid"; then
        tail -n 30 "$log" >&2
        die "building Garage failed (full log: $log)"
    fi
    rm -rf "$SYNCD_CACHE/garage-target"
    exec 9>&-
    info "built: $("$GARAGE_BIN" --version | head -n1)"
}

# ---------------------------------------------------------------------------------------------
# 3. PostgreSQL and RabbitMQ
# ---------------------------------------------------------------------------------------------
setup_postgres() {
    step "PostgreSQL (127.0.0.1:5432)"
    command -v pg_isready >/dev/null || die "PostgreSQL client tools not found (Debian package postgresql)"
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        info "running"
    else
        local version
        version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
        [[ -n "$version" ]] || die "no PostgreSQL cluster under /etc/postgresql"
        info "starting cluster $version/main"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
            die "pg_ctlcluster $version main start failed (see /var/log/postgresql/)"
        wait_for 60 pg_isready -q -h 127.0.0.1 -p 5432 ||
            die "PostgreSQL did not accept connections on 127.0.0.1:5432 within 60 s"
        info "started"
    fi
    # The tests create a fresh database each, as user postgres over TCP without a password.
    local probe="syncd_setup_probe_$$"
    psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt \
        -c "CREATE DATABASE $probe" -c "DROP DATABASE $probe" >/dev/null ||
        die "user postgres cannot create a database over TCP (check pg_hba.conf trust for 127.0.0.1)"
    info "user postgres can create databases over TCP"
}

rabbitmq_consumer_timeout() {
    rabbitmqctl -q eval 'application:get_env(rabbit, consumer_timeout).' 2>/dev/null
}

setup_rabbitmq() {
    step "RabbitMQ (127.0.0.1:5672)"
    command -v rabbitmqctl >/dev/null || die "rabbitmqctl not found (Debian package rabbitmq-server)"

    # Persist the timeout first, so that a server started below already reads it.
    if [[ -f "$RABBITMQ_CONF" ]] && grep -Eq '^[[:space:]]*consumer_timeout[[:space:]]*=' "$RABBITMQ_CONF"; then
        if grep -Eq "^[[:space:]]*consumer_timeout[[:space:]]*=[[:space:]]*${RABBITMQ_CONSUMER_TIMEOUT_MS}[[:space:]]*$" "$RABBITMQ_CONF"; then
            info "consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS already in $RABBITMQ_CONF"
        else
            sed -i -E "s/^[[:space:]]*consumer_timeout[[:space:]]*=.*/consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS/" "$RABBITMQ_CONF"
            info "updated consumer_timeout in $RABBITMQ_CONF"
        fi
    else
        mkdir -p "$(dirname "$RABBITMQ_CONF")"
        printf '%s\n' "# Long GPU jobs: do not cancel a consumer whose delivery is unacked for less than 24 h." \
            "consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS" >>"$RABBITMQ_CONF"
        info "added consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS to $RABBITMQ_CONF"
    fi

    if rabbitmqctl -q status >/dev/null 2>&1; then
        info "running"
    else
        info "starting rabbitmq-server"
        rabbitmq-server -detached || die "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
        rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 ||
            wait_for 120 rabbitmqctl -q status ||
            die "RabbitMQ did not start within 120 s (see /var/log/rabbitmq/)"
        info "started"
    fi
    wait_for 60 bash -c '</dev/tcp/127.0.0.1/5672' || die "RabbitMQ is not listening on 127.0.0.1:5672"

    local current
    current="$(rabbitmq_consumer_timeout)"
    if [[ "$current" != "{ok,$RABBITMQ_CONSUMER_TIMEOUT_MS}" ]]; then
        info "consumer_timeout at runtime is ${current:-unset}; setting $RABBITMQ_CONSUMER_TIMEOUT_MS"
        rabbitmqctl -q eval "application:set_env(rabbit, consumer_timeout, $RABBITMQ_CONSUMER_TIMEOUT_MS)." >/dev/null ||
            die "could not set RabbitMQ's consumer_timeout at runtime"
        current="$(rabbitmq_consumer_timeout)"
        [[ "$current" == "{ok,$RABBITMQ_CONSUMER_TIMEOUT_MS}" ]] ||
            die "RabbitMQ's consumer_timeout reads '$current' after setting it"
    fi
    info "consumer_timeout = $RABBITMQ_CONSUMER_TIMEOUT_MS ms (runtime and $RABBITMQ_CONF)"
}

# ---------------------------------------------------------------------------------------------
# 4. Garage server
# ---------------------------------------------------------------------------------------------
write_garage_files() {
    mkdir -p "$GARAGE_DATA/meta" "$GARAGE_DATA/data"
    chmod 700 "$GARAGE_DATA"
    if [[ ! -f "$GARAGE_CREDENTIALS" ]]; then
        info "generating credentials into $GARAGE_CREDENTIALS"
        (
            umask 077
            cat >"$GARAGE_CREDENTIALS.tmp" <<EOF
# Generated once by scripts/setup.sh: the single-node Garage's default S3 key and admin token.
# Garage creates this key (allowed to create buckets) and the bucket on start (--default-bucket).
GARAGE_DEFAULT_ACCESS_KEY=GK$(random_hex 12)
GARAGE_DEFAULT_SECRET_KEY=$(random_hex 32)
GARAGE_DEFAULT_BUCKET=$GARAGE_BUCKET
GARAGE_ADMIN_TOKEN=$(random_hex 32)
EOF
            mv "$GARAGE_CREDENTIALS.tmp" "$GARAGE_CREDENTIALS"
        )
    fi
    chmod 600 "$GARAGE_CREDENTIALS"
    # shellcheck disable=SC1090
    . "$GARAGE_CREDENTIALS"
    [[ "$GARAGE_DEFAULT_ACCESS_KEY" =~ ^GK[0-9a-f]{24}$ ]] ||
        die "$GARAGE_CREDENTIALS: GARAGE_DEFAULT_ACCESS_KEY must be GK + 24 hex digits"
    [[ "$GARAGE_DEFAULT_SECRET_KEY" =~ ^[0-9a-f]{64}$ ]] ||
        die "$GARAGE_CREDENTIALS: GARAGE_DEFAULT_SECRET_KEY must be 64 hex digits"

    if [[ ! -f "$GARAGE_CONFIG" ]]; then
        info "writing $GARAGE_CONFIG"
        (
            umask 077
            cat >"$GARAGE_CONFIG.tmp" <<EOF
# Single-node Garage for development and tests; written once by scripts/setup.sh.
metadata_dir = "$GARAGE_DATA/meta"
data_dir = "$GARAGE_DATA/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "$GARAGE_RPC_ADDR"
rpc_public_addr = "$GARAGE_RPC_ADDR"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$GARAGE_REGION"
api_bind_addr = "$GARAGE_S3_ADDR"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "$GARAGE_ADMIN_ADDR"
admin_token = "$GARAGE_ADMIN_TOKEN"
EOF
            mv "$GARAGE_CONFIG.tmp" "$GARAGE_CONFIG"
        )
    fi
    chmod 600 "$GARAGE_CONFIG"
}

garage_healthy() {
    # Public endpoint of the admin API: 200 once the node has a layout and can serve requests.
    curl -fsS -o /dev/null --max-time 5 "http://$GARAGE_ADMIN_ADDR/health"
}

# Signed S3 request against Garage; prints the body, fails on an HTTP error. curl signs with
# SigV4 but does not send x-amz-content-sha256, which Garage requires: send it, unsigned payload
# (the requests have no body). Query values must come percent-encoded ('/' as %2F), as curl signs
# the query string as written.
garage_s3() {
    local method="$1" path="$2"
    curl -fsS --max-time 10 -X "$method" \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
        --aws-sigv4 "aws:amz:$GARAGE_REGION:s3" \
        --user "$GARAGE_DEFAULT_ACCESS_KEY:$GARAGE_DEFAULT_SECRET_KEY" \
        "http://$GARAGE_S3_ADDR$path"
}

setup_garage_server() {
    step "Garage server (S3 on $GARAGE_S3_ADDR, admin on $GARAGE_ADMIN_ADDR)"
    [[ -x "$GARAGE_BIN" ]] || die "Garage binary missing at $GARAGE_BIN (run scripts/setup.sh without --services-only)"
    write_garage_files

    if garage_healthy; then
        info "already answering"
    else
        info "starting: garage -c $GARAGE_CONFIG server --single-node --default-bucket (log: $GARAGE_DATA/garage.log)"
        (
            cd "$GARAGE_DATA"
            set -a
            # shellcheck disable=SC1090
            . "$GARAGE_CREDENTIALS"
            set +a
            export RUST_LOG="${GARAGE_LOG:-garage=info}"
            # Detached from this shell: the server outlives the set-up.
            setsid nohup "$GARAGE_BIN" -c "$GARAGE_CONFIG" server --single-node --default-bucket \
                >>"$GARAGE_DATA/garage.log" 2>&1 </dev/null &
            echo $! >"$GARAGE_DATA/garage.pid"
        )
        if ! wait_for 60 garage_healthy; then
            tail -n 20 "$GARAGE_DATA/garage.log" >&2
            die "Garage did not become healthy on $GARAGE_ADMIN_ADDR within 60 s (log: $GARAGE_DATA/garage.log)"
        fi
        info "started (pid $(cat "$GARAGE_DATA/garage.pid"))"
    fi

    # The default bucket must be reachable with the stored key: a signed ListObjectsV2.
    local listing=""
    local deadline=$((SECONDS + 30))
    until listing="$(garage_s3 GET "/$GARAGE_BUCKET?list-type=2&max-keys=1" 2>&1)"; do
        if ((SECONDS >= deadline)); then
            die "S3 check failed: cannot list bucket '$GARAGE_BUCKET' with the key in $GARAGE_CREDENTIALS: $listing
    (is another Garage with other credentials on $GARAGE_S3_ADDR? its log: $GARAGE_DATA/garage.log)"
        fi
        sleep 1
    done
    [[ "$listing" == *"<ListBucketResult"* ]] || die "S3 check: unexpected answer listing '$GARAGE_BUCKET': $listing"
    info "S3 answers: bucket '$GARAGE_BUCKET' listed with key $GARAGE_DEFAULT_ACCESS_KEY"
    ensure_key_creates_buckets
}

# Tests make buckets of their own with this key. Garage gives the key it creates for
# --default-bucket the right to create buckets; should a key lack it, grant it with the CLI.
# Checked once per key (a probe bucket is created and deleted), then remembered.
ensure_key_creates_buckets() {
    local checked="$GARAGE_DATA/.creates-buckets"
    if [[ -f "$checked" && "$(cat "$checked")" == "$GARAGE_DEFAULT_ACCESS_KEY" ]]; then
        info "key $GARAGE_DEFAULT_ACCESS_KEY may create buckets (checked before)"
        return
    fi
    local probe
    probe="syncd-setup-probe-$(random_hex 4)"
    if ! garage_s3 PUT "/$probe" >/dev/null 2>&1; then
        info "key $GARAGE_DEFAULT_ACCESS_KEY may not create buckets: garage key allow --create-bucket"
        "$GARAGE_BIN" -c "$GARAGE_CONFIG" key allow --create-bucket "$GARAGE_DEFAULT_ACCESS_KEY" >/dev/null ||
            die "garage key allow --create-bucket $GARAGE_DEFAULT_ACCESS_KEY failed"
        garage_s3 PUT "/$probe" >/dev/null || die "key $GARAGE_DEFAULT_ACCESS_KEY still cannot create a bucket"
    fi
    garage_s3 DELETE "/$probe" >/dev/null || die "cannot delete the probe bucket $probe"
    echo "$GARAGE_DEFAULT_ACCESS_KEY" >"$checked"
    info "key $GARAGE_DEFAULT_ACCESS_KEY can create and delete buckets"
}

# ---------------------------------------------------------------------------------------------
# 5. services.env
# ---------------------------------------------------------------------------------------------
write_services_env() {
    step "Connection settings ($SERVICES_ENV)"
    local content
    content="$(
        cat <<EOF
# Written by scripts/setup.sh; source it (set -a) to reach the local services.
# Holds the S3 secret: kept mode 600, never commit or print it.
SYNCD_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
SYNCD_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
SYNCD_TEST_S3_ENDPOINT=http://$GARAGE_S3_ADDR
SYNCD_TEST_S3_REGION=$GARAGE_REGION
SYNCD_TEST_S3_ACCESS_KEY_ID=$GARAGE_DEFAULT_ACCESS_KEY
SYNCD_TEST_S3_SECRET_ACCESS_KEY=$GARAGE_DEFAULT_SECRET_KEY
SYNCD_TEST_S3_BUCKET=$GARAGE_BUCKET
EOF
    )"
    if [[ -f "$SERVICES_ENV" && "$(cat "$SERVICES_ENV")" == "$content" ]]; then
        info "unchanged"
    else
        (
            umask 077
            printf '%s\n' "$content" >"$SERVICES_ENV.tmp"
            mv "$SERVICES_ENV.tmp" "$SERVICES_ENV"
        )
        info "written"
    fi
    chmod 600 "$SERVICES_ENV"
}

# ---------------------------------------------------------------------------------------------
# 6. Slurm (for tests/tests/slurm.rs; the cluster itself is started by the test)
# ---------------------------------------------------------------------------------------------
SLURM_PACKAGES=(slurm-wlm munge)

slurm_installed() {
    local binary
    for binary in slurmctld slurmd sbatch srun scancel scontrol munged munge unmunge; do
        command -v "$binary" >/dev/null || return 1
    done
}

setup_slurm() {
    step "Slurm (single-node cluster for the Slurm test)"
    if slurm_installed; then
        info "slurm-wlm and munge installed ($(slurmd -V 2>/dev/null))"
    else
        apt_install slurm "${SLURM_PACKAGES[@]}"
        slurm_installed || die "Slurm commands still missing after installing ${SLURM_PACKAGES[*]} (log: $SYNCD_CACHE/slurm-apt.log)"
        info "installed ($(slurmd -V 2>/dev/null))"
    fi
    "$SCRIPT_DIR/slurm-cluster.sh" configure
    info "not started: the Slurm test runs scripts/slurm-cluster.sh start itself"
}

# ---------------------------------------------------------------------------------------------
# 7. Chromium (for tests/tests/pictures.rs: the gallery in a real headless browser)
# ---------------------------------------------------------------------------------------------
setup_chromium() {
    step "Chromium (headless browser for the gallery test)"
    if command -v chromium >/dev/null; then
        info "installed ($(chromium --version 2>/dev/null | head -n1))"
        return
    fi
    apt_install chromium chromium
    command -v chromium >/dev/null || die "chromium still missing after installing it (log: $SYNCD_CACHE/chromium-apt.log)"
    info "installed ($(chromium --version 2>/dev/null | head -n1))"
}

# ---------------------------------------------------------------------------------------------
# 8. Prometheus (for the live monitoring test and promtool) and RabbitMQ's metrics
# ---------------------------------------------------------------------------------------------
RABBITMQ_METRICS_URL="http://127.0.0.1:15692/metrics"

prometheus_installed() { command -v prometheus >/dev/null && command -v promtool >/dev/null; }

# Debian's package starts its own Prometheus on :9090 as a service (systemd, or its init script
# where there is no systemd). Nothing here uses it: the test runs a Prometheus of its own on free
# ports with its own configuration, and a second one scraping nothing would only hold the port.
# Stopped and disabled on every run, so that an upgrade that restarts it is undone too.
prometheus_service_gone() { ! pgrep -u prometheus -x prometheus >/dev/null 2>&1; }

stop_prometheus_service() {
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        if systemctl is-enabled --quiet prometheus 2>/dev/null || systemctl is-active --quiet prometheus 2>/dev/null; then
            systemctl disable --now prometheus >/dev/null 2>&1 || die "systemctl disable --now prometheus failed"
            info "stopped and disabled the prometheus service (systemd)"
        fi
    else
        # No systemd running (a container): the package's init script is what starts it.
        if [[ -x /etc/init.d/prometheus ]] && service prometheus status >/dev/null 2>&1; then
            service prometheus stop >/dev/null 2>&1 || die "service prometheus stop failed"
            info "stopped the prometheus service (init script)"
        fi
        # Nor at the next boot, under systemd or an init script: systemctl only changes links
        # here (and calls update-rc.d for the init script), which works without systemd running.
        if command -v systemctl >/dev/null && systemctl is-enabled --quiet prometheus 2>/dev/null; then
            systemctl disable prometheus >/dev/null 2>&1 || die "systemctl disable prometheus failed"
            info "disabled the prometheus service at boot"
        elif command -v update-rc.d >/dev/null && compgen -G "/etc/rc[2-5].d/S*prometheus" >/dev/null; then
            update-rc.d prometheus disable >/dev/null 2>&1 || die "update-rc.d prometheus disable failed"
            info "disabled the prometheus service at boot"
        fi
    fi
    # The service's process runs as user prometheus; ours (the test's) as whoever runs the test.
    # A stopped one lingers a moment until it is reaped.
    wait_for 15 prometheus_service_gone ||
        die "the prometheus service still runs (pgrep -u prometheus -x prometheus); stop it by hand"
}

setup_prometheus() {
    step "Prometheus (Debian's package: the live monitoring test, promtool) and RabbitMQ's metrics"
    if prometheus_installed; then
        info "installed ($(prometheus --version 2>/dev/null | head -n1))"
    else
        # Without recommends: node-exporter and the rest would be more services on more ports.
        apt_install prometheus prometheus
        prometheus_installed || die "prometheus or promtool still missing after installing it (log: $SYNCD_CACHE/prometheus-apt.log)"
        info "installed ($(prometheus --version 2>/dev/null | head -n1))"
    fi
    stop_prometheus_service
    info "the package's own service is not running (tests start their own Prometheus)"

    # Queue depths for the dashboard and the test: rabbitmq_prometheus on port 15692, bound to
    # loopback like the AMQP listener (by default it listens on every interface). The
    # configuration file holds the address for later starts; a running node has read its file
    # already, so the plugin gets the same address at runtime before it starts.
    if ! grep -Eq '^[[:space:]]*prometheus\.tcp\.ip[[:space:]]*=' "$RABBITMQ_CONF" 2>/dev/null; then
        printf '%s\n' "# rabbitmq_prometheus (queue depths for Prometheus) on loopback only." \
            "prometheus.tcp.ip = 127.0.0.1" >>"$RABBITMQ_CONF"
        info "added prometheus.tcp.ip = 127.0.0.1 to $RABBITMQ_CONF"
    fi
    if rabbitmq-plugins -q is_enabled rabbitmq_prometheus >/dev/null 2>&1; then
        info "rabbitmq_prometheus enabled"
    else
        info "enabling rabbitmq_prometheus on 127.0.0.1:15692"
        rabbitmqctl -q eval 'application:set_env(rabbitmq_prometheus, tcp_config, [{port, 15692}, {ip, "127.0.0.1"}]).' >/dev/null ||
            die "could not set rabbitmq_prometheus' listener address at runtime"
        rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null ||
            die "rabbitmq-plugins enable rabbitmq_prometheus failed (see /var/log/rabbitmq/)"
    fi
    wait_for 30 curl -fsS -o /dev/null "$RABBITMQ_METRICS_URL" ||
        die "RabbitMQ's metrics do not answer at $RABBITMQ_METRICS_URL"
    info "RabbitMQ's metrics answer at $RABBITMQ_METRICS_URL (queue depths: /metrics/detailed?family=queue_coarse_metrics)"
}

START=$SECONDS
if ((SERVICES_ONLY)); then
    info "--services-only: not checking the venv and the Garage build"
else
    setup_venv
    setup_garage_binary
fi
setup_postgres
setup_rabbitmq
setup_garage_server
write_services_env
setup_slurm
setup_chromium
setup_prometheus
step "Set-up done in $((SECONDS - START)) s. Load the settings with: set -a; . $SERVICES_ENV; set +a"
