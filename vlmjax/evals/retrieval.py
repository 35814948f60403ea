"""Image <-> text retrieval with several captions per image.

Metrics `retrieval/{name}/i2t_r{k}` (an image finds any of its captions in the top k texts) and
`retrieval/{name}/t2i_r{k}` (a caption finds its image in the top k images), for k in 1, 5, 10;
fractions in [0, 1]. Entry keys beside the common ones (evals/registry.py):
  max_images          the first N images of the data (0 = all; default 1000)
  captions_per_image  the first K captions of each image (0 = all; COCO's 5k-image test set is
                      scored with 5 per image)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.evals import embed, registry


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """zimg [N, D], ztxt [M, D] (L2-normalised), text_to_image [M]: the image of each text."""
    text_to_image = np.asarray(text_to_image)
    if text_to_image.shape != (len(ztxt),) or text_to_image.max(initial=0) >= len(zimg):
        raise ValueError(f"text_to_image must map each of the {len(ztxt)} texts to one of the "
                         f"{len(zimg)} images")
    scores = np.asarray(zimg, np.float32) @ np.asarray(ztxt, np.float32).T  # [N, M]
    out = {}
    # Rank of the best-ranked matching caption for each image.
    order = np.argsort(-scores, axis=1)
    matches = text_to_image[order] == np.arange(len(zimg))[:, None]
    best_text_rank = np.where(matches.any(1), np.argmax(matches, axis=1), len(ztxt))
    # Rank of the matching image for each text.
    image_score = scores[text_to_image, np.arange(len(ztxt))]
    image_rank = np.sum(scores.T > image_score[:, None], axis=1)
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(best_text_rank < k))
        out[f"t2i_r{k}"] = float(np.mean(image_rank < k))
    return out


class RetrievalEvaluator(registry.Evaluator):
    KEYS = {"max_images": "the first N images (0 = all; default 1000)",
            "captions_per_image": "the first K captions of each image (0 = all, the default)"}

    @classmethod
    def check(cls, entry, where):
        for key in cls.KEYS:
            value = entry.get(key, 0)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{where}.{key} must be an integer >= 0, got {value!r}")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.max_images = int(entry.get("max_images", 1000))
        self.captions_per_image = int(entry.get("captions_per_image", 0))

    def __call__(self, params) -> dict:
        model, mesh = self.context.model, self.context.mesh
        batch_size = embed.device_multiple(self.batch_size, mesh)
        texts, text_to_image = [], []

        def image_batches():
            image_index = 0
            for batch, captions in self.data.batches(batch_size, limit=self.max_images):
                for caption_list in captions:
                    caption_list = [c for c in caption_list if c]  # empty = no caption
                    if self.captions_per_image:
                        caption_list = caption_list[:self.captions_per_image]
                    texts.extend(caption_list)
                    text_to_image.extend([image_index] * len(caption_list))
                    image_index += 1
                yield batch

        zimg = model.images(params, image_batches())
        if not texts:
            raise ValueError(f"evals.{self.name}: {self.data.describe()} has no captions to "
                             "retrieve (set data.text_key)")
        ids, mask = self.data.tokenize(texts)
        ztxt = model.texts(params, ids, mask, batch_size)
        return self.metric_names(recall_at_k(zimg, ztxt, np.asarray(text_to_image, np.int32)))
