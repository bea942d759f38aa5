#!/usr/bin/env bash
# Fills a folder with diffusers, transformers, torchvision and the pure-Python / cp312 wheels they
# need, for a GPU machine whose Python (3.12, torch 2.11 preinstalled) has none of them and no
# network. Run it here, carry the folder and pass it as PYDEPS to scripts/bench/gpu.sh (or
# run_msa_gpu.sh). The pipeline code of diffusers and the model zoo of transformers beyond the
# scoring models (which the benchmarks do not import) are removed to keep the folder small.
# Set WITH_NUMPY_PILLOW=1 if the GPU Python lacks numpy or Pillow (adds about 25 MB).
#
#   scripts/bench/prepare_gpu_pydeps.sh [DIR]     (default: bench-pydeps, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
target="${1:-bench-pydeps}"
python -m pip install --quiet --target "$target" --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 torchvision==0.26.0 huggingface_hub safetensors==0.8.0 regex filelock requests urllib3 \
    idna certifi charset_normalizer fsspec packaging pyyaml tqdm typing_extensions importlib_metadata zipp \
    ${WITH_NUMPY_PILLOW:+numpy==2.4.6 pillow==13.0.0}
rm -rf "$target"/diffusers/pipelines/*/ "$target"/diffusers/modular_pipelines/*/ "$target"/bin
# transformers imports its model folders lazily: keep the scoring models and what they import.
find "$target"/transformers/models -mindepth 1 -maxdepth 1 -type d \
    ! -name clip ! -name dinov2 ! -name dinov2_with_registers ! -name bit ! -name auto -exec rm -rf {} +
find "$target" -name __pycache__ -prune -exec rm -rf {} +
test -f "$target/diffusers/models/transformers/transformer_flux.py"
test -f "$target/transformers/models/dinov2_with_registers/modeling_dinov2_with_registers.py"
du -sh "$target"
