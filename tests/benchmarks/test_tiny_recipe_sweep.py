"""benchmarks/tiny_recipe_sweep.py: the training-text variants say what they claim to."""
import os
import sys

import numpy as np
import pytest

from tests.benchmarks.test_quick import REPO, run_benchmark, tables
from vlmjax.data import shapes_scene

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import tiny_recipe_sweep as sweep  # noqa: E402


def test_merge_replaces_the_vit_keys_for_the_cnn():
    cfg = sweep.merge(sweep.BASE, sweep.VARIANTS["cnn_t100"])
    assert cfg["image_arch"] == "cnn" and cfg["temperature_init"] == 100.0
    assert cfg["image"] == {"channels": (32, 64, 96), "patch_size": 2, "pool": "max"}
    assert sweep.merge(sweep.BASE, {"image": {"patch_size": 4}})["image"]["width"] == 96


class FakeTokenizer:
    def encode_batch(self, texts, max_len, eos):
        ids = np.array([[len(t)] + [0] * (max_len - 1) for t in texts], np.int32)
        return ids, ids > 0


def test_variant_texts_class_captions_name_the_label_and_use_single_objects():
    labels = np.array([3, -1, 17])
    corpus = {"labels": labels, "tags": ["x", "y z", "w"], "captions": [], "texts": None}
    out = sweep.variant_texts({"subset": "single", "captions": "class"}, corpus, FakeTokenizer())
    assert out["pool"].tolist() == [0, 2]
    assert out["alt"][0, 0] == len(shapes_scene.CLASS_NAMES[3])
    assert out["alt"][2, 0] == len(shapes_scene.CLASS_NAMES[17])
    with pytest.raises(ValueError, match="subset='single'"):
        sweep.variant_texts({"captions": "class"}, corpus, FakeTokenizer())
    tags = sweep.variant_texts({"captions": "tags"}, corpus, FakeTokenizer())
    assert tags["pool"].tolist() == [0, 1, 2] and tags["alt"][:, 0].tolist() == [1, 3, 1]


def test_variant_texts_hard_negatives_per_caption_with_validity():
    corpus = {"labels": np.array([0, -1]), "tags": [], "texts": np.zeros((2, 2, 4)),
              "captions": [["a red star", "a big red star"], ["hello there", "a disk and a star"]]}
    out = sweep.variant_texts({"hard_negatives": 3}, corpus, FakeTokenizer())
    assert out["neg"].shape == (2, 2, 3, sweep.MAX_TEXT_LEN)
    assert out["neg_valid"].tolist() == [[[True] * 3, [True] * 3], [[False] * 3, [True] * 3]]
    # FakeTokenizer encodes the length: "a red star" -> "a red circle" etc.
    lengths = {len(f"a red {s}") for s in shapes_scene.SHAPES if s != "star"}
    assert set(np.asarray(out["neg"])[0, 0, :, 0].tolist()) <= lengths


@pytest.mark.slow
def test_quick_run_prints_a_row_per_variant():
    (table,) = tables(run_benchmark("tiny_recipe_sweep.py", "--quick", "--variants",
                                    "cnn,cnn_hn1,cnn_tags50"))
    assert [r[0] for r in table[1:]] == ["cnn", "cnn_hn1", "cnn_tags50"]
    for row in table[1:]:
        # One cell per evaluation (steps 2 and 4 of --quick), the train time, examples/s.
        assert row[3].startswith("2 (0k): ") and row[4].startswith("4 (0k): ")
        assert row[4].endswith("%") and row[5].endswith(" s") and float(row[6]) > 0


def test_cache_is_written_once_read_back_and_checked_against_the_sizes(tmp_path, monkeypatch):
    calls = []

    def fake_generate(split, size, image_size, workers):
        calls.append(split)
        return np.full((size, image_size, image_size, 3), len(calls), np.uint8), [], [], []

    monkeypatch.setattr(sweep, "generate", fake_generate)
    args = sweep.argparse.Namespace(train_size=4, eval_size=2, image_size=8, workers=1,
                                    cache=str(tmp_path / "data.pkl"))
    first = sweep.load_or_generate(args)
    again = sweep.load_or_generate(args)
    assert calls == ["train", "validation"]  # scored on validation; the second call read the file
    np.testing.assert_array_equal(first[0][0], again[0][0])
    assert again[1][0].shape == (2, 8, 8, 3) and again[1][0][0, 0, 0, 0] == 2
    args.train_size = 5
    with pytest.raises(SystemExit, match="train_size"):
        sweep.load_or_generate(args)


def test_run_options_scale_steps_and_eval_interval_and_override_batch_and_lr():
    args = sweep.argparse.Namespace(batch=128, lr=1e-3, steps=1000, eval_every=200)
    assert sweep.run_options({}, args) == dict(batch=128, lr=1e-3, steps=1000, eval_every=200)
    td1 = sweep.run_options(sweep.VARIANTS["cnn_hn7_td1_long_b64"], args)
    assert td1 == dict(batch=64, lr=1e-3, steps=2900, eval_every=580)
    assert sweep.run_options(sweep.VARIANTS["cnn_hn7_td0_lr2e-3"], args)["lr"] == 2e-3
    cfg = sweep.merge(sweep.BASE, sweep.VARIANTS["cnn_hn7_td0_lr2e-3"])
    assert cfg["text"]["depth"] == 0 and cfg["text"]["pool"] == "map"
    assert "steps_scale" not in cfg and "lr" not in cfg  # run options, not model arguments


def test_variants_train_through_the_task_config_and_the_trainer_optimiser():
    args = sweep.argparse.Namespace(image_size=64)
    siglip = sweep.task_config(sweep.VARIANTS["cnn_hn7"], args)
    assert siglip.loss.to_dict() == {"name": "siglip", "impl": "dense"}
    assert siglip.model.image_arch == "cnn" and siglip.model.bias_init == -10.0
    clip = sweep.task_config(sweep.VARIANTS["cnn_hn7_clip"], args)
    assert clip.loss.to_dict() == {"name": "clip"} and clip.model.bias_init is None
    assert clip.model.temperature_init == pytest.approx(1 / 0.07)
    task = sweep.ContrastiveTask(clip, mesh=None)  # the config is one the task accepts
    assert task.loss_name == "clip" and task.image_size == 64
    # The trainer's optimiser from optim_config: warmup, then cosine down to lr / 100.
    tx, schedule = sweep.optim.make_optimizer(sweep.optim_config(2e-3, 10), 110, {})
    assert float(schedule(5)) == pytest.approx(1e-3)
    assert float(schedule(10)) == pytest.approx(2e-3)
    assert float(schedule(110)) == pytest.approx(2e-5)
    assert not any("hn_form" in v or "hn_weight" in v for v in sweep.VARIANTS.values())


def test_merge_builds_the_cbow_and_resnet_towers():
    cbow = sweep.merge(sweep.BASE, sweep.VARIANTS["cnn_hn7_cbow"])
    assert cbow["text_arch"] == "cbow" and cbow["image_arch"] == "cnn"
    assert cbow["text"] == {"vocab_size": 1000, "max_len": 24, "width": 64}  # no layers, heads
    args = sweep.argparse.Namespace(image_size=32, max_text_len=24)
    config = sweep.task_config(sweep.VARIANTS["resnet_hn7_td0"], args)
    assert config.model.image_arch == "resnet" and config.model.image.image_size == 32
    assert config.model.text.depth == 0 and config.model.text.pool == "map"
