"""Builds a dataset that vlmjax generates itself, offline, with a progress bar.

    python -m vlmjax.data.build vlm_shapes --data_dir DIR [--config 64px] [--train_size N]
        [--eval_size N] [--novel_size N] [--noise_fraction F] [--num_workers N]

Configs: 32px, 64px (default), 224px, noisy. Non-default sizes or noise build a derived config
(e.g. `64px_train2000`) beside the default one; the pipeline finds it from the same arguments.
"""
from __future__ import annotations

import argparse
import sys
import time

DATASETS = ("vlm_shapes",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    parser.add_argument("--config", default="64px", help="32px, 64px (default), 224px or noisy")
    parser.add_argument("--train_size", type=int, default=None, help="default 50000")
    parser.add_argument("--eval_size", type=int, default=None,
                        help="validation and test size each (default 2000)")
    parser.add_argument("--novel_size", type=int, default=None, help="test_novel size (1000)")
    parser.add_argument("--noise_fraction", type=float, default=None,
                        help="fraction of train captions replaced by web junk (noisy: 0.3)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="image rendering processes (default: one per CPU core)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import tensorflow_datasets as tfds

    from vlmjax.data import shapes

    tfds.disable_progress_bar()  # ours counts images; TFDS's bars would interleave with it
    try:
        builder = shapes.make_builder(
            args.config, args.data_dir, train_size=args.train_size, eval_size=args.eval_size,
            novel_size=args.novel_size, noise_fraction=args.noise_fraction,
            num_workers=args.num_workers, show_progress=True)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    shapes.prepare(builder)
    seconds = time.perf_counter() - start
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"vlm_shapes/{builder.builder_config.name}: {splits} in {builder.data_dir} "
          f"({seconds:.1f} s)")
    print(f"tokenizer: {shapes.tokenizer_path(builder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
