"""Image <-> text retrieval with several captions per image, optionally re-ranked by an ITM head.

Metrics `retrieval/{name}/i2t_r{k}` (an image finds any of its captions in the top k texts) and
`retrieval/{name}/t2i_r{k}` (a caption finds its image in the top k images), for k in 1, 5, 10;
fractions in [0, 1]. Entry keys beside the common ones (evals/registry.py):
  max_images          the first N images of the data (0 = all; default 1000)
  captions_per_image  the first K captions of each image (0 = all; COCO's 5k-image test set is
                      scored with 5 per image)
  rerank_k            0 (off, the default) or K: also re-rank with the model's ITM head, as BLIP
                      does (needs a model with `itm_scores`, e.g. BLIP's)
  rerank_itc          what re-ranking adds to the ITM score: "similarity" (the cosine, BLIP's
                      `score + topk_sim`; the default) or "logit" (the cosine over the model's
                      ITC temperature, `itc_logit_scale(params)`: both terms log-odds)

Re-ranking (BLIP, Li et al. 2022): each image's top K texts by ITC similarity are re-scored by
their ITM score + ITC similarity and ranked first, in that order; the other texts follow in
their ITC order (with rerank_itc "logit": ITM score + ITC similarity / temperature). Likewise
each text's top K images. Reported beside the ITC metrics (which keep
their names) as `retrieval/{name}/i2t_r{k}_rerank` and `t2i_r{k}_rerank`. Ties in the ITC order
go to the lower index. The ITM pass reads the data a second time, in the same order, and scores
each batch's images against their top-K texts and the texts whose top K holds them (images are
not kept in memory); ITM calls hold at most `batch_size` pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.evals import embed, registry


def _checked_map(text_to_image, num_images: int, num_texts: int) -> np.ndarray:
    text_to_image = np.asarray(text_to_image)
    if (text_to_image.shape != (num_texts,) or text_to_image.max(initial=0) >= num_images
            or text_to_image.min(initial=0) < 0):
        raise ValueError(f"text_to_image must map each of the {num_texts} texts to one of the "
                         f"{num_images} images")
    return text_to_image


def _text_order(scores: np.ndarray) -> np.ndarray:
    """Each image's texts, best ITC first (ties: lower index first). [N, M]"""
    return np.argsort(-scores, axis=1, kind="stable")


def _i2t_ranks(order: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    """Per image, the rank of its best-ranked caption in `order` [N, M] (M when it has none)."""
    matches = text_to_image[order] == np.arange(len(order))[:, None]
    return np.where(matches.any(1), np.argmax(matches, axis=1), order.shape[1])


def _t2i_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    """Per text, how many images score above its own (ties go to its own image)."""
    image_score = scores[text_to_image, np.arange(scores.shape[1])]
    return np.sum(scores > image_score[None, :], axis=0)


def _recalls(i2t_rank, t2i_rank, ks, suffix: str = "") -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"i2t_r{k}{suffix}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r{k}{suffix}"] = float(np.mean(t2i_rank < k))
    return out


def similarities(zimg: np.ndarray, ztxt: np.ndarray, chunk: int = 256) -> np.ndarray:
    """ITC scores [N, M] of L2-normalised zimg [N, D] and ztxt [M, D]; zimg [N, Q, D] (BLIP-2's
    query features) scores the max over its queries, `chunk` images at a time."""
    zimg, ztxt = np.asarray(zimg, np.float32), np.asarray(ztxt, np.float32)
    if zimg.ndim == 2:
        return zimg @ ztxt.T
    return np.concatenate([np.max(np.einsum("nqd,md->nmq", zimg[i:i + chunk], ztxt), axis=-1)
                           for i in range(0, len(zimg), chunk)] or [np.zeros((0, len(ztxt)))])


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """zimg [N, D], ztxt [M, D] (L2-normalised), text_to_image [M]: the image of each text."""
    return recall_of_scores(similarities(zimg, ztxt), text_to_image, ks)


