"""diffusers side of the tiny FLUX transformer benchmark (worker/benches/flux_transformer.rs):
the same fixture weights and inputs, the same thread count, median seconds per forward, plain
and as a group with the reference's dense-mask shared attention. Prints one JSON line.

    python scripts/bench/flux_reference.py --threads 1 --iterations 200
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "worker" / "tests" / "fixtures" / "flux"


def fixture_module():
    spec = importlib.util.spec_from_file_location("make_flux_fixtures", ROOT / "scripts/fixtures/make_flux_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(iterations, run):
    for _ in range(-(-iterations // 10)):
        run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = fixture_module()
    model = FluxTransformer2DModel.from_pretrained(FIXTURES / "tiny-dev").eval()
    plain = {k: v for k, v in load_file(FIXTURES / "transformer_dev.safetensors").items() if k != "sample"}
    group = load_file(FIXTURES / "msa_masked.safetensors")
    group_inputs = {k: group[k] for k in plain}
    with torch.no_grad():
        plain_seconds = median_seconds(args.iterations, lambda: model(**plain, return_dict=False))
        spans = [tuple(s) for s in group["spans"].tolist()]
        # The reference builds its processors and dense mask per forward here, as per step.
        msa_seconds = median_seconds(args.iterations, lambda: reference.run_msa(
            model, group_inputs, group["masks"], float(group["timestep"][0]), spans))
    print(json.dumps({"implementation": "diffusers", "threads": args.threads, "iterations": args.iterations,
                      "forward_seconds": plain_seconds, "msa_forward_seconds": msa_seconds}))


if __name__ == "__main__":
    main()
