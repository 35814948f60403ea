"""Zero-shot classification: a class is the average text embedding of its prompts.

Metrics `zero_shot/{name}/top1`, `zero_shot/{name}/top5` (fractions in [0, 1]; top-k only for
k <= the number of classes) for the entry `name` of config.evals. Entry keys beside the common
ones (evals/registry.py):
  templates     prompt set: 'clip' (6 short CLIP-style prompts), 'imagenet' (the CLIP paper's 80
                ImageNet prompts), 'name' (the class name alone), 'vlm_shapes'
  class_names   'dataset' (the names of the data's TFDS label feature) or 'imagenet' (CLIP's
                1000 ImageNet class names, for imagenet2012 / imagenet_v2, whose TFDS names are
                WordNet ids)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.evals import embed, imagenet_classes, registry

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
TEMPLATES = {"clip": CLIP_TEMPLATES, "imagenet": imagenet_classes.TEMPLATES, "name": NAME_ONLY,
             "vlm_shapes": VLM_SHAPES_TEMPLATES}
CLASS_NAMES = ("dataset", "imagenet")


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


def accuracies(encode_texts, zimg: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               templates: Sequence[str] = CLIP_TEMPLATES,
               ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...} of images `zimg` [N, D] with `labels` [N] against the classes'
    prompt embeddings; top-k only where k <= the number of classes."""
    zclass = class_embeddings(encode_texts, class_names, templates)
    ks = [k for k in ks if k <= len(class_names)]
    return topk_accuracy(zimg, labels, zclass, ks)


class ZeroShotEvaluator(registry.Evaluator):
    KEYS = {"templates": f"prompt templates, one of {sorted(TEMPLATES)} (default 'clip')",
            "class_names": f"one of {list(CLASS_NAMES)} (default 'dataset')"}

    @classmethod
    def check(cls, entry, where):
        if entry.get("templates", "clip") not in TEMPLATES:
            raise ConfigError(f"{where}.templates {entry.get('templates')!r} is not one of "
                              f"{sorted(TEMPLATES)}")
        if entry.get("class_names", "dataset") not in CLASS_NAMES:
            raise ConfigError(f"{where}.class_names {entry.get('class_names')!r} is not one of "
                              f"{list(CLASS_NAMES)}")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.templates = TEMPLATES[entry.get("templates", "clip")]
        self.class_names_from = entry.get("class_names", "dataset")

    def class_names(self) -> list[str]:
        if self.class_names_from == "imagenet":
            return list(imagenet_classes.CLASS_NAMES)
        names = self.data.class_names()
        if not names:
            raise ValueError(f"evals.{self.name}: zero-shot evaluation needs class names; "
                             f"{self.data.describe()} has none (use a TFDS label feature with "
                             "names, or class_names='imagenet')")
        return names

    def __call__(self, params) -> dict:
        model, mesh = self.context.model, self.context.mesh
        batch_size = embed.device_multiple(self.batch_size, mesh)
        labels = []

        def image_batches():
            for batch, _ in self.data.batches(batch_size):
                labels.append(batch["label"][batch["_mask"]])
                yield batch

        zimg = model.images(params, image_batches())
        labels = np.concatenate(labels)
        names = self.class_names()
        keep = labels >= 0  # unlabelled examples (label -1) have no class to find
        if np.any(labels[keep] >= len(names)):
            raise ValueError(f"evals.{self.name}: label {int(labels.max())} of "
                             f"{self.data.describe()} has no name among {len(names)} classes")

        def encode_texts(texts):
            ids, mask = self.data.tokenize(texts)
            return model.texts(params, ids, mask, batch_size)

        return self.metric_names(accuracies(encode_texts, zimg[keep], labels[keep], names,
                                            self.templates))
