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

# Prints the path of the first of python3.11 and python3 for which the Python condition $1
# holds (`sys` imported), e.g. 'sys.version_info[:2] == (3, 11)'; fails when none does.
find_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c "import sys; sys.exit(not ($1))" 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}
