#!/usr/bin/env bash
# The one command that runs every check of the project, locally and in CI.
#
# 1. Set-up (scripts/setup.sh): services started; the venv and Garage build skip when present.
# 2. cargo fmt --check, clippy with warnings denied, the sqlx offline data checked against the
#    migrations (scripts/sqlx-prepare.sh --check), and the whole workspace's tests against the
#    real PostgreSQL, RabbitMQ and Garage (settings from $SYNCD_CACHE/services.env).
# 3. scripts/fuzz.sh, if the project has one.
#
# The cargo target folder comes from scripts/env.sh and lies outside the checkout, so a fresh
# clone on a machine that built before reuses the build.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"

section() { printf '\n==== %s ====\n' "$*"; }
START=$SECONDS

section "Set-up"
"$SCRIPT_DIR/setup.sh"
set -a
# shellcheck disable=SC1091
. "$SYNCD_CACHE/services.env"
set +a

section "Toolchain"
cargo --version
rustc --version
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "sqlx offline data (.sqlx/ describes every checked query)"
bash scripts/sqlx-prepare.sh --check

section "cargo build (the end-to-end tests start the real binaries)"
cargo build --workspace --bins --locked

section "cargo test"
rm -f "$CARGO_TARGET_DIR/fault-suite.md"
cargo test --workspace --locked --no-fail-fast

if [[ -f "$CARGO_TARGET_DIR/fault-suite.md" ]]; then
    section "Fault suite (tests/tests/faults.rs)"
    cat "$CARGO_TARGET_DIR/fault-suite.md"
fi

if [[ -x "$SCRIPT_DIR/fuzz.sh" ]]; then
    section "scripts/fuzz.sh"
    "$SCRIPT_DIR/fuzz.sh"
elif [[ -f "$SCRIPT_DIR/fuzz.sh" ]]; then
    section "scripts/fuzz.sh"
    bash "$SCRIPT_DIR/fuzz.sh"
fi

# ---- Deployment files (deploy/): compose, Kubernetes, shell scripts; offline, no docker ----
section "scripts/check-deploy.sh"
bash "$SCRIPT_DIR/check-deploy.sh"
# ---- end of the deployment section ----

section "All checks passed in $((SECONDS - START)) s"
