"""Exports a vlm_shapes split as webdataset tar shards, or as LLaVA instruction data.

    python -m vlmjax.data.export vlm_shapes OUT --data_dir DIR [--config noisy] [--split train]
        [--captions one|all] [--train_size N] [--samples_per_shard 10000]
    python -m vlmjax.data.export llava OUT --data_dir DIR [--config 64px] [--split train]
        [--kinds caption,conversation,detailed_description,complex_reasoning,vqa] [--limit N]
        [--seed 0] [--train_size N]
    python -m vlmjax.data.export mmc4 OUT --data_dir DIR [--split train] [--limit N]
        [--max_images 5] [--caption_fraction 0.2] [--question_weights colour=3,shape=3] [--seed 0]

vlm_shapes: webdataset shards (KEY.png, KEY.txt, KEY.json). `--captions one` writes one sample
per image with caption number (index mod 3), `all` one sample per caption. KEY.json records
{"id", "label", "caption_index", "noise"} ("clean" or the junk kind), which is what
`benchmarks/data_align_filter.py` scores the ALIGN filter against.

llava: LLaVA JSON made by `shapes_instruct` (true to each scene), one file per kind so that stage 1
(caption) and stage 2 (the other kinds, e.g. as a `mixture` of `llava_json` sources) read their
own: `OUT/images/{id}.png` once per image, `OUT/{split}_{kind}.json` a list of
{id, image, conversations, type, objects, background, ...} (see `shapes_instruct`). Read one with
data.source="llava_json", json_path=OUT/{split}_{kind}.json, image_dir=OUT/images. `--limit N`
exports the split's first N images; `--seed` picks other questions and wordings. The LLaVA-CoT
kinds (`--kinds cot,cot_judge`: staged answers to questions that need several steps, and judge
pairs, see `shapes_cot`) are written only when asked for.

mmc4: interleaved few-shot documents for the `fusion` task, in MMC4's layout (data/interleaved.py):
`OUT/images/{id}.png` and `OUT/{split}_mmc4.jsonl`, one document per line holding 1 to
`--max_images` consecutive images of the split, each matched to one sentence: a question about it
with its short answer ("Q: ... A: red", the tiny LM's format and the prompt of the fusion VQA
evaluations), or with probability `--caption_fraction` one of its captions ("Output: ...").
The question is drawn among the image's questions with `--question_weights` (type=weight, types
not named 1: e.g. more of the colour and shape questions, the kinds a model learns last).

--train_size / --eval_size / --novel_size name a derived vlm_shapes config as
`python -m vlmjax.data.build` does (built here if it is not on disk yet).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from vlmjax.data import (interleaved, shapes, shapes_instruct, shapes_noise, shapes_text,
                         webdataset)

DATASETS = ("vlm_shapes", "llava", "mmc4")
# Options of one dataset only: giving them to the other is an error, not silently ignored.
VLM_SHAPES_OPTIONS = {"captions": "one", "samples_per_shard": 10_000}
LLAVA_OPTIONS = {"kinds": ",".join(shapes_instruct.KINDS), "limit": None, "seed": 0}
MMC4_OPTIONS = {"limit": None, "seed": 0, "max_images": 5, "caption_fraction": 0.2,
                "question_weights": ""}
OPTIONS = {"vlm_shapes": VLM_SHAPES_OPTIONS, "llava": LLAVA_OPTIONS, "mmc4": MMC4_OPTIONS}


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


def check_split(builder, split: str) -> None:
    splits = builder.builder_config.split_sizes()
    if split not in splits:
        raise ValueError(f"split={split!r} is not a split of vlm_shapes; valid splits: "
                         f"{', '.join(splits)}")


def export_llava(builder, out: str, split: str = "train", kinds=shapes_instruct.KINDS,
                 limit: int | None = None, seed: int = 0,
                 show_progress: bool = False) -> dict[str, int]:
    """Writes LLaVA JSON of `kinds` for a vlm_shapes split (see the module docstring); returns
    the number of entries per kind and of images ("images")."""
    kinds = shapes_instruct.check_kinds(kinds)
    check_split(builder, split)
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for the whole split)")
    total = builder.info.splits[split].num_examples
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    if limit is not None:
        dataset, total = dataset.take(limit), min(limit, total)
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    entries = {kind: [] for kind in kinds}
    images = 0
    for example in tqdm.tqdm(dataset.as_numpy_iterator(), total=total, unit="img",
                             desc=f"llava {split}", disable=not show_progress):
        made = shapes_instruct.make_entries(example, kinds, seed)
        if not made:
            continue
        with open(os.path.join(image_dir, made[0]["image"]), "wb") as file:
            file.write(example["image"])  # the PNG as stored: no re-encoding
        images += 1
        for entry in made:
            entries[entry["type"]].append(entry)
    for kind, kind_entries in entries.items():
        with open(os.path.join(out, f"{split}_{kind}.json"), "w") as file:
            json.dump(kind_entries, file)
    return {"images": images, **{kind: len(e) for kind, e in entries.items()}}


def parse_question_weights(text: str) -> dict[str, float]:
    """"colour=3,shape=3" -> {"colour": 3.0, "shape": 3.0}; an unknown type or a weight that is
    not a positive number is an error naming the valid types."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in shapes_text.QA_TYPES or not weight > 0:
            raise ValueError(f"question weight {item!r} is not TYPE=POSITIVE_NUMBER with TYPE one "
                             f"of {', '.join(shapes_text.QA_TYPES)}")
        weights[name] = weight
    return weights


