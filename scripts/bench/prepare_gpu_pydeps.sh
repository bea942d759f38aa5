#!/usr/bin/env bash
# Fills a folder with diffusers, transformers, torchvision and the pure-Python / cp312 wheels they
# need, for a GPU machine whose Python (3.12, torch 2.11 preinstalled) has none of them and no
# network. Run it here, carry the folder and pass it as PYDEPS to scripts/bench/gpu.sh (or
# run_msa_gpu.sh). The pipeline code of diffusers (which the benchmarks do not import) is removed
# to keep the folder small.
# numpy and Pillow go to DIR/fallback, which scripts/bench/gpu.sh uses only when the GPU Python
# lacks them.
#
#   scripts/bench/prepare_gpu_pydeps.sh [DIR]     (default: bench-pydeps, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
target="${1:-bench-pydeps}"
# Wheels for the GPU machine's Python, whatever this machine's is.
for_gpu=(--quiet --python-version 3.12 --only-binary=:all: --no-deps
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python -m pip install "${for_gpu[@]}" --target "$target" \
    diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 torchvision==0.26.0 huggingface_hub==2.4.0 \
    httpx2==2.16.2 httpcore2==2.16.2 h11 anyio sniffio truststore click hf_xet safetensors==0.8.0 regex filelock requests \
    urllib3 idna certifi charset_normalizer fsspec packaging pyyaml tqdm typing_extensions importlib_metadata zipp
python -m pip install "${for_gpu[@]}" --target "$target/fallback" numpy==2.4.6 pillow==13.0.0
rm -rf "$target"/diffusers/pipelines/*/ "$target"/diffusers/modular_pipelines/*/ "$target"/bin "$target"/fallback/bin
# transformers stays whole: where the GPU Python has peft, diffusers imports it, and peft imports
# model classes from all over transformers' model zoo.
find "$target" -name __pycache__ -prune -exec rm -rf {} +
test -f "$target/diffusers/models/transformers/transformer_flux.py"
test -f "$target/transformers/models/dinov2_with_registers/modeling_dinov2_with_registers.py"
du -sh "$target"
