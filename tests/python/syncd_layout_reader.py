"""Reads an exported folder the way the SynCD reference trainer's data loader does
(`method/data/data.py` of nupurkmr9/syncd), and prints what it read.

The trainer takes one or more root folders. In each, it reads every JSON file whose name ends in
`metadata.json` (or, when it filters by score, `metadata_with_scores.json`): a JSON list of
items, each with `filenames` (image paths relative to the root, one per image of the group) and
`prompts` (as many). The mask of `{root}/{name}.jpg` is `{root}/masks/{name}.jpg`, read as
greyscale and thresholded > 0. Filtering by score, it re-applies the rule "aesthetic >= a and in
a pair whose DINOv2 similarity is in [d, 0.98]" with `dino_scores` (an N x N matrix) and
`aesthetics_scores` (keyed by each image's file stem), and keeps a group with at least 2 valid
images.

This reader does the same, fails (non-zero, with a message) on anything the trainer could not
read, and prints one JSON object: every item with its images and masks summarised, for the
caller to compare with the dataset the folder was exported from.

Usage: python syncd_layout_reader.py ROOT [ROOT ...] [--filter-by-score --min-aesthetic A --min-dino D]
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
from PIL import Image

MAX_DINO = 0.98


def check(condition, message):
    if not condition:
        sys.exit(f"syncd_layout_reader.py: {message}")


def valid_images(item, min_aesthetic, min_dino):
    """Indices of the images the trainer's rule keeps."""
    stems = [os.path.splitext(name)[0] for name in item["filenames"]]
    dino = np.asarray(item["dino_scores"], dtype=np.float64)
    valid = []
    for i, stem in enumerate(stems):
        in_pair = any(
            min_dino <= dino[i, j] <= MAX_DINO for j in range(len(stems)) if j != i
        )
        if item["aesthetics_scores"][stem] >= min_aesthetic and in_pair:
            valid.append(i)
    return valid


def read_item(root, item):
    filenames, prompts = item["filenames"], item["prompts"]
    check(isinstance(filenames, list) and filenames, f"an item has no filenames: {item}")
    check(len(prompts) == len(filenames), f"{filenames}: {len(prompts)} prompts")
    count = len(filenames)
    dino = np.asarray(item["dino_scores"], dtype=np.float64)
    check(dino.shape == (count, count), f"{filenames}: dino_scores of shape {dino.shape}")
    check(np.allclose(dino, dino.T), f"{filenames}: dino_scores is not symmetric")
    check(np.allclose(np.diag(dino), 1.0), f"{filenames}: dino_scores' diagonal is not 1")
    images, masks = [], []
    for name in filenames:
        stem = os.path.splitext(name)[0]
        check(stem in item["aesthetics_scores"], f"no aesthetic score for {stem}")
        image = Image.open(os.path.join(root, name)).convert("RGB")
        pixels = np.asarray(image)
        mask = np.asarray(Image.open(os.path.join(root, "masks", name)).convert("L")) > 0
        check(mask.shape == pixels.shape[:2], f"{name}: mask {mask.shape}, image {pixels.shape}")
        images.append({"size": list(image.size), "mean": float(pixels.mean())})
        masks.append({"foreground": int(mask.sum()), "pixels": int(mask.size)})
    check(
        set(item["aesthetics_scores"]) == {os.path.splitext(name)[0] for name in filenames},
        f"{filenames}: aesthetics_scores has other keys: {sorted(item['aesthetics_scores'])}",
    )
    return {
        "filenames": filenames,
        "prompts": prompts,
        "dino_scores": item["dino_scores"],
        "aesthetics_scores": item["aesthetics_scores"],
        "objaverse_id": item.get("objaverse_id"),
        "category": item.get("category"),
        "group_id": item.get("group_id"),
        "images": images,
        "masks": masks,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--filter-by-score", action="store_true")
    parser.add_argument("--min-aesthetic", type=float, default=6.0)
    parser.add_argument("--min-dino", type=float, default=0.7)
    args = parser.parse_args()
    pattern = "*metadata_with_scores.json" if args.filter_by_score else "*metadata.json"
    items, metadata_files = [], []
    for root in args.roots:
        files = sorted(glob.glob(os.path.join(root, pattern)))
        check(files, f"no {pattern} in {root}")
        for path in files:
            metadata_files.append(os.path.relpath(path, root))
            with open(path) as file:
                listed = json.load(file)
            check(isinstance(listed, list), f"{path} is not a JSON list")
            for item in listed:
                read = read_item(root, item)
                if args.filter_by_score:
                    read["valid"] = valid_images(item, args.min_aesthetic, args.min_dino)
                    if len(read["valid"]) < 2:
                        continue
                items.append(read)
    print(json.dumps({"metadata_files": metadata_files, "items": items}))


if __name__ == "__main__":
    main()
