"""The per-host pipeline: batches, host sharding, eval padding, skip counts, resume, config errors,
mixtures and global arrays."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from tests.data.conftest import TINY_SIZES
from vlmjax.data import pipeline, skips


@pytest.fixture
def shapes_data(shapes_builder, tfds_dir):
    config = pipeline.default_data_config()
    config.data_dir = tfds_dir
    config.update(TINY_SIZES)
    return config


def _input(batch_size=8, **overrides):
    config = pipeline.default_input_config()
    config.global_batch_size = batch_size
    config.shuffle_buffer = 64
    config.update(overrides)
    return config


def _wds_data(paths, **overrides):
    config = ml_collections.ConfigDict(dict(source="webdataset", paths=paths))
    config.update(overrides)
    return config


def _sp_path(shapes_builder):
    from vlmjax.data import shapes
    return shapes.tokenizer_path(shapes_builder)


def test_training_batches_have_the_design_keys(shapes_data):
    data = pipeline.make_pipeline(shapes_data, _input(), training=True, process_index=0,
                                  process_count=2)
    batch = next(data)
    assert set(batch) == {"image", "text", "text_mask", "label"}
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == np.int32
    assert batch["text_mask"].dtype == bool and batch["label"].dtype == np.int32
    # Sticky EOS: each text ends with EOS (id 3) right before the padding.
    lengths = batch["text_mask"].sum(axis=1)
    assert all(batch["text"][row, n - 1] == 3 for row, n in enumerate(lengths))
    words = data.tokenizer.decode_batch(batch["text"], batch["text_mask"])
    assert all(len(w.split()) >= 3 for w in words)


def test_same_seed_same_batches_other_seed_other_batches(shapes_data):
    def first_batches(seed):
        data = pipeline.make_pipeline(shapes_data, _input(seed=seed), training=True,
                                      process_index=0, process_count=1)
        return [next(data) for _ in range(3)]
    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(shapes_data):
    config = _input(preprocess="caption_random|inception_crop|flip|value_range")
    data = pipeline.make_pipeline(shapes_data, config, training=True, process_index=0,
                                  process_count=1)
    for _ in range(7):  # 56 examples: past the end of the first 48-example epoch
        next(data)
    state = data.get_state()
    expected = [next(data) for _ in range(4)]
    resumed = pipeline.make_pipeline(shapes_data, config, training=True, process_index=0,
                                     process_count=1, state=state)
    for x, y in zip(expected, (next(resumed) for _ in range(4))):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    moved = _input(preprocess=config.preprocess, prefetch_batches=1)  # changes no batch
    resumed = pipeline.make_pipeline(shapes_data, moved, training=True, process_index=0,
                                     process_count=1, state=state)
    np.testing.assert_array_equal(next(resumed)["image"], expected[0]["image"])
    other = _input(seed=5)
    with pytest.raises(ValueError, match="another data/input config"):
        pipeline.make_pipeline(shapes_data, other, training=True, process_index=0,
                               process_count=1, state=state)


def test_eval_hosts_get_disjoint_parts_and_equal_batch_counts(shapes_data):
    shapes_data.split = "validation"  # 16 examples over 3 hosts: 6 + 5 + 5
    config = _input(batch_size=6, preprocess="caption_first|resize_crop|value_range")
    hosts = [list(pipeline.make_pipeline(shapes_data, config, training=False, process_index=i,
                                         process_count=3)) for i in range(3)]
    assert [len(batches) for batches in hosts] == [3, 3, 3]  # ceil(6 / 2) on every host
    real = [np.concatenate([b["image"][b["_mask"]] for b in batches]) for batches in hosts]
    assert [len(r) for r in real] == [6, 5, 5]
    single = list(pipeline.make_pipeline(shapes_data, config, training=False, process_index=0,
                                         process_count=1))
    all_images = np.concatenate([b["image"][b["_mask"]] for b in single])
    np.testing.assert_array_equal(np.concatenate(real), all_images)  # same order, no overlap
    padding = hosts[1][-1]
    assert not padding["_mask"].all() and np.all(padding["image"][~padding["_mask"]] == 0)
    assert np.all(padding["text_mask"][~padding["_mask"]] == (padding["text"][~padding["_mask"]]
                                                              != 0))


def test_skips_are_counted_exactly_in_eval(bad_shards, shapes_builder):
    data = pipeline.make_pipeline(_wds_data(f"{bad_shards}/*.tar"),
                                  _input(batch_size=4, tokenizer=_sp_path(shapes_builder)),
                                  training=False, process_index=0, process_count=1)
    batches = list(data)
    assert len(batches) == data.num_batches == 5  # 17 records (placeholders included) / 4
    assert sum(b["_mask"].sum() for b in batches) == 6 + 3
    assert "label" not in batches[0]
    counts = data.skip_counts
    for _, reason in __import__("tests.data.conftest", fromlist=["x"]).BAD_SAMPLES.values():
        assert counts[reason] == 1, reason
    assert counts["truncated_tar"] == 1
    assert sum(counts.values()) == 8


def test_skips_in_training_are_counted_and_never_fatal(bad_shards, shapes_builder):
    config = _input(batch_size=3, tokenizer=_sp_path(shapes_builder), shuffle_buffer=4)
    data = pipeline.make_pipeline(_wds_data(f"{bad_shards}/*.tar"), config, training=True,
                                  process_index=0, process_count=1)
    for _ in range(9):  # 27 good examples: three passes over the 9 good ones
        batch = next(data)
        assert batch["image"].shape == (3, 64, 64, 3)
    counts = data.skip_counts
    assert counts["corrupt_image"] >= 2 and counts["truncated_tar"] >= 2
    assert counts["undecodable_image"] == counts["missing_text"] == counts["truncated_tar"]
    state = data.get_state()
    assert state["skips"] == counts and state["position"] > 27


def test_online_filters_skip_and_count(good_shards, shapes_builder):
    data_config = _wds_data(f"{good_shards}/*.tar", label_field="label")
    data_config.filters = pipeline.default_data_config().filters
    data_config.filters.update(dict(filter_image_size=True, min_image_side=40))
    data = pipeline.make_pipeline(data_config, _input(batch_size=4, tokenizer=_sp_path(
        shapes_builder)), training=False, process_index=0, process_count=1)
    labels = np.concatenate([b["label"][b["_mask"]] for b in data])
    # Sample n is (40 + n) x (30 + n): the shorter side is > 40 from n = 11 on.
    assert sorted(labels) == list(range(11, 20))
    assert data.skip_counts["image_too_small"] == 11


def test_all_bad_data_stops_with_a_clear_error(tmp_path, shapes_builder):
    from vlmjax.data import webdataset
    with webdataset.ShardWriter(str(tmp_path), max_samples=10) as writer:
        for i in range(3):
            writer.write(f"k{i}", {"txt": b"captions without images"})
    data = pipeline.make_pipeline(_wds_data(f"{tmp_path}/*.tar"),
                                  _input(batch_size=2, tokenizer=_sp_path(shapes_builder)),
                                  training=True, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no usable example in a whole pass over.*shard-000000"):
        next(data)


def test_mixture_follows_weights(good_shards, shapes_data, shapes_builder):
    mixture = ml_collections.ConfigDict(dict(source="mixture", sources=dict(
        shapes=dict(**shapes_data.to_dict(), weight=3.0),
        web=dict(source="webdataset", paths=f"{good_shards}/*.tar", label_field="label",
                 weight=1.0))))
    del mixture.sources.shapes["filters"]
    data = pipeline.make_pipeline(mixture, _input(batch_size=20), training=True,
                                  process_index=0, process_count=1)
    from_web = []
    for _ in range(10):
        batch = next(data)
        texts = data.tokenizer.decode_batch(batch["text"], batch["text_mask"])
        from_web += ["thing number" in text for text in texts]
    assert 0.15 < np.mean(from_web) < 0.35  # 1 / (3 + 1) = 0.25


@pytest.mark.parametrize("change, message", [
    (dict(source="s3"), r"data.source: 's3' is not a source"),
    (dict(train_sizes=3), r"unknown key\(s\) \['train_sizes'\] for source 'vlm_shapes'"),
    (dict(paths="x"), r"unknown key\(s\) \['paths'\]"),
    (dict(config="128px"), r"data.config: '128px'; valid"),
])
def test_bad_data_config_names_the_key(shapes_data, change, message):
    shapes_data.update(change) if "source" not in change else shapes_data.__setattr__(
        "source", change["source"])
    with pytest.raises(ValueError, match=message):
        pipeline.make_pipeline(shapes_data, _input(), training=True, process_index=0,
                               process_count=1)


@pytest.mark.parametrize("change, message", [
    (dict(batch=3), r"input: unknown key\(s\) \['batch'\]"),
    (dict(global_batch_size=6), "not divisible by process_count=4"),
    (dict(eos="always"), r"input.eos: 'always'; valid"),
    (dict(preprocess="caption_first|value_range"), "input.preprocess.*exactly one size op"),
    (dict(tokenizer="/nope/vocab.model"), "input.tokenizer: SentencePiece model not found"),
])
def test_bad_input_config_names_the_key(shapes_data, change, message):
    config = _input()
    if "batch" in change:
        config.batch = 3
    else:
        config.update(change)
    with pytest.raises(ValueError, match=message):
        pipeline.make_pipeline(shapes_data, config, training=True, process_index=0,
                               process_count=4)


def test_to_global_arrays_over_the_mesh():
    import jax

    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    batch = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
             "label": np.arange(8, dtype=np.int32)}
    arrays = pipeline.to_global_arrays(batch, mesh)
    assert arrays["image"].shape == (8, 2, 2, 3)
    assert arrays["label"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])
    shard_rows = {tuple(s.data.tolist()) for s in arrays["label"].addressable_shards}
    assert shard_rows == {(0, 1), (2, 3), (4, 5), (6, 7)}


def test_skip_reason_names_are_unique():
    assert len(set(skips.SKIP_REASONS)) == skips.NUM_REASONS and skips.SKIP_REASONS[0] == "ok"


def test_resume_on_shards_with_bad_data_keeps_batches_and_counts(bad_shards, shapes_builder):
    config = _input(batch_size=3, tokenizer=_sp_path(shapes_builder), shuffle_buffer=5,
                    preprocess="caption_random|inception_crop|flip|value_range")
    data_config = _wds_data(f"{bad_shards}/*.tar")
    run = pipeline.make_pipeline(data_config, config, training=True, process_index=0,
                                 process_count=1)
    for _ in range(4):
        next(run)
    state = run.get_state()
    expected = [(next(run), run.skip_counts) for _ in range(5)]
    resumed = pipeline.make_pipeline(data_config, config, training=True, process_index=0,
                                     process_count=1, state=state)
    assert resumed.skip_counts == state["skips"]
    for batch, counts in expected:
        again = next(resumed)
        np.testing.assert_array_equal(again["image"], batch["image"])
        np.testing.assert_array_equal(again["text"], batch["text"])
        assert resumed.skip_counts == counts


def test_pipeline_over_generators_exits_cleanly(shapes_builder, tmp_path):
    """A live iterator over Python generators at interpreter exit used to abort the process."""
    import subprocess
    import sys

    from tests.data.conftest import image_bytes
    from vlmjax.data import webdataset
    good_shards = tmp_path / "shards"
    with webdataset.ShardWriter(str(good_shards), max_samples=20) as writer:
        for i in range(120):  # 6 shards: more than the 4 read at once
            writer.write(f"k{i:03d}", {"jpg": image_bytes(80, 80), "txt": b"a small thing"})
    script = tmp_path / "run.py"
    script.write_text(
        "import ml_collections\n"
        "from vlmjax.data import pipeline\n"
        f"data = ml_collections.ConfigDict(dict(source='webdataset', paths='{good_shards}/*.tar'))\n"
        "config = pipeline.default_input_config()\n"
        f"config.update(dict(global_batch_size=4, tokenizer='{_sp_path(shapes_builder)}'))\n"
        "run = pipeline.make_pipeline(data, config, training=True, process_index=0,\n"
        "                             process_count=1)\n"
        "print(next(run)['image'].shape)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(4, 64, 64, 3)" in result.stdout


def test_closed_pipeline_refuses_to_continue(shapes_data):
    with pipeline.make_pipeline(shapes_data, _input(), training=True, process_index=0,
                                process_count=1) as data:
        next(data)
    with pytest.raises(RuntimeError, match="closed.*state=get_state"):
        next(data)


def test_hosts_use_independent_shuffles_and_augmentations(good_shards, shapes_builder,
                                                          tmp_path):
    import shutil
    for copy in ("a", "b"):  # two hosts, each with an identical copy of the same shard
        shutil.copy(good_shards / "part0-000000.tar", tmp_path / f"{copy}.tar")
    config = _input(batch_size=8, tokenizer=_sp_path(shapes_builder),
                    preprocess="caption_first|inception_crop|flip|value_range")
    batches = [next(pipeline.make_pipeline(_wds_data(f"{tmp_path}/*.tar"), config,
                                           training=True, process_index=i, process_count=2))
               for i in range(2)]
    assert batches[0]["image"].shape == (4, 64, 64, 3)
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])
