#!/usr/bin/env bash
# Validates the deployment (deploy/) offline: compose files against the Compose Specification's
# schema and as docker compose would load them, Kubernetes manifests against the Kubernetes API
# schemas, shell scripts with shellcheck, YAML with yamllint, and the deployment's own rules
# (scripts/check_deploy.py says which). Neither docker nor kubectl is needed. Prometheus'
# configuration, the alert rules, their unit tests and the dashboard's queries are checked with
# promtool from Debian's prometheus package (scripts/setup.sh installs it); without it those
# checks are skipped, or fail under CI=true.
#
# The tools (scripts/requirements-deploy-check.txt, from PyPI) are installed once into
# $SYNCD_CACHE/deploy-check-venv and reused while the requirements file is unchanged; they carry
# the schemas, so after that the checks use no network.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
# shellcheck source=scripts/env.sh
. "$SCRIPT_DIR/env.sh"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

VENV="$SYNCD_CACHE/deploy-check-venv"
REQUIREMENTS="$SCRIPT_DIR/requirements-deploy-check.txt"
STAMP="$VENV/.requirements.sha256"

die() {
    echo "check-deploy: $*" >&2
    exit 1
}

# The venv is up to date while its stamp holds the requirements file's hash.
wanted="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]]; then
    echo "check-deploy: tools up to date in $VENV"
else
    python="$(find_python 'sys.version_info >= (3, 11)')" || die "Python 3.11 or newer not found"
    echo "check-deploy: installing $(basename "$REQUIREMENTS") into $VENV"
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "could not create $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" ||
        die "pip install -r $REQUIREMENTS failed"
    echo "$wanted" >"$STAMP"
fi

exec "$VENV/bin/python" "$SCRIPT_DIR/check_deploy.py" --repo "$REPO_ROOT"
