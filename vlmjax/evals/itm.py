"""Image-text matching (ITM) accuracy: does the model's ITM head (BLIP) tell an image's own caption
from a near miss and from another image's caption?

Each image of the data (the first `max_images`, in the data's fixed order) is scored in up to
three (image, text) pairs:
  positive         its first caption
  hard negative    that caption with every shape word swapped for another shape's (the word-swap
                   machinery of the contrastive hard negatives, vlmjax/data/hard_negatives.py,
                   vocabulary "vlm_shapes"; "a small red disk" -> "a small red star"). A caption
                   without a shape word has none: the image contributes no hard negative, and is
                   counted in `no_hard_negative`
  random negative  the first caption of another image, drawn at random (seeded) among the images
                   whose first caption is a different text (identical texts would be positives)
A pair is classified as a match iff its ITM score (`itm_scores`: higher = more likely a match)
is > 0: a positive is right when its score is > 0, a negative when it is <= 0 (a NaN score is
wrong either way). As in training, a swap is rarely true of the image too (two objects): noise.

Metrics, for the entry `name` of config.evals (fractions in [0, 1]; a group without pairs: 0):
  itm/{name}/accuracy                  right pairs / all pairs scored
  itm/{name}/accuracy_positive         positives classified as matches
  itm/{name}/accuracy_hard_negative    hard negatives classified as non-matches
  itm/{name}/accuracy_random_negative  random negatives classified as non-matches
  itm/{name}/pairs                     pairs scored
  itm/{name}/images                    images scored (images without a caption are skipped)
  itm/{name}/no_hard_negative          images whose caption has no swappable word
Entry keys beside the common ones (evals/registry.py; `batch_size`: images per data batch):
  max_images  the first N images (0 = all; default 1000)
  seed        of the hard and random negatives (default 0); the same seed gives the same pairs
              whatever the batch size

Images are not held in memory: a first pass over the data scores the positives and hard
negatives and keeps the captions, a second pass (the same order) scores the random negatives.
`context.model` has `itm_scores(params, images f32 [N,H,W,3], ids i32 [N,L], mask bool [N,L])
-> f32 [N]` (evals/blip_model.py); it batches the rows itself.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from vlmjax.config import ConfigError
from vlmjax.data import hard_negatives
from vlmjax.evals import registry

VOCABULARY = "vlm_shapes"
DEFAULT_MAX_IMAGES = 1000


def hard_negative_captions(captions: Sequence[str | None], first_index: int,
                           seed: int) -> list[str | None]:
    """The hard negative of each caption (None: no caption, or no swappable word); caption k is
    image `first_index + k`, whose index seeds its swap (so batches do not matter)."""
    swapper = hard_negatives.WordSwapper(hard_negatives.VOCABULARIES[VOCABULARY], count=1)
    out = []
    for k, caption in enumerate(captions):
        negatives = (swapper.negatives(caption, np.random.default_rng([seed, first_index + k]))
                     if caption else [])
        out.append(negatives[0] if negatives else None)
    return out


def random_negative_images(captions: Sequence[str | None], seed: int) -> np.ndarray:
    """For each image, another image whose caption is a different text, drawn uniformly with
    `seed`; -1 for an image without a caption or without such another image. int64 [N]."""
    codes: dict[str, int] = {}
    code = np.array([codes.setdefault(c, len(codes)) if c else -1 for c in captions], np.int64)
    rng = np.random.default_rng(seed)
    out = np.full(len(captions), -1, np.int64)
    for i in np.flatnonzero(code >= 0):
        others = np.flatnonzero((code != code[i]) & (code >= 0))
        if len(others):
            out[i] = others[rng.integers(len(others))]
    return out


def itm_accuracies(positive, hard_negative, random_negative) -> dict[str, float]:
    """The accuracy metrics of the module docstring from the ITM scores of each pair group."""
    right = {"positive": np.asarray(positive, np.float32).reshape(-1) > 0,
             "hard_negative": np.asarray(hard_negative, np.float32).reshape(-1) <= 0,
             "random_negative": np.asarray(random_negative, np.float32).reshape(-1) <= 0}
    pairs = sum(r.size for r in right.values())
    if not pairs:
        raise ValueError("no image-text pair was scored")
    metrics = {"accuracy": float(sum(r.sum() for r in right.values()) / pairs)}
    for group, r in right.items():
        metrics[f"accuracy_{group}"] = float(r.mean()) if r.size else 0.0
    metrics["pairs"] = float(pairs)
    return metrics


class ItmEvaluator(registry.Evaluator):
    KEYS = {"max_images": f"the first N images (0 = all; default {DEFAULT_MAX_IMAGES})",
            "seed": "seed of the hard and random negatives (default 0)"}

    @classmethod
    def check(cls, entry, where):
        registry.check_counts(entry, cls.KEYS, where)
        if entry.get("max_images", DEFAULT_MAX_IMAGES) == 1:
            raise ConfigError(f"{where}.max_images=1: random negatives are other images' "
                              "captions; give 0 (all) or at least 2")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        if not callable(getattr(context.model, "itm_scores", None)):
            raise ConfigError(f"evals.{name}: an itm evaluation needs a model with an ITM head "
                              f"(itm_scores, e.g. BLIP's); this task's model "
                              f"({type(context.model).__name__}) has none")
        self.max_images = int(entry.get("max_images", DEFAULT_MAX_IMAGES))
        self.seed = int(entry.get("seed", 0))

    def _score(self, params, images: np.ndarray, rows: list[int], texts: list[str]) -> np.ndarray:
        """ITM scores of (images[rows[k]], texts[k])."""
        if not rows:
            return np.zeros(0, np.float32)
        ids, mask = self.data.tokenize(texts)
        scores = np.asarray(self.context.model.itm_scores(params, images[np.asarray(rows)], ids,
                                                          mask), np.float32).reshape(-1)
        if scores.shape != (len(rows),):
            raise ValueError(f"evals.{self.name}: itm_scores returned {scores.shape[0]} scores "
                             f"for {len(rows)} pairs")
        return scores

    def _batches(self):
        """(first image index, real images [n,H,W,3], first caption of each or None)."""
        start = 0
        for batch, caption_lists in self.data.batches(self.batch_size, limit=self.max_images):
            images = batch["image"][batch["_mask"]]
            firsts = [next((c for c in captions if c), None) for captions in caption_lists]
            yield start, images, firsts
            start += len(firsts)

    def __call__(self, params) -> dict:
        captions: list[str | None] = []
        positive, hard = [], []
        for start, images, firsts in self._batches():
            captions += firsts
            negatives = hard_negative_captions(firsts, start, self.seed)
            rows = [k for k, c in enumerate(firsts) if c]
            hard_rows = [k for k, n in enumerate(negatives) if n]
            scores = self._score(params, images, rows + hard_rows,
                                 [firsts[k] for k in rows] + [negatives[k] for k in hard_rows])
            positive.append(scores[:len(rows)])
            hard.append(scores[len(rows):])
        partner = random_negative_images(captions, self.seed)
        random = []
        if (partner >= 0).any():
            seen = 0
            for start, images, firsts in self._batches():  # second pass: the same images
                rows = [k for k in range(len(firsts)) if partner[start + k] >= 0]
                random.append(self._score(params, images, rows,
                                          [captions[partner[start + k]] for k in rows]))
                seen = start + len(firsts)
            if seen != len(captions):
                raise RuntimeError(f"evals.{self.name}: the second pass over "
                                   f"{self.data.describe()} read {seen} images, the first "
                                   f"{len(captions)}")
        images_scored = sum(c is not None for c in captions)
        if images_scored < len(captions) and jax.process_index() == 0:
            print(f"warning: evals.{self.name}: {len(captions) - images_scored} image(s) of "
                  f"{self.data.describe()} have no caption; skipped", flush=True)
        metrics = itm_accuracies(np.concatenate(positive), np.concatenate(hard),
                                 np.concatenate(random or [np.zeros(0, np.float32)]))
        metrics["images"] = float(images_scored)
        metrics["no_hard_negative"] = float(images_scored - sum(len(h) for h in hard))
        return self.metric_names(metrics)
