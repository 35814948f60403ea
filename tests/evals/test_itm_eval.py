"""The itm evaluator: which (image, text) pairs it asks a fake ITM head about, and the accuracies
it reports for fake heads whose answers are known; its pure parts on hand-made captions."""
import math

import ml_collections
import numpy as np
import pytest

from tests.evals.test_vqa import IMAGE_SIZE, shapes_data, test_examples  # noqa: F401 (fixtures)
from vlmjax.config import ConfigError
from vlmjax.data import hard_negatives, pipeline_config
from vlmjax.evals import itm, registry

SHAPE_WORDS = {w for words in hard_negatives.VOCABULARIES["vlm_shapes"].values() for w in words}


class FakeItm:
    """An ITM head that knows each test image's first caption (by the image's pixels) and answers
    with `rule(image index, text kind)`, kind one of 'own' (the image's first caption), 'other'
    (another image's first caption), 'unknown' (any other text: a hard negative); records every
    pair it is asked about as (image index, text)."""

    def __init__(self, rule):
        self.rule, self.pairs, self.calls = rule, [], 0
        self.image_index, self.captions, self.text_of = {}, [], {}

    def learn(self, evaluator):
        """The images and first captions of the evaluator's data, in its order."""
        for batch, caption_lists in evaluator.data.batches(4):
            for image, captions in zip(batch["image"][batch["_mask"]], caption_lists):
                self.image_index[image.tobytes()] = len(self.captions)
                self.captions.append(captions[0])
        ids, mask = evaluator.data.tokenize(self.captions)
        self.caption_ids = [tuple(row[m]) for row, m in zip(ids, mask)]
        self.evaluator = evaluator

    def itm_scores(self, params, images, ids, mask):
        assert params == "params" and images.dtype == np.float32 and ids.dtype == np.int32
        assert images.shape == (len(ids), IMAGE_SIZE, IMAGE_SIZE, 3) and mask.shape == ids.shape
        self.calls += 1
        out = []
        for image, row, row_mask in zip(images, ids, mask):
            index = self.image_index[image.tobytes()]
            text = tuple(row[row_mask])
            kind = ("own" if text == self.caption_ids[index] else
                    "other" if text in self.caption_ids else "unknown")
            self.pairs.append((index, text))
            out.append(self.rule(index, kind))
        return np.asarray(out, np.float32)


def build(train, entry, model):
    context = registry.EvalContext(
        mesh=None, train_data=train, model=model,
        input=ml_collections.ConfigDict(dict(pipeline_config.INPUT_DEFAULTS,
                                             image_size=IMAGE_SIZE)))
    (built,) = registry.build_evaluators(ml_collections.ConfigDict({"e": entry}), context)
    if isinstance(model, FakeItm):
        model.learn(built)
    return built


def entry(**keys):
    return dict(type="itm", data=dict(split="test"), **keys)


def expected_pairs(model, seed):
    """(positive, hard, random) texts asked of each image, from the pure functions."""
    firsts = model.captions
    hard = itm.hard_negative_captions(firsts, 0, seed)
    partner = itm.random_negative_images(firsts, seed)
    return firsts, hard, [firsts[j] for j in partner]


def tokens(evaluator, text):
    ids, mask = evaluator.data.tokenize([text])
    return tuple(ids[0][mask[0]])


# ----------------------------------------------------------------------------- pure parts
def test_hard_negatives_swap_shape_words_seeded_per_image():
    captions = ["a small red disk", "a blue thing on grey", None, "a plus sign and a star"]
    out = itm.hard_negative_captions(captions, 10, seed=3)
    assert out[1] is None and out[2] is None  # no shape word; no caption
    assert out[0].startswith("a small red ") and out[0].split()[-1] in SHAPE_WORDS
    assert out[0].split()[-1] not in ("disk", "circle")  # another class than the disk's
    assert out[3] != captions[3] and "star" not in out[3].split()[-1:]
    # Image k's negative depends on its index only, not on the batch it comes in.
    assert [itm.hard_negative_captions([c], 10 + k, seed=3)[0]
            for k, c in enumerate(captions)] == out
    assert itm.hard_negative_captions(captions, 10, seed=3) == out
    assert any(itm.hard_negative_captions(captions, 10, seed=s)[0] != out[0] for s in range(4))


