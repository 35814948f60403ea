"""Precision and recall of the ALIGN filter on vlm_shapes/noisy, end to end through the CLI.

    python benchmarks/data_align_filter.py --data_dir /tmp/vlmjax_bench [--train_size 50000]

Builds vlm_shapes/noisy (30% of train captions replaced by web junk), exports the train split as
webdataset shards (one caption per image, KEY.json says whether it is junk), runs
`python -m vlmjax.data.align_filter` on them with the image rules off (the images are 64 px, below
ALIGN's 200 px on purpose) and K = --vocab_top_k, and scores what was removed:
precision = junk removed / all removed, recall = junk removed / all junk.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time


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
    junk = {key for key, noise in noise_of.items() if noise != "clean"}
    precision = len(removed & junk) / max(len(removed), 1)
    recall = len(removed & junk) / max(len(junk), 1)
    print(f"\nvlm_shapes/{name}: {len(noise_of)} image-caption pairs, {len(junk)} junk "
          f"({len(junk) / len(noise_of):.1%}); filter took {seconds:.0f} s")
    print(f"precision {precision:.4f}  recall {recall:.4f}  "
          f"(clean removed: {len(removed - junk)}, junk kept: {len(junk - removed)})")
    by_kind = collections.Counter(noise_of[key] for key in junk - removed)
    print("| junk kind | pairs | removed |\n| --- | ---: | ---: |")
    for kind, total in sorted(collections.Counter(noise_of[k] for k in junk).items()):
        print(f"| {kind} | {total} | {(total - by_kind[kind]) / total:.2%} |")


if __name__ == "__main__":
    main()
