#!/usr/bin/env bash
# A single-node Slurm cluster on loopback: this machine is its controller and its only compute
# node. The Slurm test (tests/tests/slurm.rs) starts it to run deploy/slurm/syncd-workers.sbatch
# for real, and it serves to try that script by hand. Nothing starts it otherwise.
#
# Usage: scripts/slurm-cluster.sh configure|start|stop|status|env
#
#   configure  writes $SYNCD_CACHE/slurm/slurm.conf for this machine: one node with this
#              machine's host name, CPUs and memory (as `slurmd -C` reports them) and its NVIDIA
#              GPUs as gres, one partition `syncd`. Rewritten only when the machine changed.
#              scripts/setup.sh runs it after installing slurm-wlm and munge.
#   start      configures, then starts whatever is not running: munged (the machine's, as user
#              munge, with /etc/munge/munge.key), slurmctld and slurmd, and waits until the node
#              takes jobs. Idempotent. Needs root.
#   stop       cancels the cluster's jobs (waiting up to KillWait for them to end), stops slurmd
#              and slurmctld, and munged if this script started it. Idempotent.
#   status     says what runs; exits 0 when the cluster takes jobs.
#   env        prints `export SLURM_CONF=...`: eval it before sbatch, squeue, scancel, srun.
#
# The cluster uses its own configuration (SLURM_CONF), state, logs and ports (controller 6917,
# slurmd 6918), so it leaves a machine's own Slurm configuration in /etc/slurm alone. Daemons run
# as root, jobs as the submitting user; process tracking is plain Linux (proctrack/linuxproc,
# task/none: no cgroups, so it works in containers). KillWait is 30 s, Slurm's default: a job's
# processes get SIGTERM and, 30 s later, SIGKILL (see deploy/slurm/syncd-workers.sbatch).
#
# Logs: $SYNCD_CACHE/slurm/log/{slurmctld,slurmd}.log.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

SLURM_DIR="$SYNCD_CACHE/slurm"
CONF="$SLURM_DIR/slurm.conf"
GRES_CONF="$SLURM_DIR/gres.conf"
LOG_DIR="$SLURM_DIR/log"
CTLD_PID="$SLURM_DIR/slurmctld.pid"
SLURMD_PID="$SLURM_DIR/slurmd.pid"
# Set when this script started munged, so that `stop` stops only what it started.
MUNGED_OURS="$SLURM_DIR/munged.started-here"
MUNGE_SOCKET_DIR="/run/munge"
MUNGE_KEY="/etc/munge/munge.key"
CTLD_PORT=6917
SLURMD_PORT=6918
KILL_WAIT=30
PARTITION="syncd"
export SLURM_CONF="$CONF"

info() { printf '    %s\n' "$*"; }
die() {
    printf 'slurm-cluster: ERROR: %s\n' "$*" >&2
    exit 1
}


