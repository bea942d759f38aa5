#!/usr/bin/env bash
# Fills a folder with diffusers and the pure-Python / cp312 wheels it needs, for a GPU machine
# whose Python (3.12, torch preinstalled) has no diffusers and no network. Run it here, carry the
# folder and pass it as PYDEPS to scripts/bench/run_msa_gpu.sh. The pipeline code of diffusers
# (which the benchmark does not import) is removed to keep the folder small (about 30 MB).
# Set WITH_NUMPY_PILLOW=1 if the GPU Python lacks numpy or Pillow (adds about 25 MB).
#
#   scripts/bench/prepare_gpu_pydeps.sh [DIR]     (default: bench-pydeps, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
target="${1:-bench-pydeps}"
python -m pip install --quiet --target "$target" --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps diffusers==0.42.1 huggingface_hub safetensors==0.8.0 regex filelock requests urllib3 \
    idna certifi charset_normalizer fsspec packaging pyyaml tqdm typing_extensions importlib_metadata zipp \
    ${WITH_NUMPY_PILLOW:+numpy==2.4.6 pillow==13.0.0}
rm -rf "$target"/diffusers/pipelines/*/ "$target"/diffusers/modular_pipelines/*/ "$target"/bin
find "$target" -name __pycache__ -prune -exec rm -rf {} +
test -f "$target/diffusers/models/transformers/transformer_flux.py"
du -sh "$target"
