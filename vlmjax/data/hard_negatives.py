"""Hard-negative captions by word swaps (NegCLIP, Yuksekgonul et al. 2023).

Each training caption gets `count` negatives: copies in which every word of a vocabulary class
(e.g. a shape: "circle" or its synonym "disk") is replaced by a word of a *different* class
("a small red disk" -> "a small red star"). Scored against its image as extra negatives, they
make the model tell apart what the swap changed, an attribute that in-batch negatives rarely
isolate (README "Measured: tiny models").

A vocabulary maps class -> words (the first word is the one written into negatives); it is named
(`VOCABULARIES`) or given inline in `input.hard_negatives.vocabulary`. Negatives are a pure
function of (caption, seed, example index), so a resumed run sees the same ones. With several
objects the K negatives are drawn independently, so two may coincide, and rarely a swap may be
true of the image too (two objects of one colour): both are accepted as noise.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from vlmjax.data import shapes_scene, shapes_text

VOCABULARIES = {
    "vlm_shapes": {shape: (shape, *[w for w in shapes_text.SHAPE_WORDS.get(shape, ())
                                    if w != shape])
                   for shape in shapes_scene.SHAPES},
}
CONFIG_KEYS = ("count", "vocabulary")


class WordSwapper:
    """`negatives(caption, rng)`: `count` captions with every vocabulary word swapped to another
    class, or [] when the caption has no vocabulary word."""

    def __init__(self, vocabulary: Mapping[str, Sequence[str]], count: int):
        if count < 1:
            raise ValueError(f"hard negatives: count {count} must be at least 1")
        if len(vocabulary) < 2:
            raise ValueError(f"hard negatives: the vocabulary needs at least 2 classes to swap "
                             f"between, got {sorted(vocabulary)}")
        self.count = count
        self.classes = list(vocabulary)
        self.class_of = {}
        for name, words in vocabulary.items():
            if isinstance(words, str) or not words:
                raise ValueError(f"hard negatives: vocabulary class {name!r} needs a non-empty "
                                 f"list of words, got {words!r}")
            for word in words:
                if not isinstance(word, str) or not word.strip():
                    raise ValueError(f"hard negatives: vocabulary class {name!r} has the word "
                                     f"{word!r}; words must be non-empty strings")
                if word.lower() in self.class_of:  # a swap could leave the caption unchanged
                    raise ValueError(f"hard negatives: the word {word!r} is in both classes "
                                     f"{self.class_of[word.lower()]!r} and {name!r}")
                self.class_of[word.lower()] = name
        self.written = {name: words[0] for name, words in vocabulary.items()}
        # Longest first, so "plus sign" wins over a class word "plus".
        alternatives = "|".join(re.escape(w) for w in sorted(self.class_of, key=len, reverse=True))
        self.pattern = re.compile(rf"\b({alternatives})\b", re.IGNORECASE)

    def _other_classes(self, name: str) -> list[str]:
        return [c for c in self.classes if c != name]

    def negatives(self, caption: str, rng: np.random.Generator) -> list[str]:
        found = [self.class_of[w.lower()] for w in self.pattern.findall(caption)]
        if not found:
            return []
        if len(set(found)) == 1:  # one class named: distinct wrong classes while they last
            others = self._other_classes(found[0])
            picks = [others[i % len(others)] for i in rng.permutation(max(self.count,
                                                                          len(others)))]
            return [self.pattern.sub(self.written[pick], caption) for pick in picks[:self.count]]

        def swap(match):
            others = self._other_classes(self.class_of[match.group(1).lower()])
            return self.written[others[int(rng.integers(len(others)))]]
        return [self.pattern.sub(swap, caption) for _ in range(self.count)]


def make_swapper(config) -> WordSwapper | None:
    """The swapper `input.hard_negatives` asks for (None when off: count 0 or no config)."""
    if not config:
        return None
    unknown = sorted(set(config.keys()) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"input.hard_negatives: unknown key(s) {unknown}; valid: "
                         f"{list(CONFIG_KEYS)}")
    count = config.get("count", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"input.hard_negatives.count: {count!r} must be an integer >= 0")
    if count == 0:
        return None
    vocabulary = config.get("vocabulary", "vlm_shapes")
    if isinstance(vocabulary, str):
        if vocabulary not in VOCABULARIES:
            raise ValueError(f"input.hard_negatives.vocabulary: {vocabulary!r} is not one of "
                             f"{sorted(VOCABULARIES)} (or give a dict class -> words)")
        vocabulary = VOCABULARIES[vocabulary]
    elif hasattr(vocabulary, "to_dict"):
        vocabulary = vocabulary.to_dict()
    return WordSwapper(vocabulary, count)


def batch_negatives(swapper: WordSwapper, captions: Sequence[str], indices: Sequence[int],
                    seed: int) -> tuple[list[str], np.ndarray]:
    """[B * count] negative captions (row-major) and a [B, count] mask of the real ones; a caption
    without a vocabulary word gets masked-out copies of itself."""
    texts, valid = [], np.zeros((len(captions), swapper.count), bool)
    for row, (caption, index) in enumerate(zip(captions, indices)):
        negatives = swapper.negatives(caption, np.random.default_rng([seed, int(index)]))
        valid[row, :len(negatives)] = True
        texts += negatives or [caption] * swapper.count
    return texts, valid