def recall_of_scores(scores: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall_at_k` of ITC scores [N, M]."""
    text_to_image = _checked_map(text_to_image, *scores.shape)
    return _recalls(_i2t_ranks(_text_order(scores), text_to_image),
                    _t2i_ranks(scores, text_to_image), ks)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """By ITC `scores` [N, M]: each image's top-k texts [N, min(k, M)] and each text's top-k
    images [min(k, N), M], best first (ties: lower index first)."""
    return _text_order(scores)[:, :min(k, scores.shape[1])], _top_images(scores, k)


def _top_images(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=0, kind="stable")[:min(k, scores.shape[0])]


def rerank_pairs(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (image, text) pairs re-ranking needs ITM scores of: each image with its top-k texts
    and each text with its top-k images; unique, sorted by image, then text. int64 [P] each."""
    num_texts = scores.shape[1]
    texts, images = top_k(scores, k)
    keys = np.concatenate([
        (np.arange(len(texts))[:, None] * num_texts + texts).ravel(),
        (images * num_texts + np.arange(num_texts)[None, :]).ravel()]).astype(np.int64)
    keys = np.unique(keys)
    return keys // num_texts, keys % num_texts


def rerank_recall_at_k(scores: np.ndarray, text_to_image: np.ndarray, k: int,
                       pair_image: np.ndarray, pair_text: np.ndarray, pair_itm: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall after ITM re-ranking (module docstring), `{i2t,t2i}_r{k}_rerank` for k in `ks`.

    scores [N, M]: ITC similarities; text_to_image [M]: the image of each text; k: how many
    candidates to re-rank; (pair_image, pair_text, pair_itm) [P]: ITM scores of (image, text)
    pairs, at least those of `rerank_pairs(scores, k)` (others are ignored)."""
    scores = np.asarray(scores, np.float32)
    num_images, num_texts = scores.shape
    text_to_image = _checked_map(text_to_image, num_images, num_texts)
    if k < 1:
        raise ValueError(f"rerank_recall_at_k: k must be >= 1, got {k}")
    keys = np.asarray(pair_image, np.int64) * num_texts + np.asarray(pair_text, np.int64)
    sort = np.argsort(keys, kind="stable")
    keys, itm = keys[sort], np.asarray(pair_itm, np.float64).reshape(-1)[sort]

    def itm_of(image, text):
        wanted = image.astype(np.int64) * num_texts + text
        at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
        found = (keys[at] == wanted) if len(keys) else np.zeros(wanted.shape, bool)
        if not found.all():
            i, t = image[~found].flat[0], text[~found].flat[0]
            raise ValueError(f"rerank_recall_at_k: no ITM score for the pair (image {i}, text "
                             f"{t}) of the top {k}; {(~found).sum()} such pair(s) missing")
        return itm[at]

    order = _text_order(scores)
    texts, images = order[:, :min(k, num_texts)], _top_images(scores, k)
    # Image -> text: its candidates re-sorted by ITM + ITC (ties: ITC order), the rest after.
    rows = np.arange(num_images)[:, None]
    rescored = itm_of(np.broadcast_to(rows, texts.shape), texts) + scores[rows, texts]
    reordered = np.take_along_axis(texts, np.argsort(-rescored, axis=1, kind="stable"), axis=1)
    matches = text_to_image[reordered] == rows
    i2t_rank = np.where(matches.any(1), np.argmax(matches, axis=1),
                        _i2t_ranks(order, text_to_image))  # no caption in the top k: unchanged
    # Text -> image: rank among the candidates when its image is one, else after all of them.
    cols = np.arange(num_texts)[None, :]
    rescored = itm_of(images, np.broadcast_to(cols, images.shape)) + scores[images, cols]
    is_own = images == text_to_image[None, :]
    own_rescored = np.where(is_own, rescored, -np.inf).max(axis=0)
    own_itc = scores[text_to_image, np.arange(num_texts)]
    above_among_others = (_t2i_ranks(scores, text_to_image)
                          - np.sum(scores[images, cols] > own_itc[None, :], axis=0))
    t2i_rank = np.where(is_own.any(0), np.sum(rescored > own_rescored[None, :], axis=0),
                        len(images) + above_among_others)
    return _recalls(i2t_rank, t2i_rank, ks, suffix="_rerank")


class RetrievalEvaluator(registry.Evaluator):
    KEYS = {"max_images": "the first N images (0 = all; default 1000)",
            "captions_per_image": "the first K captions of each image (0 = all, the default)",
            "rerank_k": "re-rank each query's top K by ITM + ITC (0 = off, the default; needs "
                        "a model with itm_scores, e.g. BLIP)",
            "rerank_itc": "the ITC term of re-ranking: 'similarity' (BLIP's, the default) or "
                          "'logit' (similarity / the ITC temperature)"}
    COUNTS = ("max_images", "captions_per_image", "rerank_k")
    RERANK_ITC = ("similarity", "logit")

    @classmethod
    def check(cls, entry, where):
        registry.check_counts(entry, cls.COUNTS, where)
        if entry.get("rerank_itc", "similarity") not in cls.RERANK_ITC:
            raise ConfigError(f"{where}.rerank_itc={entry.get('rerank_itc')!r} is not one of "
                              f"{cls.RERANK_ITC}")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.max_images = int(entry.get("max_images", 1000))
        self.captions_per_image = int(entry.get("captions_per_image", 0))
        self.rerank_k = int(entry.get("rerank_k", 0))
        self.rerank_itc = entry.get("rerank_itc", "similarity")
        if self.rerank_k and not callable(getattr(context.model, "itm_scores", None)):
            raise ConfigError(f"evals.{name}.rerank_k={self.rerank_k}: re-ranking needs a model "
                              f"with an ITM head (itm_scores, e.g. BLIP's); this task's model "
                              f"({type(context.model).__name__}) has none; set it to 0")
        if (self.rerank_k and self.rerank_itc == "logit"
                and not callable(getattr(context.model, "itc_logit_scale", None))):
            raise ConfigError(f"evals.{name}.rerank_itc='logit' needs a model with an ITC "
                              f"temperature (itc_logit_scale, e.g. BLIP's); "
                              f"{type(context.model).__name__} has none; use 'similarity'")

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
        text_to_image = np.asarray(text_to_image, np.int32)
        scores = similarities(zimg, ztxt)
        metrics = recall_of_scores(scores, text_to_image)
        if self.rerank_k:
            pair_image, pair_text = rerank_pairs(scores, self.rerank_k)
            pair_itm = self.itm_pass(params, pair_image, pair_text, ids, mask, len(zimg),
                                     batch_size)
            itc = scores
            if self.rerank_itc == "logit":  # a positive scale: the ITC order is unchanged
                itc = scores * float(self.context.model.itc_logit_scale(params))
            metrics.update(rerank_recall_at_k(itc, text_to_image, self.rerank_k, pair_image,
                                              pair_text, pair_itm))
        return self.metric_names(metrics)

    def itm_pass(self, params, pair_image, pair_text, ids, mask, num_images: int,
                 batch_size: int) -> np.ndarray:
        """ITM scores of the pairs (sorted by image), from a second pass over the data: each
        batch's images with their pairs' texts, at most `batch_size` pairs a call."""
        out = np.zeros(len(pair_image), np.float32)
        start = 0
        for batch, captions in self.data.batches(batch_size, limit=self.max_images):
            images = batch["image"][batch["_mask"]]
            stop = start + len(captions)
            first, last = np.searchsorted(pair_image, [start, stop])
            for chunk in range(first, last, batch_size):
                at = slice(chunk, min(chunk + batch_size, last))
                rows, text = pair_image[at] - start, pair_text[at]
                scores = np.asarray(self.context.model.itm_scores(
                    params, images[rows], ids[text], mask[text]), np.float32).reshape(-1)
                if scores.shape != rows.shape:
                    raise ValueError(f"evals.{self.name}: itm_scores returned {scores.size} "
                                     f"scores for {rows.size} pairs")
                out[at] = scores
            start = stop
        if start != num_images:
            raise RuntimeError(f"evals.{self.name}: the ITM pass over {self.data.describe()} "
                               f"read {start} images, the embedding pass {num_images}")
        return out
