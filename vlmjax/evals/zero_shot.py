"""Zero-shot classification: a class is the average text embedding of its prompts.

Metric names: `zero_shot/{split}/top1`, `zero_shot/{split}/top5` (fractions in [0, 1]).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# CLIP-style prompt ensemble (a short subset of the ImageNet prompts of the CLIP paper).
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of the {}.",
    "a {}.",
)
NAME_ONLY = ("{}",)
# Phrasings of vlm_shapes captions, for its colour x shape class names ("red circle").
VLM_SHAPES_TEMPLATES = (
    "a {}.",
    "there is a {}.",
    "a photo of a {}.",
    "a small {}.",
    "a large {}.",
)


def class_embeddings(encode_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """[C, D]: per class, the mean of its prompts' L2-normalised embeddings, re-normalised."""
    if not class_names:
        raise ValueError("zero-shot evaluation needs at least one class name")
    prompts = [t.format(name) for name in class_names for t in templates]
    z = np.asarray(encode_texts(prompts), np.float32).reshape(len(class_names), len(templates), -1)
    z = z.mean(axis=1)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def topk_accuracy(zimg: np.ndarray, labels: np.ndarray, zclass: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of images whose label is among the k classes most similar to them."""
    scores = zimg @ zclass.T
    ranked = np.argsort(-scores, axis=1)
    return {f"top{k}": float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1)))
            for k in ks}


def evaluate(encode_texts, zimg: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
             templates: Sequence[str] = CLIP_TEMPLATES, split: str = "test",
             ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    zclass = class_embeddings(encode_texts, class_names, templates)
    ks = [k for k in ks if k <= len(class_names)]
    return {f"zero_shot/{split}/{name}": value
            for name, value in topk_accuracy(zimg, labels, zclass, ks).items()}
