#!/usr/bin/env bash
# The GPU benchmark of generation and scoring, in one run on the lent GPU machine (where there is
# no cargo: the two binaries are built elsewhere against the same torch 2.11 and carried along).
#
#   scripts/bench/gpu.sh BIN_DIR
#
# BIN_DIR holds stripped release builds of `syncd-worker` and `syncd-scoring-bench`, and PYDEPS
# (default bench-pydeps) the Python packages the GPU machine's Python lacks. Prepared here:
#     cargo build --release -p syncd-worker --bin syncd-worker --bin syncd-scoring-bench
#     mkdir -p bench-bin && for b in syncd-worker syncd-scoring-bench; do
#         strip -o bench-bin/$b "$CARGO_TARGET_DIR/release/$b"; done
#     scripts/bench/prepare_gpu_pydeps.sh bench-pydeps
#     tar -cJf bench-carry.tar.xz bench-bin bench-pydeps
# The packages alone are about 70 MB, over what a device run carries; compressed, both folders
# are a fraction of it. Carry bench-carry.tar.xz (git-ignored) and run there:
#     tar -xJf bench-carry.tar.xz && scripts/bench/gpu.sh bench-bin
#
# It prints, with the device named:
#   1. one denoising step of full-size FLUX.1-dev (random bf16 weights, a group of 3, MSA on)
#      at 512² and 1024²: seconds and peak memory, syncd against diffusers running the
#      reference's dense-mask attention processor (scripts/bench/flux_msa_reference.py);
#   2. one whole group's denoising loop per recipe (rigid: Depth-dev, 512², 30 steps, true CFG
#      from step 1, masks, warping; deformable: 1024², 50 steps, attention-derived masks) in
#      seconds and over the FLOP floor at 790 TFLOP/s, with the rigid recipe's guidance passes
#      batched and separate;
#   3. scoring throughput (DINOv2-L/14-reg + CLIP-L/14 + aesthetic head, bf16) at batch 1, 8
#      and 32 against transformers on the same weights and images.
# Every part has a time limit of its own, so one that hangs leaves the others their time.
# Environment: PYTHON (default /opt/torch/.venv/bin/python), OUT (a folder for the raw JSON
# lines; default a temporary one).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin_dir="${1:?usage: gpu.sh BIN_DIR}"
python="${PYTHON:-/opt/torch/.venv/bin/python}"
export PYTHON="$python"
pydeps="${PYDEPS:-bench-pydeps}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
if [ -d "$pydeps" ]; then export PYTHONPATH="$(cd "$pydeps" && pwd)${PYTHONPATH:+:$PYTHONPATH}"; fi
torch_lib=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
worker="$bin_dir/syncd-worker"

section() { printf '\n== %s\n' "$*"; }
# Runs a command with a time limit, keeping its stdout (JSON lines) in $out/NAME.jsonl.
timed() {
    local name="$1" limit="$2"
    shift 2
    echo "\$ $*" >&2
    timeout "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
    local status=$?
    [ "$status" -eq 0 ] || { echo "$name: exit $status; last lines of its errors:"; tail -n 5 "$out/$name.err"; }
    cat "$out/$name.jsonl"
}

section "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())"

section "1. one MSA step, syncd against the dense-mask reference"
for size in 512 1024; do
    timed "msa-syncd-$size" 120 "$worker" bench-msa --device cuda --dtype bf16 --size "$size" --steps 3
    timed "msa-reference-$size" 150 "$python" scripts/bench/flux_msa_reference.py --size "$size" --steps 3
done
"$python" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def last(name):
    lines = [l for l in (out / f"{name}.jsonl").read_text().splitlines() if l.startswith("{")] if (out / f"{name}.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else None
print("size | syncd s/step | reference s/step | reference/syncd | syncd peak MiB | reference peak MiB")
for size in (512, 1024):
    r, p = last(f"msa-syncd-{size}"), last(f"msa-reference-{size}")
    if r and p:
        print(f"{size} | {r['seconds_per_step']:.3f} | {p['seconds_per_step']:.3f} | "
              f"{p['seconds_per_step'] / r['seconds_per_step']:.2f} | {r['peak_memory_mib']} | {p['peak_memory_mib']}")
PY

section "2. whole groups over the FLOP floor"
timed group-rigid 180 "$worker" bench-group --recipe rigid --device cuda --dtype bf16 --cfg-passes both
timed group-deformable 180 "$worker" bench-group --recipe deformable --device cuda --dtype bf16

section "3. scoring, syncd against transformers"
timed scoring 240 scripts/bench/scoring_bench.sh --preset full --device cuda --dtype bf16 --threads 8 \
    --images 64 --size 1024 --batch-sizes 1,8,32 --repeats 2 --binary "$bin_dir/syncd-scoring-bench"
echo "raw results: $out"
