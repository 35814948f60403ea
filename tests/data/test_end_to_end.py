"""End to end: build vlm_shapes/noisy, export it as shards, ALIGN-filter them with the CLI, and
train-read the filtered shards through the pipeline."""
from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from vlmjax.data import align_filter as filter_cli, export, pipeline, shapes, webdataset


@pytest.mark.slow
def test_noisy_build_export_filter_and_read(tmp_path):
    builder = shapes.prepare(shapes.make_builder("noisy", str(tmp_path / "tfds"), train_size=600,
                                                 eval_size=8, novel_size=4, num_workers=0))
    shards = export.export(builder, str(tmp_path / "wds"), captions="all", samples_per_shard=500)
    noise = {s.key: json.loads(s.files["json"])["noise"]
             for p in shards for s in webdataset.iter_tar_samples(p)}
    swapped = {key for key, kind in noise.items() if kind == "swapped"}
    junk = {key for key, kind in noise.items() if kind != "clean"} - swapped  # text junk
    out = str(tmp_path / "filtered")
    assert filter_cli.main([f"{tmp_path}/wds/train-*.tar", out, "--no_image_size",
                            "--no_aspect_ratio", "--vocab_top_k", "1000"]) == 0
    report = json.load(open(f"{out}/filter_report.json"))
    kept_samples = [s for p in report["shards"] for s in webdataset.iter_tar_samples(p)]
    kept = {s.key for s in kept_samples}
    assert report["total"] == 1800 and 0.25 < len(junk | swapped) / 1800 < 0.35
    assert len(kept & junk) <= 0.02 * len(junk)  # recall >= 98%
    assert swapped and swapped <= kept  # another image's caption passes every text rule
    assert len(kept) >= 0.98 * (1800 - len(junk))  # nearly no clean caption removed

    data = ml_collections.ConfigDict(dict(source="webdataset", paths=f"{out}/*.tar",
                                          label_field="label"))
    config = pipeline.default_input_config()
    config.update(dict(global_batch_size=32, shuffle_buffer=256,
                       tokenizer=shapes.tokenizer_path(builder)))
    batches = pipeline.make_pipeline(data, config, training=True, process_index=0,
                                     process_count=1)
    for _ in range(3):
        batch = next(batches)
        assert batch["image"].shape == (32, 64, 64, 3) and batch["label"].shape == (32,)
    texts = batches.tokenizer.decode_batch(batch["text"], batch["text_mask"])
    assert all(3 <= len(text.split()) <= 20 for text in texts)
    assert sum(batches.skip_counts.values()) == 0
    # Each row's label is its sample's KEY.json label: look the rows up by their caption.
    labels_of = {}
    for sample in kept_samples:
        labels_of.setdefault(sample.files["txt"].decode(), set()).add(
            json.loads(sample.files["json"])["label"])
    matched = [label in labels_of[text] for text, label in zip(texts, batch["label"])
               if text in labels_of]
    assert len(matched) >= 0.9 * len(texts) and all(matched)
    assert np.any(batch["label"] >= 0)  # single-object images carry a class
