"""Input pipeline throughput (examples/s) on this machine, for the README's Data section.

    python benchmarks/input_pipeline.py --data_dir /tmp/vlmjax_bench [--train_size 5000]

Cases: vlm_shapes at 64 px and 224 px through TFDS, and webdataset JPEG shards (the 224 px
images re-encoded as JPEG, as img2dataset writes them), each with the training preprocessing
(random caption, inception crop, caption-aware flip, [-1, 1]) and SentencePiece tokenization.
Also prints the tokenizer's own speed. Builds what it needs in --data_dir first (not timed).
"""
from __future__ import annotations

import argparse
import io
import os
import time

from PIL import Image


def build_jpeg_shards(builder, out: str, count: int) -> str:
    from vlmjax.data import webdataset

    pattern = os.path.join(out, "jpeg-*.tar")
    if webdataset.expand_paths(pattern):
        return pattern
    dataset = builder.as_dataset(split="train").take(count).as_numpy_iterator()
    with webdataset.ShardWriter(out, prefix="jpeg", max_samples=1000) as writer:
        for example in dataset:
            buffer = io.BytesIO()
            Image.fromarray(example["image"]).save(buffer, format="JPEG", quality=90)
            writer.write(example["id"].decode(), {"jpg": buffer.getvalue(),
                                                  "txt": example["captions"][0]})
    return pattern


def measure(data_config, input_config, warmup: int, batches: int) -> float:
    from vlmjax.data import pipeline

    data = pipeline.make_pipeline(data_config, input_config, training=True, process_index=0,
                                  process_count=1)
    for _ in range(warmup):
        next(data)
    start = time.perf_counter()
    for _ in range(batches):
        next(data)
    return batches * input_config.global_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--train_size", type=int, default=5000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ml_collections

    from vlmjax.data import pipeline, shapes, tokenizers

    sizes = dict(train_size=args.train_size, eval_size=args.batch_size, novel_size=10)
    builders = {size: shapes.prepare(shapes.make_builder(f"{size}px", args.data_dir, **sizes))
                for size in (64, 224)}
    shards = build_jpeg_shards(builders[224], os.path.join(args.data_dir, "wds_224_jpeg"),
                               args.train_size)
    tokenizer_path = shapes.tokenizer_path(builders[64])

    def input_config(size):
        config = pipeline.default_input_config()
        config.update(dict(global_batch_size=args.batch_size, image_size=size,
                           tokenizer=tokenizer_path, shuffle_buffer=2000,
                           preprocess="caption_random|inception_crop|flip_caption_aware|"
                                      "value_range"))
        return config

    cases = []
    for size in (64, 224):
        data = pipeline.default_data_config()
        data.update(dict(config=f"{size}px", data_dir=args.data_dir, **sizes))
        cases.append((f"vlm_shapes {size}px (TFDS, PNG)", data, input_config(size)))
    cases.append(("webdataset shards, 224px JPEG",
                  ml_collections.ConfigDict(dict(source="webdataset", paths=shards)),
                  input_config(224)))

    print(f"{os.cpu_count()} CPU cores, global batch {args.batch_size}, {args.batches} batches "
          f"after 3 warm-up batches, median (min-max) of {args.repeats} runs")
    print("| input | examples/s |\n| --- | ---: |")
    for name, data, config in cases:
        rates = sorted(measure(data, config, warmup=3, batches=args.batches)
                       for _ in range(args.repeats))
        print(f"| {name} | {rates[len(rates) // 2]:,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f}) |")

    tokenizer = tokenizers.load_tokenizer(tokenizer_path)
    texts = [t.decode() for ex in builders[64].as_dataset(split="validation").take(
        args.batch_size).as_numpy_iterator() for t in ex["captions"][:1]]
    start = time.perf_counter()
    for _ in range(50):
        tokenizer.encode_batch(texts, 32, eos="sticky")
    rate = 50 * len(texts) / (time.perf_counter() - start)
    print(f"| SentencePiece encode_batch alone (captions/s) | {rate:,.0f} |")


if __name__ == "__main__":
    main()
