#!/usr/bin/env bash
# Tiny FLUX transformer forward, syncd-worker (libtorch) vs diffusers, same weights, inputs and
# thread count, run one after the other on this machine. Prints both JSON lines and the ratios
# (diffusers time / syncd time: above 1 means the Rust side is faster).
#
#   scripts/bench/flux_transformer_ratio.sh [threads] [iterations]
#
# PROFILE=dev reuses the debug build (dependencies at opt-level 2, the worker crate unoptimised)
# instead of compiling everything again in the bench (release) profile.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
threads="${1:-1}"
iterations="${2:-200}"
rust=$(cargo bench -q -p syncd-worker --profile "${PROFILE:-bench}" --bench flux_transformer -- --threads "$threads" --iterations "$iterations" | tail -n 1)
python=$(python scripts/bench/flux_reference.py --threads "$threads" --iterations "$iterations" 2>/dev/null | tail -n 1)
echo "$rust"
echo "$python"
python - "$rust" "$python" <<'PY'
import json, sys
rust, python = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for key in ("forward_seconds", "msa_forward_seconds"):
    print(f"{key}: diffusers / syncd = {python[key] / rust[key]:.2f}  "
          f"({python[key] * 1e3:.3f} ms vs {rust[key] * 1e3:.3f} ms)")
PY
