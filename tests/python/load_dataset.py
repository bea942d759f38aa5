"""Loads a finished syncd dataset the ways its README says, and prints what each reader saw.

Given a local copy of `datasets/{run_name}/` (the tar shards, the Parquet files, README.md and
index.json), it reads the samples three times:

- `datasets.load_dataset("parquet", data_files=[...])` on the Parquet files index.json lists;
- `datasets.load_dataset(FOLDER)`, which finds the Parquet files through the dataset card;
- `webdataset.WebDataset` on the tar shards.

It checks what holds whatever the data (a row has fixed columns, images past `num_images` are
None, image columns decode to PIL images) and prints one JSON object with a summary of every
sample as each reader returned it, for the caller to compare with what the factory made. It
exits non-zero with a message when a check fails.

Usage: python load_dataset.py FOLDER [--cache-dir DIR]
"""

import argparse
import json
import os
import sys
import tempfile

import datasets
import numpy as np
import webdataset as wds


def image_summary(image):
    """Size, mode and a pixel checksum of a PIL image, or None."""
    if image is None:
        return None
    pixels = np.asarray(image)
    return {
        "size": list(image.size),
        "mode": image.mode,
        "sum": int(pixels.astype(np.uint64).sum()),
        "foreground": int((pixels > 0).sum()),
    }


def check(condition, message):
    if not condition:
        sys.exit(f"load_dataset.py: {message}")


def rows_of(dataset, columns):
    """Summaries of the rows of a `datasets.Dataset`, after checking its fixed columns."""
    for name in [f"image_{i}" for i in range(columns)] + [f"mask_{i}" for i in range(columns)]:
        feature = dataset.features[name]
        check(isinstance(feature, datasets.Image), f"column {name} is {feature}, not an Image")
    rows = []
    for row in dataset:
        count = row["num_images"]
        for i in range(columns):
            for kind in ("image", "mask", "prompt", "aesthetic"):
                value = row[f"{kind}_{i}"]
                if i < count:
                    check(value is not None, f"{row['key']}: {kind}_{i} is None")
                else:
                    check(value is None, f"{row['key']}: {kind}_{i} is {value!r}, not None")
        images = [row[f"image_{i}"] for i in range(count)]
        check(
            all(hasattr(image, "size") for image in images),
            f"{row['key']}: an image column did not decode to a PIL image",
        )
        record = json.loads(row["record"])
        rows.append(
            {
                "key": row["key"],
                "group_id": row["group_id"],
                "object_type": row["object_type"],
                "category": row["category"],
                "num_images": count,
                "images": [image_summary(row[f"image_{i}"]) for i in range(columns)],
                "masks": [image_summary(row[f"mask_{i}"]) for i in range(columns)],
                "prompts": [row[f"prompt_{i}"] for i in range(columns)],
                "aesthetic": [row[f"aesthetic_{i}"] for i in range(columns)],
                "dino_scores": row["dino_scores"],
                "seed": row["seed"],
                "record_key": record["key"],
                # The lineage travels in the record column (absent in older datasets).
                "models": [
                    model["content_hash"]
                    for model in ((record.get("lineage") or {}).get("generated_by") or {}).get("models", [])
                ],
            }
        )
    return rows


def webdataset_samples(shards):
    samples = []
    if not shards:  # webdataset refuses an empty shard list; an empty dataset has none
        return samples
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        record = sample["json"]
        count = len(record["images"])
        samples.append(
            {
                "key": sample["__key__"],
                "num_images": count,
                "images": [image_summary(sample[f"{i}.png"]) for i in range(count)],
                "masks": [image_summary(sample[f"{i}.mask.png"]) for i in range(count)],
                "prompts": record["prompts"],
            }
        )
    return samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--cache-dir", help="the datasets cache (default: a new temporary folder)")
    args = parser.parse_args()
    folder = os.path.abspath(args.folder)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="syncd-datasets-cache-")
    with open(os.path.join(folder, "index.json")) as file:
        index = json.load(file)
    local = lambda key: os.path.join(folder, key.rsplit("/", 1)[-1])  # noqa: E731
    parquet_files = [local(shard["key"]) for shard in index["parquet_shards"]]
    tar_files = [local(shard["key"]) for shard in index["shards"]]
    # The number of `_i` columns is the run's images per group: count the image columns.
    by_files = datasets.load_dataset(
        "parquet", data_files=parquet_files, split="train", cache_dir=cache_dir
    )
    columns = sum(1 for name in by_files.column_names if name.startswith("image_"))
    by_folder = datasets.load_dataset(folder, split="train", cache_dir=cache_dir)
    check(
        by_folder.column_names == by_files.column_names,
        f"the folder's columns {by_folder.column_names} differ from the files' {by_files.column_names}",
    )
    print(
        json.dumps(
            {
                "datasets_version": datasets.__version__,
                "columns": by_files.column_names,
                "features": {name: type(feature).__name__ for name, feature in by_files.features.items()},
                "parquet": rows_of(by_files, columns),
                "folder": rows_of(by_folder, columns),
                "webdataset": webdataset_samples(tar_files),
            }
        )
    )


if __name__ == "__main__":
    main()
