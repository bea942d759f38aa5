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
#   2. scoring throughput (DINOv2-L/14-reg + CLIP-L/14 + aesthetic head, bf16) at batch 1, 8
#      and 32 against transformers on the same weights and images;
#   3-4. one whole group's denoising loop per recipe (rigid: Depth-dev, 512², 30 steps, true CFG
#      from step 1, masks, warping; deformable: 1024², 50 steps, attention-derived masks) in
#      seconds and over the FLOP floor at 790 TFLOP/s, with the rigid recipe's guidance passes
#      batched and separate, and the deformable one three ways: cuDNN attention building a graph
#      per key length (libtorch's default; twice, the second loop finding the first's graphs
#      built, as a worker's models thread does for lengths it met before), per power of two of
#      the length, and flash attention first (no graphs), with libtorch's count of the graphs
#      the cuDNN ways found already built.
# Every part has a time limit of its own, and all of them share DEADLINE (seconds from the start,
# default 540), so one that hangs leaves the others their time and the whole run fits one device
# call. Environment: PARTS (default "msa scoring rigid deformable"), PYTHON (default
# /opt/torch/.venv/bin/python), OUT (a folder for the raw JSON
# lines and the summary; default a temporary one).
set -uo pipefail
cd "$(dirname "$0")/../.."
bin_dir="${1:?usage: gpu.sh BIN_DIR}"
python="${PYTHON:-/opt/torch/.venv/bin/python}"
export PYTHON="$python"
pydeps="${PYDEPS:-bench-pydeps}"
out="${OUT:-$(mktemp -d)}"
deadline=$((SECONDS + ${DEADLINE:-540}))
mkdir -p "$out"
if [ -d "$pydeps" ]; then
    pydeps="$(cd "$pydeps" && pwd)"
    export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"
    # numpy and Pillow are carried too, but used only where the machine's Python has none: its
    # own builds are the ones its torch was tested with.
    if ! "$python" -c "import numpy, PIL" 2>/dev/null; then PYTHONPATH="$PYTHONPATH:$pydeps/fallback"; fi
fi
torch_lib=$("$python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
worker="$bin_dir/syncd-worker"
# Errors without a backtrace, so that the last lines of a failed part say what failed.
export RUST_LIB_BACKTRACE=0 RUST_BACKTRACE=0

section() { printf '\n== %s\n' "$*"; }
# Runs a command with a time limit (cut to what is left before the deadline), keeping its
# stdout (JSON lines) in $out/NAME.jsonl.
timed() {
    local name="$1" limit="$2"
    shift 2
    local left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit="$left"
    [ "$limit" -gt 5 ] || { echo "$name: skipped, the deadline has passed"; return; }
    echo "\$ $*" >&2
    timeout "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
    local status=$?
    [ "$status" -eq 0 ] || { echo "$name: exit $status; last lines of its errors:"; tail -n 8 "$out/$name.err"; }
    cat "$out/$name.jsonl"
}

section "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())"
"$python" -c "import diffusers, transformers, torchvision, numpy, PIL; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__)"

# PARTS picks parts (default all, in this order): msa, scoring, rigid, deformable.
parts=" ${PARTS:-msa scoring rigid deformable} "
part() { [[ "$parts" == *" $1 "* ]]; }

if part msa; then
    section "1. one MSA step, syncd against the dense-mask reference"
    for size in 512 1024; do
        timed "msa-syncd-$size" 75 "$worker" bench-msa --device cuda --dtype bf16 --size "$size" --steps 3
        timed "msa-reference-$size" 90 "$python" scripts/bench/flux_msa_reference.py --size "$size" --steps 3
    done
    # The deformable recipe's step also captures the category word's attention in every layer.
    timed msa-syncd-1024-capture 75 "$worker" bench-msa --device cuda --dtype bf16 --size 1024 --steps 3 --capture
    "$python" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def last(name):
    lines = [l for l in (out / f"{name}.jsonl").read_text().splitlines() if l.startswith("{")] if (out / f"{name}.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else None
print("size | syncd s/step | reference s/step | reference/syncd | syncd peak MiB | reference peak MiB"
      " | syncd kernels | reference kernels")
for size in (512, 1024):
    r, p = last(f"msa-syncd-{size}"), last(f"msa-reference-{size}")
    if r and p:
        print(f"{size} | {r['seconds_per_step']:.3f} | {p['seconds_per_step']:.3f} | "
              f"{p['seconds_per_step'] / r['seconds_per_step']:.2f} | {r['peak_memory_mib']} | {p['peak_memory_mib']}"
              f" | {r.get('attention_kernels')} | {p.get('attention_kernels')}")
PY
fi

if part scoring; then
    section "2. scoring, syncd against transformers"
    timed scoring 200 scripts/bench/scoring_bench.sh --preset full --device cuda --dtype bf16 --threads 8 \
        --images 64 --size 1024 --batch-sizes 1,8,32 --repeats 2 --binary "$bin_dir/syncd-scoring-bench"
fi

if part rigid; then
    section "3. a rigid group over the FLOP floor, guidance passes batched and separate"
    timed group-rigid 120 "$worker" bench-group --recipe rigid --device cuda --dtype bf16 --cfg-passes both
fi

if part deformable; then
    section "4. a deformable group over the FLOP floor: cuDNN graphs per length (twice), per power of two, flash first"
    # Its masks, and so its key lengths, change every step: by default cuDNN builds an attention
    # graph for every new length. The first way runs the loop twice from the same latents, so its
    # second loop meets the same lengths with their graphs built: the difference is what building
    # costs. TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (libtorch, experimental) runs every length on the
    # graph of the next power of two (with ragged offsets), which needs the query, key and value
    # in [batch, sequence, heads, dim] memory order: the key lengths that vary are those of the
    # per-image calls, whose tensors are. TORCH_CUDNN_SDPA_DEPRIORITIZED=1 puts flash attention,
    # which builds nothing per shape, ahead of cuDNN (its kernels are in the line's
    # attention_kernels).
    timed group-deformable 240 "$worker" bench-group --recipe deformable --device cuda --dtype bf16 --repeats 2
    timed group-deformable-per-power-of-two 150 env TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 \
        "$worker" bench-group --recipe deformable --device cuda --dtype bf16
    timed group-deformable-flash-first 150 env TORCH_CUDNN_SDPA_DEPRIORITIZED=1 \
        "$worker" bench-group --recipe deformable --device cuda --dtype bf16
    # Whether the graphs are the cause, seen in libtorch's own count: a short group of each kind
    # with its cuDNN graph cache reporting (a warning per attention call, so not in the timed
    # runs above); the last report gives the calls and the share that found a graph built.
    for variant in per-length per-power-of-two; do
        flag=0
        [ "$variant" = per-power-of-two ] && flag=1
        timed "graph-cache-$variant" 60 env TORCH_CUDNN_SDPA_CACHE_DEBUG=1 TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$flag \
            "$worker" bench-group --recipe deformable --device cuda --dtype bf16 --steps 6 | grep -v "^{"
        echo "$variant, 6 steps after the warm-up's 2: $(grep -o 'SDPA Cache Called.*' "$out/graph-cache-$variant.err" | tail -n 1)"
    done
fi
echo "raw results: $out"
