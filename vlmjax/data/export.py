"""Exports a vlm_shapes split as webdataset tar shards (KEY.png, KEY.txt, KEY.json).

    python -m vlmjax.data.export vlm_shapes OUT --data_dir DIR [--config noisy] [--split train]
        [--captions one|all] [--train_size N] [--samples_per_shard 10000]

`--captions one` writes one sample per image with caption number (index mod 3), `all` one sample
per caption. KEY.json records {"id", "label", "caption_index", "noise"} ("clean" or the junk kind),
which is what `benchmarks/data_align_filter.py` scores the ALIGN filter against.
"""
from __future__ import annotations

import argparse
import json
import sys

import tensorflow_datasets as tfds
import tqdm

from vlmjax.data import shapes, shapes_noise, webdataset


def export(builder, out: str, split: str = "train", captions: str = "one",
           samples_per_shard: int = 10_000, show_progress: bool = False) -> list[str]:
    if captions not in ("one", "all"):
        raise ValueError(f"captions={captions!r}; valid: 'one', 'all'")
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    total = builder.info.splits[split].num_examples
    with webdataset.ShardWriter(out, prefix=f"{split}", max_samples=samples_per_shard) as writer:
        for index, example in enumerate(tqdm.tqdm(dataset.as_numpy_iterator(), total=total,
                                                  disable=not show_progress, unit="img")):
            texts = [t.decode() for t in example["captions"]]
            chosen = range(len(texts)) if captions == "all" else [index % len(texts)]
            for caption_index in chosen:
                image_id = example["id"].decode()
                metadata = {"id": image_id, "label": int(example["label"]),
                            "caption_index": caption_index,
                            "noise": shapes_noise.NOISE_KINDS[example["caption_noise"][
                                caption_index]]}
                writer.write(f"{image_id}_{caption_index}", {
                    "png": example["image"], "txt": texts[caption_index].encode(),
                    "json": json.dumps(metadata).encode()})
    return writer.paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("vlm_shapes",))
    parser.add_argument("out")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="64px")
    parser.add_argument("--split", default="train")
    parser.add_argument("--captions", default="one", choices=("one", "all"))
    parser.add_argument("--train_size", type=int, default=None)
    parser.add_argument("--samples_per_shard", type=int, default=10_000)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    builder = shapes.prepare(shapes.make_builder(args.config, args.data_dir,
                                                 train_size=args.train_size, show_progress=True))
    paths = export(builder, args.out, args.split, args.captions, args.samples_per_shard,
                   show_progress=True)
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
