"""ALIGN-style filtering of image-text pairs (Jia et al. 2021, "Scaling Up Visual and
Vision-Language Representation Learning With Noisy Text Supervision", section 3).

Rules, each behind a switch, with the paper's thresholds as defaults:
  image_size     keep images whose shorter side is > 200 px
  aspect_ratio   keep images whose aspect ratio (long / short side) is < 3
  text_length    drop texts with fewer than 3 or more than 20 unigrams
  shared_text    drop alt-texts shared by more than 10 images
  rare_tokens    drop texts containing a unigram or bigram outside the K most frequent
                 unigrams and bigrams of the corpus (the paper's K is 100 million)

Unigrams are the lower-cased `\\w+` runs of a text (so "1920x1080" and "alt_img" are one unigram
each); a text's identity for the sharing rule is its unigram sequence, so case and punctuation
differences do not hide a shared text. The last two rules need corpus statistics, gathered in a
first pass (`CorpusStats`); `python -m vlmjax.data.align_filter` runs both passes over tar shards. The
three per-example rules also run online in the input pipeline (`online_skip_reason`).
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

import ml_collections

RULES = ("image_size", "aspect_ratio", "text_length", "shared_text", "rare_tokens")
ONLINE_KEYS = ("filter_image_size", "min_image_side", "filter_aspect_ratio", "max_aspect_ratio",
               "filter_text_length", "min_words", "max_words")
_WORD = re.compile(r"\w+")


def default_config() -> ml_collections.ConfigDict:
    """All five rules on, with ALIGN's thresholds."""
    return ml_collections.ConfigDict(dict(
        filter_image_size=True, min_image_side=200,
        filter_aspect_ratio=True, max_aspect_ratio=3.0,
        filter_text_length=True, min_words=3, max_words=20,
        filter_shared_text=True, max_images_per_text=10,
        filter_rare_tokens=True, vocab_top_k=100_000_000,
    ))


def online_default_config() -> ml_collections.ConfigDict:
    """The per-example rules for the input pipeline, all off by default."""
    config = default_config()
    return ml_collections.ConfigDict({key: (False if key.startswith("filter_") else config[key])
                                      for key in ONLINE_KEYS})


def unigrams(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(words: list[str]) -> list[str]:
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class CorpusStats:
    """What the corpus-level rules need: images per text and unigram + bigram frequencies."""

    def __init__(self):
        self.images_per_text: collections.Counter = collections.Counter()
        self.ngram_counts: collections.Counter = collections.Counter()

    def add(self, text: str) -> None:
        words = unigrams(text)
        self.images_per_text[" ".join(words)] += 1
        self.ngram_counts.update(ngrams(words))

    def add_all(self, texts: Iterable[str]) -> "CorpusStats":
        for text in texts:
            self.add(text)
        return self

    def vocabulary(self, top_k: int) -> set[str]:
        """The top_k most frequent n-grams; ties broken alphabetically so results are stable."""
        if top_k >= len(self.ngram_counts):
            return set(self.ngram_counts)
        ranked = sorted(self.ngram_counts.items(), key=lambda item: (-item[1], item[0]))
        return {ngram for ngram, _ in ranked[:top_k]}


class AlignFilter:
    """Decides per example which rule (if any) removes it; rules are tried in `RULES` order."""

    def __init__(self, config: ml_collections.ConfigDict, stats: CorpusStats | None = None):
        unknown = set(config.keys()) - set(default_config().keys())
        if unknown:
            raise ValueError(f"unknown filter option(s) {sorted(unknown)}; valid: "
                             f"{sorted(default_config().keys())}")
        self.config = config
        needs_stats = config.get("filter_shared_text") or config.get("filter_rare_tokens")
        if needs_stats and stats is None:
            raise ValueError("the shared_text and rare_tokens rules need CorpusStats of the "
                             "whole corpus (a first pass over it)")
        self.stats = stats
        self.vocabulary = (stats.vocabulary(config.vocab_top_k)
                           if config.get("filter_rare_tokens") else None)

    def removing_rule(self, text: str, image_size: tuple[int, int] | None = None) -> str | None:
        """The first rule that removes (text, image of (width, height)), or None to keep it."""
        config = self.config
        if image_size is not None:
            short, long = sorted(image_size)
            if config.filter_image_size and short <= config.min_image_side:
                return "image_size"
            too_wide = short == 0 or long / short >= config.max_aspect_ratio
            if config.filter_aspect_ratio and too_wide:
                return "aspect_ratio"
        words = unigrams(text)
        if config.filter_text_length and not config.min_words <= len(words) <= config.max_words:
            return "text_length"
        if config.filter_shared_text and (self.stats.images_per_text[" ".join(words)]
                                          > config.max_images_per_text):
            return "shared_text"
        if config.filter_rare_tokens and any(g not in self.vocabulary for g in ngrams(words)):
            return "rare_tokens"
        return None


def online_skip_reason(image_shape, texts, config: ml_collections.ConfigDict):
    """TF version of the per-example rules for the pipeline.

    Returns (skip reason id, texts that pass the length rule). An example is skipped when its
    image fails, or when none of its captions passes. TF's `\\w` is ASCII-only, unlike Python's.
    """
    from vlmjax.data import skips
    from vlmjax.data.tf_cpu import tf

    reason = tf.constant(0, tf.int32)
    short = tf.reduce_min(image_shape[:2])
    long = tf.reduce_max(image_shape[:2])
    if config.filter_aspect_ratio:
        bad_aspect = tf.cast(long, tf.float32) >= config.max_aspect_ratio * tf.cast(short,
                                                                                   tf.float32)
        reason = tf.where(bad_aspect, skips.reason_id("bad_aspect_ratio"), reason)
    if config.filter_image_size:
        reason = tf.where(short <= config.min_image_side, skips.reason_id("image_too_small"),
                          reason)
    if config.filter_text_length:
        words = tf.strings.split(tf.strings.strip(
            tf.strings.regex_replace(tf.strings.lower(texts), r"[^\w]+", " ")))
        counts = tf.cast(words.row_lengths(), tf.int32)
        passes = (counts >= config.min_words) & (counts <= config.max_words)
        first_reason = tf.where(counts[0] < config.min_words, skips.reason_id("text_too_short"),
                                skips.reason_id("text_too_long"))
        reason = tf.where((reason == 0) & ~tf.reduce_any(passes), first_reason, reason)
        texts = tf.boolean_mask(texts, passes)
    return reason, texts