require_slurm() {
    local missing=() binary
    for binary in slurmctld slurmd sbatch srun scontrol munged munge unmunge; do
        command -v "$binary" >/dev/null || missing+=("$binary")
    done
    ((${#missing[@]} == 0)) ||
        die "not installed: ${missing[*]} (Debian packages slurm-wlm and munge; scripts/setup.sh installs them)"
}

require_root() {
    ((EUID == 0)) || die "must run as root: the daemons run as root and munged as user munge"
}

# The node line for this machine: `slurmd -C` without its UpTime, on loopback.
node_line() {
    local line gpus
    line="$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=')" || die "slurmd -C printed no node line"
    line="${line%% UpTime=*}"
    gpus="$(gpu_count)"
    ((gpus == 0)) || line+=" Gres=gpu:$gpus"
    printf '%s NodeAddr=127.0.0.1 State=UNKNOWN\n' "$line"
}

gpu_count() {
    local count=0 device
    for device in /dev/nvidia[0-9]*; do
        [[ -e "$device" ]] && count=$((count + 1))
    done
    echo "$count"
}

# Writes $2 to $1 when it differs; returns 0 when it wrote, 1 when the file was up to date.
write_if_changed() {
    local file="$1" content="$2"
    if [[ -f "$file" && "$(cat "$file")" == "$content" ]]; then
        return 1
    fi
    printf '%s\n' "$content" >"$file.tmp"
    mv "$file.tmp" "$file"
}

# Writes the configuration; returns 0 when it changed, 1 when it was up to date.
configure() {
    command -v slurmd >/dev/null || die "slurmd not installed (Debian package slurm-wlm; scripts/setup.sh installs it)"
    mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$LOG_DIR"
    local host gpus changed=1 gres_types=""
    host="$(hostname -s)"
    gpus="$(gpu_count)"
    if ((gpus > 0)); then
        gres_types="GresTypes=gpu"
        if write_if_changed "$GRES_CONF" "$(printf '%s\n' \
            "# Written by scripts/slurm-cluster.sh: this machine's NVIDIA GPUs." \
            "Name=gpu File=/dev/nvidia[0-$((gpus - 1))]")"; then
            changed=0
        fi
    else
        rm -f "$GRES_CONF"
    fi
    local content
    content="$(
        cat <<EOF
# Single-node Slurm cluster on loopback, for the Slurm test and trying deploy/slurm/ by hand.
# Written by scripts/slurm-cluster.sh configure for this machine; rewritten when it changes.
ClusterName=syncd
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: plain Linux process tracking works in containers too.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# A job ending (scancel, time limit) gets SIGTERM, then SIGKILL after KillWait seconds.
KillWait=$KILL_WAIT
# Finished jobs stay visible to scontrol for this long.
MinJobAge=600
$gres_types
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    )"
    if write_if_changed "$CONF" "$content"; then
        changed=0
    fi
    return "$changed"
}

pid_alive() {
    local file="$1" pid
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_up() { pid_alive "$CTLD_PID" && scontrol ping 2>/dev/null | grep -q 'is UP'; }
# The node's state, lower case without flags ("idle", "mixed", "allocated", "down", ...).
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' | tr '[:upper:]' '[:lower:]'; }
node_ready() {
    pid_alive "$SLURMD_PID" || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

start_munge() {
    if munge_works; then
        info "munged: running"
        return
    fi
    [[ -f "$MUNGE_KEY" ]] || {
        info "munged: creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 2>/dev/null)
    }
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$MUNGED_OURS"
    wait_for 20 munge_works || die "munge does not answer after starting munged (see /var/log/munge/munged.log)"
    info "munged: started"
}

start_slurmctld() {
    if ctld_up; then
        info "slurmctld: running"
        return
    fi
    # A fresh controller: jobs and node states of an earlier session are cleared (-c).
    slurmctld -c -f "$CONF" || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    if ! wait_for 30 ctld_up; then
        tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true
        die "slurmctld does not answer (log: $LOG_DIR/slurmctld.log)"
    fi
    info "slurmctld: started"
}

start_slurmd() {
    if ! pid_alive "$SLURMD_PID"; then
        slurmd -c -f "$CONF" || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
        info "slurmd: started"
    else
        info "slurmd: running"
    fi
    if ! wait_for 30 node_ready; then
        # A node that was down (an earlier slurmd killed) comes back with an explicit resume.
        scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        if ! wait_for 15 node_ready; then
            tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true
            die "the node is '$(node_state)', not taking jobs (logs: $LOG_DIR/slurmd.log, slurmctld.log)"
        fi
    fi
    info "node $(hostname -s): $(node_state)"
}

stop_daemon() {
    local name="$1" file="$2" pid
    if ! pid_alive "$file"; then
        info "$name: not running"
        return
    fi
    pid="$(cat "$file")"
    kill -TERM "$pid"
    wait_for 30 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    info "$name: stopped"
}

# Jobs outlive slurmd (their slurmstepd goes on): cancel them first, and give their processes
# KillWait to end.
cancel_jobs() {
    ctld_up || return 0
    local jobs
    jobs="$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')"
    [[ -n "${jobs// /}" ]] || return 0
    info "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # shellcheck disable=SC2016 # expanded by that bash
    wait_for $((KILL_WAIT + 15)) bash -c '[[ -z "$(squeue -h -o %i 2>/dev/null)" ]]' ||
        info "jobs still ending: $(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')"
}

stop_cluster() {
    cancel_jobs
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    if [[ -f "$MUNGED_OURS" ]]; then
        stop_daemon munged "$MUNGE_SOCKET_DIR/munged.pid"
        rm -f "$MUNGED_OURS"
    fi
}

status() {
    local up=0
    if munge_works; then info "munged: running"; else info "munged: not running" && up=1; fi
    if ctld_up; then info "slurmctld: running"; else info "slurmctld: not running" && up=1; fi
    if pid_alive "$SLURMD_PID"; then info "slurmd: running"; else info "slurmd: not running" && up=1; fi
    if ((up == 0)); then
        info "node $(hostname -s): $(node_state)"
        node_ready || up=1
    fi
    return "$up"
}

case "${1:-}" in
    configure)
        if configure; then info "wrote $CONF"; else info "$CONF up to date"; fi
        ;;
    start)
        require_root
        require_slurm
        if configure && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
            info "the configuration changed: restarting the daemons"
            stop_daemon slurmd "$SLURMD_PID"
            stop_daemon slurmctld "$CTLD_PID"
        fi
        start_munge
        start_slurmctld
        start_slurmd
        info "ready; before using it: export SLURM_CONF=$CONF"
        ;;
    stop)
        require_root
        stop_cluster
        ;;
    status)
        status
        ;;
    env)
        echo "export SLURM_CONF=$CONF"
        ;;
    -h | --help | help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        ;;
    *)
        echo "usage: $0 configure|start|stop|status|env (see --help)" >&2
        exit 2
        ;;
esac