def mmc4_sentence(example: dict, rng: np.random.Generator, caption_fraction: float,
                  question_weights: dict[str, float] | None = None) -> str:
    """The sentence an image is matched to: one of its QA pairs (drawn with `question_weights`
    by type, 1 for a type not named), or one of its captions."""
    if rng.random() < caption_fraction:
        captions = example["captions"]
        return f"Output: {captions[rng.integers(len(captions))].decode()}"
    qa = example["qa"]
    if question_weights:
        weights = np.array([question_weights.get(shapes_text.QA_TYPES[t], 1.0)
                            for t in qa["type"]])
        pick = rng.choice(len(weights), p=weights / weights.sum())
    else:
        pick = rng.integers(len(qa["question"]))
    return interleaved.vqa_text(qa["question"][pick].decode(), qa["answer"][pick].decode())


def export_mmc4(builder, out: str, split: str = "train", limit: int | None = None,
                seed: int = 0, max_images: int = 5, caption_fraction: float = 0.2,
                show_progress: bool = False,
                question_weights: dict[str, float] | None = None) -> dict[str, int]:
    """Writes interleaved documents of a vlm_shapes split (module docstring); returns the
    numbers of images and documents."""
    check_split(builder, split)
    if max_images < 1 or not 0.0 <= caption_fraction <= 1.0:
        raise ValueError(f"max_images={max_images} must be >= 1 and caption_fraction="
                         f"{caption_fraction} in [0, 1]")
    total = builder.info.splits[split].num_examples
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    if limit is not None:
        dataset, total = dataset.take(limit), min(limit, total)
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs, current, size = [], None, 0
    for example in tqdm.tqdm(dataset.as_numpy_iterator(), total=total, unit="img",
                             desc=f"mmc4 {split}", disable=not show_progress):
        if current is None or len(current["image_info"]) == size:
            current = {"text_list": [], "image_info": []}
            size = int(rng.integers(1, max_images + 1))
            docs.append(current)
        name = f"{example['id'].decode()}.png"
        with open(os.path.join(image_dir, name), "wb") as file:
            file.write(example["image"])  # the PNG as stored
        current["image_info"].append({"image_name": name, "matched_sim": 1.0,
                                      "matched_text_index": len(current["text_list"])})
        current["text_list"].append(mmc4_sentence(example, rng, caption_fraction,
                                                  question_weights))
    with open(os.path.join(out, f"{split}_mmc4.jsonl"), "w") as file:
        for doc in docs:
            file.write(json.dumps(doc) + "\n")
    return {"images": sum(len(d["image_info"]) for d in docs), "documents": len(docs)}


def _parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("out")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="64px")
    parser.add_argument("--split", default="train")
    parser.add_argument("--train_size", type=int, default=None)
    parser.add_argument("--eval_size", type=int, default=None)
    parser.add_argument("--novel_size", type=int, default=None)
    parser.add_argument("--captions", choices=("one", "all"), help="vlm_shapes: default one")
    parser.add_argument("--samples_per_shard", type=int, help="vlm_shapes: default 10000")
    parser.add_argument("--kinds", help="llava: comma-separated, default: "
                                        + LLAVA_OPTIONS["kinds"] + " (also cot, cot_judge)")
    parser.add_argument("--limit", type=int, help="llava, mmc4: the first N images of the split")
    parser.add_argument("--seed", type=int, help="llava, mmc4: default 0")
    parser.add_argument("--max_images", type=int, help="mmc4: images per document, default 5")
    parser.add_argument("--caption_fraction", type=float,
                        help="mmc4: share of caption sentences, default 0.2")
    parser.add_argument("--question_weights",
                        help="mmc4: TYPE=W,... weights of the question types (default 1 each)")
    args = parser.parse_args(argv)
    own = OPTIONS[args.dataset]
    other = {name for options in OPTIONS.values() for name in options} - set(own)
    misplaced = [f"--{name}" for name in sorted(other) if getattr(args, name) is not None]
    if misplaced:
        parser.error(f"{args.dataset} takes no {' / '.join(misplaced)} (valid for it: "
                     f"{', '.join('--' + name for name in own)})")
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        builder = shapes.make_builder(args.config, args.data_dir, train_size=args.train_size,
                                      eval_size=args.eval_size, novel_size=args.novel_size,
                                      show_progress=True)
        # Checked before building: a mistyped argument should not wait for a 55,000 image build.
        check_split(builder, args.split)
        if args.dataset == "llava":
            kinds = shapes_instruct.check_kinds(args.kinds)
            if args.limit is not None and args.limit < 1:
                raise ValueError(f"--limit {args.limit} must be >= 1")
        if args.dataset == "mmc4":
            question_weights = parse_question_weights(args.question_weights)
    except ValueError as error:
        parser.error(str(error))
    shapes.prepare(builder)
    if args.dataset == "mmc4":
        counts = export_mmc4(builder, args.out, args.split, args.limit, args.seed,
                             args.max_images, args.caption_fraction, show_progress=True,
                             question_weights=question_weights)
        print(f"wrote {counts['documents']} document(s) with {counts['images']} image(s) to "
              f"{os.path.join(args.out, f'{args.split}_mmc4.jsonl')}")
        return 0
    if args.dataset == "vlm_shapes":
        paths = export(builder, args.out, args.split, args.captions, args.samples_per_shard,
                       show_progress=True)
        print(f"wrote {len(paths)} shard(s) to {args.out}")
        return 0
    counts = export_llava(builder, args.out, args.split, kinds, args.limit, args.seed,
                          show_progress=True)
    images = counts.pop("images")
    print(f"wrote {images} image(s) to {os.path.join(args.out, 'images')}")
    for kind, count in counts.items():
        print(f"wrote {count} {kind} entries to "
              f"{os.path.join(args.out, f'{args.split}_{kind}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
