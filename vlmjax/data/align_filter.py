"""Filters webdataset shards with the ALIGN rules and writes the kept samples as new shards.

    python -m vlmjax.data.align_filter SOURCE OUT [--min_image_side 200] [--no_image_size] ...

SOURCE: shard paths, a glob (`dir/shard-*.tar`) or brace notation
(`dir/shard-{000000..000099}.tar`), comma-separated for several. Pass 1 gathers corpus statistics
(texts shared across images, unigram/bigram frequencies), pass 2 decides and copies each kept
sample's files unchanged into OUT/filtered-NNNNNN.tar. It prints how many samples each rule
removed (a sample is charged to the first rule it fails, in the order image_size, aspect_ratio,
text_length, shared_text, rare_tokens) and how many bad samples were skipped and why;
OUT/filter_report.json holds the same.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys

from PIL import Image

from vlmjax.data import filters, sources, webdataset


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.align_filter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="shard paths / glob / brace pattern")
    parser.add_argument("out", help="output directory for the filtered shards")
    defaults = filters.default_config()
    for rule in filters.RULES:
        parser.add_argument(f"--no_{rule}", action="store_true", help=f"switch off {rule}")
    for key in ("min_image_side", "max_aspect_ratio", "min_words", "max_words",
                "max_images_per_text", "vocab_top_k"):
        parser.add_argument(f"--{key}", type=type(defaults[key]), default=defaults[key])
    parser.add_argument("--text_extension", default="txt")
    parser.add_argument("--samples_per_shard", type=int, default=10_000)
    return parser.parse_args(argv)


def filter_config(args: argparse.Namespace):
    config = filters.default_config()
    for rule in filters.RULES:
        config[f"filter_{rule}"] = not getattr(args, f"no_{rule}")
    for key in ("min_image_side", "max_aspect_ratio", "min_words", "max_words",
                "max_images_per_text", "vocab_top_k"):
        config[key] = getattr(args, key)
    return config


def _read_sample(item, text_extension):
    """(text, (width, height)) of a good sample, or (None, skip reason)."""
    if isinstance(item, webdataset.TarProblem):
        return None, item.reason
    found, reason = sources.image_and_text(item.files, text_extension)
    if found is None:
        return None, reason
    image_extension, text = found
    try:
        with Image.open(io.BytesIO(item.files[image_extension])) as image:
            size = image.size  # header only
    except Exception:  # noqa: BLE001
        return None, "undecodable_image"
    return text, size


def _samples(paths, text_extension):
    for path in paths:
        for item in webdataset.iter_tar_samples(path):
            yield item, _read_sample(item, text_extension)


def run(source: str, out: str, config, text_extension: str = "txt",
        samples_per_shard: int = 10_000, log=print) -> dict:
    paths = webdataset.expand_paths(source)
    if not paths:
        raise ValueError(f"{source!r} matched no shard files")
    stats = filters.CorpusStats()
    needs_stats = config.filter_shared_text or config.filter_rare_tokens
    if needs_stats:
        stats.add_all(text for _, (text, _) in _samples(paths, text_extension) if text is not None)
    align = filters.AlignFilter(config, stats if needs_stats else None)
    removed = collections.Counter()
    bad = collections.Counter()
    total = 0
    with webdataset.ShardWriter(out, prefix="filtered", max_samples=samples_per_shard) as writer:
        for item, (text, size_or_reason) in _samples(paths, text_extension):
            total += 1
            if text is None:
                bad[size_or_reason] += 1
                continue
            rule = align.removing_rule(text, size_or_reason)
            if rule is None:
                writer.write(item.key, item.files)
            else:
                removed[rule] += 1
        kept = writer.num_samples
    if total == 0:
        raise ValueError(f"no samples in {paths}")
    report = {"source": paths, "total": total, "kept": kept,
              "removed": {rule: removed[rule] for rule in filters.RULES},
              "skipped_bad_data": dict(bad), "config": config.to_dict(),
              "shards": writer.paths}
    with open(os.path.join(out, "filter_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"{total} samples in {len(paths)} shard(s); kept {kept} ({kept / total:.1%})")
    for rule in filters.RULES:
        state = "on" if config[f"filter_{rule}"] else "off"
        log(f"  removed by {rule:<13} ({state}): {removed[rule]}")
    for reason, count in sorted(bad.items()):
        log(f"  skipped as bad data ({reason}): {count}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args.source, args.out, filter_config(args), args.text_extension,
            args.samples_per_shard)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