def test_random_negatives_are_other_images_with_other_text():
    captions = ["a", "b", "a", None, "c", "b"]
    partner = itm.random_negative_images(captions, seed=0)
    assert partner[3] == -1  # no caption: no pair, and never drawn
    for i, j in enumerate(partner):
        if captions[i] is not None:
            assert j != i and captions[j] is not None and captions[j] != captions[i]
    np.testing.assert_array_equal(partner, itm.random_negative_images(captions, seed=0))
    draws = {tuple(itm.random_negative_images(captions, seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    np.testing.assert_array_equal(itm.random_negative_images(["x", "x", None], 0), [-1, -1, -1])


def test_accuracies_of_known_scores():
    # positives: 2 of 4 > 0 (0 is a non-match); hard: 1 of 2 <= 0; random: 0 is a non-match,
    # NaN is wrong.
    metrics = itm.itm_accuracies([1.0, -1.0, 0.5, 0.0], [-1.0, 2.0], [0.0, math.nan])
    assert metrics == pytest.approx(dict(accuracy=4 / 8, accuracy_positive=2 / 4,
                                         accuracy_hard_negative=0.5,
                                         accuracy_random_negative=0.5, pairs=8.0))
    assert itm.itm_accuracies([1.0], [], [-2.0]) == pytest.approx(dict(
        accuracy=1.0, accuracy_positive=1.0, accuracy_hard_negative=0.0,
        accuracy_random_negative=1.0, pairs=2.0))
    with pytest.raises(ValueError, match="no image-text pair"):
        itm.itm_accuracies([], [], [])


# ------------------------------------------------------------------------------- evaluator
def test_a_head_fooled_by_word_swaps(shapes_data, test_examples):
    """Right on positives and on other images' captions, wrong on every hard negative."""
    model = FakeItm(lambda index, kind: {"own": 3.0, "other": -2.0, "unknown": 1.0}[kind])
    run = build(shapes_data[0], entry(batch_size=4, seed=5), model)
    metrics = run("params")
    n = len(test_examples)
    assert model.captions == [ex["captions"][0].decode() for ex in test_examples]
    positives, hards, randoms = expected_pairs(model, seed=5)
    assert all(h is not None for h in hards)  # every vlm_shapes caption names a shape
    expected = sorted([(i, tokens(run, t)) for i, t in enumerate(positives)]
                      + [(i, tokens(run, t)) for i, t in enumerate(hards)]
                      + [(i, tokens(run, t)) for i, t in enumerate(randoms)])
    assert sorted(model.pairs) == expected  # each image with its own three texts
    assert all(r != p for r, p in zip(randoms, positives))
    assert model.calls == 4  # 6 images, 4 a batch: 2 batches, each pass
    # Unless a swap produced another image's caption, the hard negatives are 'unknown'.
    hard_known = sum(tokens(run, h) in model.caption_ids for h in hards)
    assert metrics == pytest.approx({f"itm/e/{k}": v for k, v in dict(
        accuracy=(2 * n + hard_known) / (3 * n), accuracy_positive=1.0,
        accuracy_hard_negative=hard_known / n, accuracy_random_negative=1.0, pairs=3.0 * n,
        images=float(n), no_hard_negative=0.0).items()})
    assert hard_known < n


def test_a_perfect_head_and_one_that_always_says_match(shapes_data, test_examples):
    n = len(test_examples)
    perfect = FakeItm(lambda index, kind: 1.0 if kind == "own" else -1.0)
    metrics = build(shapes_data[0], entry(batch_size=2), perfect)("params")
    assert metrics == pytest.approx({"itm/e/accuracy": 1.0, "itm/e/accuracy_positive": 1.0,
                                     "itm/e/accuracy_hard_negative": 1.0,
                                     "itm/e/accuracy_random_negative": 1.0,
                                     "itm/e/pairs": 3.0 * n, "itm/e/images": float(n),
                                     "itm/e/no_hard_negative": 0.0})
    yes = FakeItm(lambda index, kind: 0.5)
    metrics = build(shapes_data[0], entry(max_images=4), yes)("params")
    assert metrics["itm/e/accuracy"] == pytest.approx(1 / 3)
    assert metrics["itm/e/accuracy_positive"] == 1.0
    assert metrics["itm/e/accuracy_hard_negative"] == 0.0
    assert metrics["itm/e/accuracy_random_negative"] == 0.0
    assert metrics["itm/e/pairs"] == 12.0 and {i for i, _ in yes.pairs} == set(range(4))


def test_pairs_do_not_depend_on_the_batch_size_and_the_seed_moves_them(shapes_data):
    runs = {}
    for batch_size, seed in ((2, 0), (5, 0), (5, 1)):
        model = FakeItm(lambda index, kind: float(index % 2) - 0.5)
        metrics = build(shapes_data[0], entry(batch_size=batch_size, seed=seed), model)("params")
        runs[batch_size, seed] = sorted(model.pairs), metrics
    assert runs[2, 0] == runs[5, 0]
    assert runs[5, 1][0] != runs[5, 0][0]


def test_captions_without_a_swappable_word_count_and_add_no_hard_negative(
        shapes_data, test_examples, monkeypatch):
    # Only circles (disks) and squares swap: captions without either have no hard negative.
    monkeypatch.setitem(hard_negatives.VOCABULARIES, "vlm_shapes",
                        {"circle": ("circle", "disk"), "square": ("square",)})
    firsts = [ex["captions"][0].decode() for ex in test_examples]
    swappable = [any(w in c.replace(",", " ").split() for w in ("circle", "disk", "square"))
                 for c in firsts]
    assert 0 < sum(swappable) < len(firsts)  # the data has both kinds
    model = FakeItm(lambda index, kind: 1.0 if kind == "own" else -1.0)
    metrics = build(shapes_data[0], entry(), model)("params")
    n, with_hard = len(firsts), sum(swappable)
    assert metrics["itm/e/no_hard_negative"] == n - with_hard
    assert metrics["itm/e/pairs"] == 2 * n + with_hard
    asked = {i for i, text in model.pairs
             if text not in model.caption_ids}  # the images asked about a hard negative
    assert asked == {i for i, s in enumerate(swappable) if s}


@pytest.mark.parametrize("keys, message", [
    (dict(max_images=1), r"evals.e.max_images=1: random negatives"),
    (dict(max_images=-2), r"evals.e.max_images must be an integer >= 0"),
    (dict(seed=-1), r"evals.e.seed must be an integer >= 0"),
    (dict(seed=1.5), r"evals.e.seed must be an integer >= 0"),
    (dict(rerank_k=3), r"evals.e.rerank_k is not used by anything"),
])
def test_bad_entries_are_config_errors(keys, message):
    train = ml_collections.ConfigDict(dict(source="vlm_shapes", split="train",
                                           data_dir="/nonexistent"))
    with pytest.raises(ConfigError, match=message):
        registry.check_evals(ml_collections.ConfigDict({"e": entry(**keys)}), train)


def test_a_model_without_an_itm_head_is_a_config_error(shapes_data):
    with pytest.raises(ConfigError, match=r"evals.e: an itm evaluation needs a model with an "
                                          r"ITM head \(itm_scores"):
        build(shapes_data[0], entry(), object())
