#!/usr/bin/env python3
"""The Python side of the scoring benchmark, and the models and images both sides use.

Subcommands:

  make-models --preset tiny|small|full --out DIR
      Random-initialised models of the scoring architectures in their Hugging Face folder layout
      (DIR/dinov2, DIR/clip) plus an improved-MLP aesthetic head (DIR/head.pth, torch.save of
      its state dict, and DIR/head.safetensors with the same tensors). Presets:
        tiny  - hidden 32, 2 layers, 4 heads, patch 14 (real image sizes, negligible compute)
        small - DINOv2-S/14-reg and a CLIP tower of the same size (CPU-sized compute)
        full  - DINOv2-L/14-reg (facebook/dinov2-with-registers-large) and CLIP ViT-L/14
                (openai/clip-vit-large-patch14): the production sizes, for a GPU.
  make-images --count N --size S --out DIR
      N seeded RGB images of S x S pixels (NAME.png) with elliptic masks (NAME.mask.png).
  bench --models DIR --images DIR --device cpu|cuda --dtype fp32|bf16 --threads T
        --batch-sizes 1,8,32 --repeats R
      The reference scoring (transformers models, default torchvision-backend processors,
      the same crop rule), timed like the Rust bench binary; one JSON line per batch size.
  compare PYTHON.jsonl RUST.jsonl
      Prints throughput side by side with ratios, and how far the two sides' scores lie apart.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def preset_configs(preset):
    from transformers import CLIPVisionConfig, Dinov2WithRegistersConfig

    if preset == "tiny":
        dino = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
        clip = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    elif preset == "small":
        dino = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6)
        clip = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
    elif preset == "full":
        dino = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
        clip = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    else:
        raise SystemExit(f"unknown preset {preset}")
    dino_config = Dinov2WithRegistersConfig(
        **dino, image_size=518, patch_size=14, num_register_tokens=4, layerscale_value=1e-5
    )
    clip_config = CLIPVisionConfig(
        **clip, image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu"
    )
    return dino_config, clip_config


def randomize(model):
    """Seeded noise in every parameter: the default initialisation leaves the CLS path almost
    untouched (zero tokens, LayerScale 1e-5), which would make every image look the same and the
    two sides' scores agree trivially."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_norm = name.endswith("norm.weight") or "norm1.weight" in name or "norm2.weight" in name
            parameter.copy_(1.0 + 0.1 * noise if is_norm else 0.05 * noise)
    return model.eval()


def make_models(args):
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection, Dinov2WithRegistersModel

    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dino_config, clip_config = preset_configs(args.preset)
    randomize(Dinov2WithRegistersModel(dino_config)).save_pretrained(out / "dinov2")
    randomize(CLIPVisionModelWithProjection(clip_config)).save_pretrained(out / "clip")
    head = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    state = {f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}
    torch.save(state, out / "head.pth")
    save_file(state, str(out / "head.safetensors"))
    print(f"wrote the {args.preset} models to {out}")


def make_images(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    size = args.size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for index in range(args.count):
        freqs = rng.uniform(0.005, 0.05, size=(3, 2))
        image = np.stack([127 + 100 * np.sin(fx * x + fy * y) for fx, fy in freqs], axis=-1)
        image += rng.normal(0, 10, size=image.shape)
        cx, cy = rng.uniform(0.3, 0.7, size=2) * size
        rx, ry = rng.uniform(0.1, 0.3, size=2) * size
        mask = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0).astype(np.uint8) * 255
        name = f"image_{index:03d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out / f"{name}.png")
        Image.fromarray(mask).save(out / f"{name}.mask.png")
    print(f"wrote {args.count} images of {size}x{size} to {out}")


