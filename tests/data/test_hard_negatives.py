"""Word-swap hard negatives (NegCLIP): what is swapped, determinism, config errors, pipeline."""
import re

import numpy as np
import pytest

from tests.data.test_pipeline import _input, shapes_data  # noqa: F401 (fixture)
from vlmjax.data import hard_negatives, pipeline, shapes_scene

SHAPES_VOCAB = hard_negatives.VOCABULARIES["vlm_shapes"]
WORD_TO_SHAPE = {w: s for s, words in SHAPES_VOCAB.items() for w in words}
SHAPE_RE = re.compile(r"\b(" + "|".join(sorted(WORD_TO_SHAPE, key=len, reverse=True)) + r")\b")


def shapes_named(text):
    return [WORD_TO_SHAPE[w] for w in SHAPE_RE.findall(text)]


def test_vlm_shapes_vocabulary_covers_every_shape_and_synonym():
    assert set(SHAPES_VOCAB) == set(shapes_scene.SHAPES)
    assert SHAPES_VOCAB["circle"] == ("circle", "disk")
    assert SHAPES_VOCAB["cross"][0] == "cross" and "plus sign" in SHAPES_VOCAB["cross"]


def test_one_object_gets_distinct_other_shapes_and_keeps_the_rest():
    swapper = hard_negatives.WordSwapper(SHAPES_VOCAB, count=7)
    caption = "there is a small green plus sign near the top"
    negatives = swapper.negatives(caption, np.random.default_rng(0))
    assert sorted(shapes_named(n)[0] for n in negatives) == sorted(
        s for s in shapes_scene.SHAPES if s != "cross")
    for negative in negatives:
        assert negative.startswith("there is a small green ") and negative.endswith(" near the top")
    # More negatives than other classes: repeats, each still wrong.
    many = hard_negatives.WordSwapper(SHAPES_VOCAB, count=10).negatives(
        caption, np.random.default_rng(0))
    assert len(many) == 10 and all(shapes_named(n) != ["cross"] for n in many)


def test_every_shape_word_of_several_objects_is_swapped_to_another_shape():
    swapper = hard_negatives.WordSwapper(SHAPES_VOCAB, count=5)
    caption = "a red disk and a blue star, and a big white rhombus"
    for negative in swapper.negatives(caption, np.random.default_rng(3)):
        swapped = shapes_named(negative)
        assert len(swapped) == 3 and all(a != b for a, b in
                                         zip(swapped, ["circle", "star", "diamond"]))
        assert "a red " in negative and "a blue " in negative and "a big white " in negative


def test_caption_without_a_vocabulary_word_is_masked_out():
    swapper = hard_negatives.WordSwapper(SHAPES_VOCAB, count=2)
    texts, valid = hard_negatives.batch_negatives(
        swapper, ["a red star", "buy cheap shoes online"], [4, 9], seed=1)
    assert valid.tolist() == [[True, True], [False, False]]
    assert texts[2:] == ["buy cheap shoes online"] * 2 and len(texts) == 4
    again, _ = hard_negatives.batch_negatives(swapper, ["a red star", "x"], [4, 9], seed=1)
    other, _ = hard_negatives.batch_negatives(swapper, ["a red star", "x"], [5, 9], seed=1)
    assert again[:2] == texts[:2]  # a pure function of (caption, seed, index)
    assert other[:2] != texts[:2]  # another example index, other draws


@pytest.mark.parametrize("config, message", [
    ({"count": 2, "vocab": "x"}, "unknown key"),
    ({"count": -1}, "count"),
    ({"count": 2, "vocabulary": "colours"}, "is not one of"),
    ({"count": 2, "vocabulary": {"a": ["x"]}}, "at least 2 classes"),
    ({"count": 2, "vocabulary": {"a": "x", "b": ["y"]}}, "list of words"),
    ({"count": 2, "vocabulary": {"a": ["x"], "b": ["x", "y"]}}, "in both classes"),
    ({"count": 2, "vocabulary": {"a": [""], "b": ["y"]}}, "non-empty strings"),
    ({"count": 2, "vocabulary": {"a": [3], "b": ["y"]}}, "non-empty strings"),
    ({"count": True}, "count"),
])
def test_bad_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        hard_negatives.make_swapper(config)


def test_off_by_default():
    assert hard_negatives.make_swapper(None) is None
    assert hard_negatives.make_swapper({"count": 0}) is None


def test_training_batches_carry_negatives_that_resume_exactly(shapes_data):  # noqa: F811
    config = _input(hard_negatives={"count": 3, "vocabulary": "vlm_shapes"})
    data = pipeline.make_pipeline(shapes_data, config, training=True, process_index=0,
                                  process_count=1)
    next(data)
    state = data.get_state()
    batch = next(data)
    assert batch["neg_text"].shape == (8, 3, config.max_text_len)
    assert batch["neg_text_mask"].shape == batch["neg_text"].shape
    assert batch["neg_valid"].all()  # every vlm_shapes caption names a shape
    captions = data.tokenizer.decode_batch(batch["text"], batch["text_mask"])
    for row, caption in enumerate(captions):
        negatives = data.tokenizer.decode_batch(batch["neg_text"][row],
                                                batch["neg_text_mask"][row])
        for negative in negatives:
            assert shapes_named(negative) != shapes_named(caption), (caption, negative)
            assert SHAPE_RE.sub("#", negative) == SHAPE_RE.sub("#", caption)
    resumed = pipeline.make_pipeline(shapes_data, config, training=True, process_index=0,
                                     process_count=1, state=state)
    np.testing.assert_array_equal(next(resumed)["neg_text"], batch["neg_text"])
    evaluation = pipeline.make_pipeline(shapes_data, config, training=False, process_index=0,
                                        process_count=1)
    assert "neg_text" not in next(evaluation)
