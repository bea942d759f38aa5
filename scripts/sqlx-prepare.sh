#!/usr/bin/env bash
# Writes (or, with --check, verifies) `.sqlx/`: the description of every compile-time-checked
# query (`sqlx::query!` and its kin) that the coordinator's database layer holds.
#
# The query macros check each statement against a database with the schema of `migrations/`.
# Builds do not need one: `.cargo/config.toml` sets SQLX_OFFLINE=true, so they read `.sqlx/`
# instead, and a statement that is not described there does not compile. This script describes
# them from a real database:
#   1. a scratch database ($SYNCD_SQLX_DATABASE, default `syncd_sqlx`) is made afresh and every
#      migration applied in order, as the coordinator applies them;
#   2. the coordinator is checked online (SQLX_OFFLINE=false) with SQLX_OFFLINE_DIR pointing at
#      a fresh folder, where the macros write one file per statement;
#   3. without --check, that folder replaces `.sqlx/`; with --check, it must equal `.sqlx/`
#      (no statement missing, changed or left over), or the script fails and says what differs.
#
# Usage: scripts/sqlx-prepare.sh [--check]
# Needs PostgreSQL at $SYNCD_TEST_DATABASE_URL (from ~/.cache/syncd/services.env).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"
cd "$REPO_ROOT"

check=false
case "${1:-}" in
    --check) check=true ;;
    "") ;;
    *) echo "usage: $0 [--check]" >&2; exit 64 ;;
esac

if [[ -z "${SYNCD_TEST_DATABASE_URL:-}" && -f "$SYNCD_CACHE/services.env" ]]; then
    set -a
    # shellcheck disable=SC1091
    . "$SYNCD_CACHE/services.env"
    set +a
fi
: "${SYNCD_TEST_DATABASE_URL:?not set: run scripts/setup.sh first}"
database="${SYNCD_SQLX_DATABASE:-syncd_sqlx}"
database_url="${SYNCD_TEST_DATABASE_URL%/*}/$database"

export PGOPTIONS="--client-min-messages=warning"
psql "$SYNCD_TEST_DATABASE_URL" -v ON_ERROR_STOP=1 -qAt \
    -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" -c "CREATE DATABASE $database"
for migration in migrations/*.sql; do
    psql "$database_url" -v ON_ERROR_STOP=1 -q -1 -f "$migration" >/dev/null
done

described="$(mktemp -d)"
trap 'rm -rf "$described"' EXIT
# The macros run when the crate compiles; cargo does not see the environment they read, so the
# crate is marked changed to make them run again.
touch coordinator/src/lib.rs
SQLX_OFFLINE=false DATABASE_URL="$database_url" SQLX_OFFLINE_DIR="$described" \
    cargo check --quiet --locked -p syncd-coordinator --all-targets
touch coordinator/src/lib.rs

if $check; then
    if ! diff -r "$described" .sqlx >/dev/null 2>&1; then
        echo "error: .sqlx/ does not describe the coordinator's queries as they are now:" >&2
        diff -rq "$described" .sqlx >&2 || true
        echo "run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
        exit 1
    fi
    echo ".sqlx/ describes all $(find .sqlx -name 'query-*.json' | wc -l) queries"
else
    rm -rf .sqlx
    mkdir .sqlx
    cp "$described"/query-*.json .sqlx/ 2>/dev/null || true
    echo "wrote .sqlx/ ($(find .sqlx -name 'query-*.json' | wc -l) queries)"
fi
