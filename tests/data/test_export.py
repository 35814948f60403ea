"""Exporting vlm_shapes as webdataset shards, read back through the webdataset source."""
from __future__ import annotations

import json

from vlmjax.data import export, sources, webdataset


def test_export_one_caption_per_image_and_all_captions(shapes_builder, tmp_path):
    one = export.export(shapes_builder, str(tmp_path / "one"), split="validation",
                        samples_per_shard=10)
    samples = [s for path in one for s in webdataset.iter_tar_samples(path)]
    assert len(one) == 2 and len(samples) == 16
    originals = {ex["id"].decode(): ex for ex in shapes_builder.as_dataset(
        split="validation").as_numpy_iterator()}
    for index, sample in enumerate(samples):
        metadata = json.loads(sample.files["json"])
        original = originals[metadata["id"]]
        assert metadata["caption_index"] == index % 3 and metadata["noise"] == "clean"
        assert metadata["label"] == original["label"]
        assert sample.files["txt"] == original["captions"][metadata["caption_index"]]
    every = export.export(shapes_builder, str(tmp_path / "all"), split="test_novel",
                          captions="all")
    source = sources.WebdatasetSource(paths=every, label_field="label")
    records = list(source.records(0, 1, training=False, seed=0).as_numpy_iterator())
    assert len(records) == 30 and all(r["_skip_reason"] == 0 for r in records)
    assert all(r["label"] >= 0 for r in records)  # test_novel: single objects, all labelled
