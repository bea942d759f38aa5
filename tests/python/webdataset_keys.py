"""Reads WebDataset tar shards with the `webdataset` package, as a trainer streaming a syncd
dataset does, and prints the samples' keys as one JSON list (in shard order).

Usage: python webdataset_keys.py SHARD.tar [SHARD.tar ...]
"""

import json
import sys

import webdataset as wds


def main():
    shards = sys.argv[1:]
    if not shards:
        sys.exit("webdataset_keys.py: no shard given")
    keys = []
    for sample in wds.WebDataset(shards, shardshuffle=False).decode("pil"):
        record = sample["json"]
        for i in range(len(record["images"])):
            if not hasattr(sample[f"{i}.png"], "size"):
                sys.exit(f"webdataset_keys.py: {sample['__key__']}.{i}.png is not an image")
        keys.append(sample["__key__"])
    print(json.dumps(keys))


if __name__ == "__main__":
    main()
