#!/usr/bin/env bash
# Scoring throughput, Rust scorer against the Python reference, side by side in one run.
#
#   scripts/bench/scoring_bench.sh [--preset tiny|small|full] [--device cpu|cuda] [--dtype fp32|bf16]
#                                  [--threads N] [--images N] [--size S] [--batch-sizes 1,8,32]
#                                  [--repeats R] [--workdir DIR] [--binary PATH]
#
# Creates random models of the preset (once per workdir) and N seeded S x S images, runs
# `scoring_reference.py bench` and the `syncd-scoring-bench` binary on the same weights, images,
# device, dtype and thread count, and prints images/second with the rust/python ratio.
#
# The binary defaults to $CARGO_TARGET_DIR/release/syncd-scoring-bench (build it with
# `cargo build --release -p syncd-worker --bin syncd-scoring-bench`). Python is `$PYTHON`
# (default `python3`), which needs torch, torchvision, transformers, safetensors and pillow.
# The binary finds libtorch through LD_LIBRARY_PATH; this script prepends the torch/lib folder of
# `$PYTHON`'s torch, which must be the torch version the binary was built against.
set -euo pipefail

preset=tiny device=cpu dtype=fp32 threads=2 count=32 size=512 batch_sizes=1,8,32 repeats=3
workdir="${TMPDIR:-/tmp}/syncd-scoring-bench"
binary="${CARGO_TARGET_DIR:-target}/release/syncd-scoring-bench"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --images) count="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --batch-sizes) batch_sizes="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
reference="$here/scoring_reference.py"
models="$workdir/models-$preset"
images="$workdir/images-$count-$size"
results="$workdir/results-$preset-$device-$dtype-$threads"
mkdir -p "$workdir" "$results"

[[ -x "$binary" ]] || { echo "no bench binary at $binary (see the header of this script)" >&2; exit 1; }
[[ -f "$models/head.safetensors" ]] || "$python" "$reference" make-models --preset "$preset" --out "$models"
[[ -d "$images" ]] || "$python" "$reference" make-images --count "$count" --size "$size" --out "$images"

torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMP_NUM_THREADS="$threads"

common=(--device "$device" --dtype "$dtype" --threads "$threads" --batch-sizes "$batch_sizes" --repeats "$repeats")
echo "python reference ($preset, $device, $dtype, $threads threads)..." >&2
"$python" "$reference" bench --models "$models" --images "$images" "${common[@]}" | tee "$results/python.jsonl"
echo "rust scorer..." >&2
"$binary" --dinov2 "$models/dinov2" --clip "$models/clip" --head "$models/head.safetensors" --head-kind mlp \
  --images "$images" "${common[@]}" | tee "$results/rust.jsonl"
"$python" "$reference" compare "$results/python.jsonl" "$results/rust.jsonl"
