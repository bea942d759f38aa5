#!/usr/bin/env bash
# GPU comparison of one SynCD group denoising step (N=3 images, full-size FLUX.1-dev, random bf16
# weights): the syncd worker (gathered Masked Shared Attention, fused attention kernels) against
# diffusers with the reference's dense-mask attention, on the same card, one after the other.
# Meant for the lent GPU machine, where there is no cargo: the worker binary is built elsewhere
# against the same libtorch version (torch 2.11) and carried along.
#
#   scripts/bench/run_msa_gpu.sh BINARY [SIZE] [STEPS]
#
# BINARY  the syncd-worker binary, built on a development machine against the same torch 2.11
#         (e.g. `cargo build -p syncd-worker --bin syncd-worker`, then
#         `mkdir -p bench-bin && strip -o bench-bin/syncd-worker $CARGO_TARGET_DIR/debug/syncd-worker`:
#         about 2.5 MB; bench-bin/ is git-ignored, carry it along)
# SIZE    512 (rigid) or 1024 (deformable); default 1024
# STEPS   timed steps after one warm-up step; default 3
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python); PYDEPS, a folder put on PYTHONPATH
# holding diffusers and its pure-Python dependencies when that Python lacks them (see
# scripts/bench/prepare_gpu_pydeps.sh). Each run prints a JSON line; the last lines are ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary="${1:?usage: run_msa_gpu.sh BINARY [SIZE] [STEPS]}"
size="${2:-1024}"
steps="${3:-3}"
python="${PYTHON:-/opt/torch/.venv/bin/python}"
if [ -n "${PYDEPS:-}" ]; then export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"; fi
torch_lib=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

run() { echo "\$ $*" >&2; "$@" 2>/dev/null | tail -n 1; }
results=()
results+=("$(run "$binary" bench-msa --device cuda --dtype bf16 --size "$size" --steps "$steps")")
results+=("$(run "$python" scripts/bench/flux_msa_reference.py --size "$size" --steps "$steps")")
results+=("$(run "$binary" bench-msa --device cuda --dtype bf16 --size "$size" --steps "$steps" --capture)")
results+=("$(run "$python" scripts/bench/flux_msa_reference.py --size "$size" --steps "$steps" --capture)")
results+=("$(run "$binary" bench-msa --device cuda --dtype bf16 --size "$size" --steps "$steps" --plain)")
results+=("$(run "$python" scripts/bench/flux_msa_reference.py --size "$size" --steps "$steps" --plain)")
printf '%s\n' "${results[@]}"
"$python" - "${results[@]}" <<'PY'
import json, sys
rows = [json.loads(line) for line in sys.argv[1:] if line.startswith("{")]
by_mode = {}
for row in rows:
    by_mode.setdefault(row["mode"], {})["rust" if row["implementation"].startswith("syncd") else "ref"] = row
for mode, pair in by_mode.items():
    if "rust" in pair and "ref" in pair:
        r, p = pair["rust"], pair["ref"]
        print(f"{mode}: reference / syncd seconds per step = {p['seconds_per_step'] / r['seconds_per_step']:.2f} "
              f"({p['seconds_per_step']:.3f} s vs {r['seconds_per_step']:.3f} s); peak MiB {p['peak_memory_mib']} vs {r['peak_memory_mib']}")
PY
