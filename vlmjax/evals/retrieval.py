"""Image <-> text retrieval with several captions per image.

Metric names: `retrieval/{split}/i2t_r{k}` (an image finds any of its captions in the top k
texts) and `retrieval/{split}/t2i_r{k}` (a caption finds its image in the top k images),
for k in 1, 5, 10; fractions in [0, 1].
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10), split: str = "test") -> dict[str, float]:
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
        out[f"retrieval/{split}/i2t_r{k}"] = float(np.mean(best_text_rank < k))
        out[f"retrieval/{split}/t2i_r{k}"] = float(np.mean(image_rank < k))
    return out
