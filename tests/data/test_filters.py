"""ALIGN filtering: each rule, corpus statistics, the TF per-example rules, the CLI, and precision
and recall on vlm_shapes web noise."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.conftest import image_bytes
from vlmjax.data import align_filter, filters, shapes_examples, shapes_noise, skips, webdataset
from vlmjax.data.tf_cpu import tf


def _only(rule: str, **overrides):
    config = filters.default_config()
    for name in filters.RULES:
        config[f"filter_{name}"] = name == rule
    config.update(overrides)
    return config


def test_image_rules_use_align_thresholds():
    align = filters.AlignFilter(_only("image_size"))
    assert align.removing_rule("a b c", (200, 500)) == "image_size"  # shorter side must be > 200
    assert align.removing_rule("a b c", (201, 500)) is None
    align = filters.AlignFilter(_only("aspect_ratio"))
    assert align.removing_rule("a b c", (900, 300)) == "aspect_ratio"  # must be < 3
    assert align.removing_rule("a b c", (899, 300)) is None


def test_text_length_counts_unigrams():
    align = filters.AlignFilter(_only("text_length"))
    assert align.removing_rule("alt_img") == "text_length"
    assert align.removing_rule("1920x1080") == "text_length"
    assert align.removing_rule("two words") == "text_length"
    assert align.removing_rule("three small words") is None
    assert align.removing_rule(" ".join(["w"] * 20)) is None
    assert align.removing_rule(" ".join(["w"] * 21)) == "text_length"


def test_shared_text_counts_images_per_normalised_text():
    texts = ["Click HERE, for more!"] * 6 + ["click here for more"] * 5 + ["a unique caption"] * 10
    stats = filters.CorpusStats().add_all(texts)
    align = filters.AlignFilter(_only("shared_text"), stats)
    assert align.removing_rule("click here for more") == "shared_text"  # 11 images > 10
    assert align.removing_rule("a unique caption") is None  # 10 images: kept
    with pytest.raises(ValueError, match="need CorpusStats"):
        filters.AlignFilter(_only("shared_text"))


def test_rare_tokens_use_top_k_unigrams_and_bigrams():
    stats = filters.CorpusStats().add_all(["red circle left"] * 5 + ["blue circle left"] * 3 +
                                          ["red zqxv left"])
    assert stats.ngram_counts["circle left"] == 8 and stats.ngram_counts["zqxv"] == 1
    # Frequent n-grams: red, circle, left, circle left, red circle, blue, blue circle = 7.
    align = filters.AlignFilter(_only("rare_tokens", vocab_top_k=7), stats)
    assert align.removing_rule("blue circle left") is None
    assert align.removing_rule("red zqxv left") == "rare_tokens"  # rare unigram
    assert align.removing_rule("blue red circle") == "rare_tokens"  # unseen bigram "blue red"
    assert filters.AlignFilter(_only("rare_tokens"), stats).removing_rule("red zqxv left") is None
    assert stats.vocabulary(2) == {"circle", "left"}


def test_unknown_filter_option_is_an_error():
    config = filters.default_config()
    config.min_side = 3
    with pytest.raises(ValueError, match=r"unknown filter option\(s\) \['min_side'\]"):
        filters.AlignFilter(config)


def test_online_rules_in_tensorflow():
    config = filters.online_default_config()
    assert not any(config[k] for k in filters.ONLINE_KEYS if k.startswith("filter_"))
    config.update(dict(filter_image_size=True, filter_aspect_ratio=True, filter_text_length=True))
    texts = tf.constant(["too short", "this caption is long enough", "x"])
    reason, kept = filters.online_skip_reason(tf.constant([300, 400, 3]), texts, config)
    assert int(reason) == 0 and list(kept.numpy()) == [b"this caption is long enough"]
    reason, _ = filters.online_skip_reason(tf.constant([150, 400, 3]), texts, config)
    assert skips.SKIP_REASONS[int(reason)] == "image_too_small"
    reason, _ = filters.online_skip_reason(tf.constant([300, 950, 3]), texts, config)
    assert skips.SKIP_REASONS[int(reason)] == "bad_aspect_ratio"
    reason, _ = filters.online_skip_reason(tf.constant([300, 400, 3]), tf.constant(["a b"]),
                                           config)
    assert skips.SKIP_REASONS[int(reason)] == "text_too_short"
    reason, _ = filters.online_skip_reason(tf.constant([300, 400, 3]),
                                           tf.constant([" ".join(["w"] * 25)]), config)
    assert skips.SKIP_REASONS[int(reason)] == "text_too_long"


@pytest.fixture
def align_shards(tmp_path):
    """One sample per rule to trip, plus good ones; a broken sample and a non-image too."""
    samples = [(f"good{i}", (300, 250), f"a photo of a red car number {i % 3}") for i in range(20)]
    samples += [("small", (150, 250), "a photo of a red car"),
                ("wide", (950, 300), "a photo of a red car"),
                ("short", (300, 250), "car"),
                ("gibberish", (300, 250), "a photo of zzqx vvbn"),
                *[(f"shared{i}", (300, 250), "buy now at our store") for i in range(11)]]
    with webdataset.ShardWriter(str(tmp_path / "in"), max_samples=12) as writer:
        for key, size, text in samples:
            writer.write(key, {"jpg": image_bytes(*size), "txt": text.encode(),
                               "json": json.dumps({"key": key}).encode()})
        writer.write("broken", {"jpg": b"not an image", "txt": b"a photo of a red car"})
    return tmp_path


def test_filter_cli_end_to_end(align_shards, capsys):
    source = f"{align_shards}/in/shard-{{000000..000002}}.tar"
    stats = filters.CorpusStats()
    for path in webdataset.expand_paths(source):
        for sample in webdataset.iter_tar_samples(path):
            if "txt" in sample.files and sample.key != "broken":
                stats.add(sample.files["txt"].decode())
    frequent = sum(1 for count in stats.ngram_counts.values() if count >= 2)
    out = str(align_shards / "out")
    code = align_filter.main([source, out, "--vocab_top_k", str(frequent)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "36 samples in 3 shard(s); kept 20" in printed
    report = json.load(open(f"{out}/filter_report.json"))
    assert report["removed"] == {"image_size": 1, "aspect_ratio": 1, "text_length": 1,
                                 "shared_text": 11, "rare_tokens": 1}
    assert report["skipped_bad_data"] == {"undecodable_image": 1}
    kept = [s for p in report["shards"] for s in webdataset.iter_tar_samples(p)]
    assert sorted(s.key for s in kept) == sorted(f"good{i}" for i in range(20))
    assert kept[0].files["jpg"] == image_bytes(300, 250)  # copied unchanged, json too
    assert set(kept[0].files) == {"jpg", "txt", "json"}


def test_filter_cli_switches_and_errors(align_shards, capsys):
    out = str(align_shards / "out2")
    code = align_filter.main([f"{align_shards}/in/*.tar", out, "--no_image_size",
                            "--no_shared_text", "--no_rare_tokens", "--max_aspect_ratio", "4"])
    assert code == 0
    report = json.load(open(f"{out}/filter_report.json"))
    assert report["kept"] == 20 + 2 + 1 + 11  # only the too-short text removed
    assert align_filter.main([f"{align_shards}/none-*.tar", out]) == 2
    assert "matched no shard files" in capsys.readouterr().err


def test_precision_and_recall_on_vlm_shapes_noise_per_kind():
    size = 1500
    spec = shapes_examples.ExampleSpec("train", 64, seed=0, noise_fraction=0.3, render=False,
                                       split_size=size)
    texts, kinds = [], []
    for index in range(size):
        example = shapes_examples.make_example(spec, index)
        texts += example["captions"]
        kinds += example["caption_noise"]
    config = filters.default_config()
    # K: above the ~800 n-grams this corpus repeats, so that the cutoff falls among few of the
    # once-seen ones (ties go alphabetically: a cutoff deep in them keeps some gibberish).
    config.update(dict(filter_image_size=False, filter_aspect_ratio=False, vocab_top_k=1000))
    align = filters.AlignFilter(config, filters.CorpusStats().add_all(texts))
    removed = np.array([align.removing_rule(text) is not None for text in texts])
    kinds = np.array(kinds)
    assert 0.25 < (kinds != "clean").mean() < 0.35
    assert removed[kinds == "clean"].mean() < 0.005
    for kind in shapes_noise.TEXT_JUNK_KINDS:  # each is aimed at one rule: all removed
        assert removed[kinds == kind].mean() > 0.99, kind
    # Another image's clean caption passes every text rule: ALIGN cannot catch it.
    assert (kinds == "swapped").sum() > 100 and removed[kinds == "swapped"].mean() < 0.01
