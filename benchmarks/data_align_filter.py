"""Precision and recall of the ALIGN filter on vlm_shapes/noisy, end to end through the CLI.

    python benchmarks/data_align_filter.py --data_dir /tmp/vlmjax_bench [--train_size 50000]

Builds vlm_shapes/noisy (30% of train captions replaced by web junk or by another image's caption),
exports the train split as webdataset shards (one caption per image, KEY.json names its noise
kind), runs `python -m vlmjax.data.align_filter` on them with the image rules off (the images are
64 px, below ALIGN's 200 px on purpose) and K = --vocab_top_k, and scores what was removed per
noise kind, as a detector of that kind against the clean pairs: recall = removed pairs of the
kind / its pairs, precision = removed pairs of the kind / (those + removed clean pairs).
The text junk kinds are each aimed at one ALIGN rule; `swapped` (a true caption of another image)
is what no text rule can catch.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vlmjax.data import shapes_noise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--train_size", type=int, default=None, help="default: 50000")
    parser.add_argument("--vocab_top_k", type=int, default=2000)
    args = parser.parse_args()

    from vlmjax.data import export, shapes, webdataset

    builder = shapes.prepare(shapes.make_builder("noisy", args.data_dir,
                                                 train_size=args.train_size))
    name = builder.builder_config.name
    shard_dir = os.path.join(args.data_dir, f"wds_{name}")
    if not webdataset.expand_paths(f"{shard_dir}/train-*.tar"):
        export.export(builder, shard_dir, split="train", captions="one")
    out = os.path.join(args.data_dir, f"wds_{name}_filtered")
    command = [sys.executable, "-m", "vlmjax.data.align_filter", f"{shard_dir}/train-*.tar", out,
               "--no_image_size", "--no_aspect_ratio", "--vocab_top_k", str(args.vocab_top_k)]
    print("$ python", " ".join(command[1:]))
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start

    kept = set()
    report = json.load(open(os.path.join(out, "filter_report.json")))
    for path in report["shards"]:
        kept.update(sample.key for sample in webdataset.iter_tar_samples(path))
    noise_of = {}
    for path in webdataset.expand_paths(f"{shard_dir}/train-*.tar"):
        for sample in webdataset.iter_tar_samples(path):
            noise_of[sample.key] = json.loads(sample.files["json"])["noise"]
    removed = {key for key in noise_of if key not in kept}
    print(f"\nvlm_shapes/{name}: {len(noise_of)} image-caption pairs; filter took {seconds:.0f} s")
    print(score_table(noise_of, removed))


def score_table(noise_of: dict[str, str], removed: set[str]) -> str:
    """Markdown table of the filter as a detector of each noise kind against the clean pairs:
    recall = removed pairs of the kind / pairs of the kind, precision = removed pairs of the
    kind / (those + removed clean pairs); then the text junk together and all noise together."""
    by_kind = collections.defaultdict(set)
    for key, kind in noise_of.items():
        by_kind[kind].add(key)
    clean_removed = len(by_kind["clean"] & removed)
    groups = [(kind, by_kind[kind]) for kind in shapes_noise.NOISE_KINDS[1:]]
    groups.append(("all text junk", set().union(
        *(by_kind[kind] for kind in shapes_noise.TEXT_JUNK_KINDS))))
    groups.append(("all noise", set(noise_of) - by_kind["clean"]))
    lines = [f"clean pairs: {len(by_kind['clean'])}, of which removed: {clean_removed}",
             "| noise kind | pairs | removed | precision | recall |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for kind, keys in groups:
        hits = len(keys & removed)
        precision, recall = "-", "-"  # a kind with no pairs has neither
        if keys:
            recall = f"{hits / len(keys):.4f}"
            precision = f"{hits / (hits + clean_removed):.4f}" if hits + clean_removed else "-"
        lines.append(f"| {kind} | {len(keys)} | {hits} | {precision} | {recall} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
