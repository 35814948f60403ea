"""Embeddings over a mesh in padded batches: what every evaluator of a two-tower model needs."""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from vlmjax import sharding


def device_multiple(batch_size: int, mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's device count."""
    return -(-int(batch_size) // mesh.size) * mesh.size


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterable[dict]:
    """Split host arrays into batches of exactly `batch_size`, the last one zero-padded; `_mask`
    marks the real rows."""
    total = len(next(iter(arrays.values())))
    for start in range(0, total, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        yield pad_batch(chunk, batch_size)


def pad_batch(chunk: dict[str, np.ndarray], batch_size: int) -> dict:
    """Zero-pad every array of `chunk` to `batch_size` rows and add `_mask` (True = real row)."""
    real = len(next(iter(chunk.values())))
    pad = batch_size - real
    if pad:
        chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                 for k, v in chunk.items()}
    return {**chunk, "_mask": np.arange(batch_size) < real}


def embed_batches(encode: Callable, batches: Iterable[dict], mesh) -> np.ndarray:
    """Run a jitted `encode(batch) -> [B, D]` on padded host batches (sharded over the mesh's
    batch axes; each has `_mask`), returning the real rows' outputs on the host. Single-process
    evaluation: each process embeds everything (evals agree across processes)."""
    out = []
    for batch in batches:
        batch = dict(batch)
        mask = batch.pop("_mask")
        device_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        out.append(np.asarray(jax.device_get(encode(device_batch)))[mask])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_all(encode: Callable, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> np.ndarray:
    """`embed_batches` over all rows of host `arrays`, in batches of `batch_size` (rounded up to a
    multiple of the device count)."""
    return embed_batches(encode, padded_batches(arrays, device_multiple(batch_size, mesh)), mesh)


class TwoTowerEncoders:
    """What zero-shot and retrieval evaluators need of a two-tower model: jitted encoders of a
    batch, `encode_image(params, {'image'})` and `encode_text(params, {'text', 'text_mask'})`,
    each -> L2-normalised [B, D], replicated over `mesh`."""

    def __init__(self, encode_image: Callable, encode_text: Callable, mesh):
        self.encode_image, self.encode_text, self.mesh = encode_image, encode_text, mesh

    def images(self, params, batches: Iterable[dict]) -> np.ndarray:
        """[N, D] of the real rows of padded batches {'image', '_mask', ...}."""
        return embed_batches(lambda b: self.encode_image(params, {"image": b["image"]}),
                             ({"image": b["image"], "_mask": b["_mask"]} for b in batches),
                             self.mesh)

    def texts(self, params, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
        return embed_all(lambda b: self.encode_text(params, b), {"text": ids, "text_mask": mask},
                         batch_size, self.mesh)
