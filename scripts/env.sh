# shellcheck shell=bash
# Environment shared by the set-up, demo and test scripts. Source it: `. scripts/env.sh`.
#
# Everything expensive to rebuild (the Python venv that provides libtorch, Garage's binary, the
# cargo target folder) lives in one cache folder outside the checkout, so a fresh clone on a
# machine that already ran the set-up reuses it.
export SYNCD_CACHE="${SYNCD_CACHE:-$HOME/.cache/syncd}"
export SYNCD_VENV="${SYNCD_VENV:-$SYNCD_CACHE/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SYNCD_CACHE/target}"
export PATH="$SYNCD_VENV/bin:$SYNCD_CACHE/garage/bin:$PATH"
# tch links against the libtorch inside the venv's `torch` wheel.
export LIBTORCH_USE_PYTORCH=1
export PYTHON_SYS_EXECUTABLE="$SYNCD_VENV/bin/python"
export LIBTORCH_BYPASS_VERSION_CHECK=1
TORCH_LIB="$SYNCD_VENV/lib/python3.11/site-packages/torch/lib"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
