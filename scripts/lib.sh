#!/usr/bin/env bash
# Shell functions the set-up scripts share. Sourced, never run.

# Waits up to $1 seconds for the command in the remaining arguments to succeed.
wait_for() {
    local seconds="$1"
    shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}