def object_crop_box(mask):
    """The square bounding box of the mask (> 127), clamped to the image; the whole image when
    the mask is empty (worker/src/scoring/crop.rs states the rule)."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask > 127)
    if len(xs) == 0:
        return 0, 0, width, height
    left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(right - left, bottom - top)

    def span(lo, hi, limit):
        if side >= limit:
            return 0, limit
        start = min(max(lo - (side - (hi - lo)) // 2, 0), limit - side)
        return start, start + side

    x0, x1 = span(left, right, width)
    y0, y1 = span(top, bottom, height)
    return int(x0), int(y0), int(x1), int(y1)


class ReferenceScorer:
    def __init__(self, models: Path, device: str, dtype: torch.dtype, dinov2_resize, dinov2_crop, clip_size):
        from transformers import (
            BitImageProcessor,
            CLIPImageProcessor,
            CLIPVisionModelWithProjection,
            Dinov2WithRegistersModel,
        )

        self.device, self.dtype = device, dtype
        self.dino = Dinov2WithRegistersModel.from_pretrained(models / "dinov2", dtype=dtype).to(device).eval()
        self.clip = CLIPVisionModelWithProjection.from_pretrained(models / "clip", dtype=dtype).to(device).eval()
        self.head = torch.nn.Sequential(
            torch.nn.Linear(768, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )
        state = torch.load(models / "head.pth", map_location="cpu")
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
        # The head runs in float32, as in the Rust scorer.
        self.head = self.head.to(device).eval()
        self.dino_processor = BitImageProcessor(
            size={"shortest_edge": dinov2_resize},
            crop_size={"height": dinov2_crop, "width": dinov2_crop},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        self.clip_processor = CLIPImageProcessor(
            size={"shortest_edge": clip_size}, crop_size={"height": clip_size, "width": clip_size}
        )

    @torch.no_grad()
    def score_group(self, images, masks, batch_size):
        aesthetic, embeddings = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixels = self.clip_processor(images=batch, return_tensors="pt")["pixel_values"]
            embeds = self.clip(pixel_values=pixels.to(self.device, self.dtype)).image_embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            aesthetic.append(self.head(embeds)[:, 0].cpu())
            crops = [
                image.crop(object_crop_box(mask))
                for image, mask in zip(batch, masks[start : start + batch_size])
            ]
            pixels = self.dino_processor(images=crops, return_tensors="pt")["pixel_values"]
            pooled = self.dino(pixel_values=pixels.to(self.device, self.dtype)).pooler_output.float()
            embeddings.append((pooled / pooled.norm(dim=-1, keepdim=True)).cpu())
        embeddings = torch.cat(embeddings)
        similarities = embeddings @ embeddings.T
        count = len(images)
        pairs = [float(similarities[a, b]) for a in range(count) for b in range(a + 1, count)]
        return torch.cat(aesthetic).tolist(), pairs


def bench(args):
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    image_dir = Path(args.images)
    names = sorted(p for p in image_dir.glob("*.png") if not p.name.endswith(".mask.png"))
    images = [Image.open(p).convert("RGB") for p in names]
    for image in images:
        image.load()
    masks = [np.array(Image.open(p.with_suffix(".mask.png")).convert("L")) for p in names]
    start = time.perf_counter()
    scorer = ReferenceScorer(
        Path(args.models), args.device, dtype, args.dinov2_resize, args.dinov2_crop, args.clip_size
    )
    print(f"models loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        aesthetic, pairs = scorer.score_group(images, masks, batch_size)
        synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            scorer.score_group(images, masks, batch_size)
        synchronize()
        seconds = time.perf_counter() - start
        scored = len(images) * args.repeats
        print(
            json.dumps(
                {
                    "impl": "python",
                    "device": args.device,
                    "dtype": args.dtype,
                    "threads": torch.get_num_threads(),
                    "batch_size": batch_size,
                    "images": scored,
                    "seconds": seconds,
                    "images_per_second": scored / seconds,
                    "aesthetic_head": aesthetic[:4],
                    "similarity_head": pairs[:4],
                }
            ),
            flush=True,
        )


def compare(args):
    def rows(path):
        return {
            row["batch_size"]: row
            for row in (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
        }

    python, rust = rows(args.python), rows(args.rust)
    print(f"{'batch':>5} {'python img/s':>13} {'rust img/s':>11} {'rust/python':>12} {'max |d score|':>14} {'max |d sim|':>12}")
    for batch_size in sorted(set(python) & set(rust)):
        p, r = python[batch_size], rust[batch_size]
        score_gap = max(abs(a - b) for a, b in zip(p["aesthetic_head"], r["aesthetic_head"]))
        sim_gap = max((abs(a - b) for a, b in zip(p["similarity_head"], r["similarity_head"])), default=0.0)
        print(
            f"{batch_size:>5} {p['images_per_second']:>13.2f} {r['images_per_second']:>11.2f} "
            f"{r['images_per_second'] / p['images_per_second']:>12.2f} {score_gap:>14.2e} {sim_gap:>12.2e}"
        )
    first = next(iter(rust.values()), {})
    print(f"device {first.get('device')}, dtype {first.get('dtype')}, threads {first.get('threads')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("make-models")
    models.add_argument("--preset", default="tiny", choices=["tiny", "small", "full"])
    models.add_argument("--out", required=True)
    images = commands.add_parser("make-images")
    images.add_argument("--count", type=int, default=32)
    images.add_argument("--size", type=int, default=512)
    images.add_argument("--out", required=True)
    run = commands.add_parser("bench")
    run.add_argument("--models", required=True)
    run.add_argument("--images", required=True)
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    run.add_argument("--threads", type=int, default=torch.get_num_threads())
    run.add_argument("--batch-sizes", default="1,8,32")
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--dinov2-resize", type=int, default=256)
    run.add_argument("--dinov2-crop", type=int, default=224)
    run.add_argument("--clip-size", type=int, default=224)
    both = commands.add_parser("compare")
    both.add_argument("python")
    both.add_argument("rust")
    args = parser.parse_args()
    {"make-models": make_models, "make-images": make_images, "bench": bench, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
