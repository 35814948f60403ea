"""Running evaluators on a schedule, and computing embeddings over a mesh in padded batches."""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from vlmjax import sharding


class Schedule:
    """Runs every evaluator each `every` steps (0 = only at the end) and at the last step."""

    def __init__(self, evaluators: Sequence[Callable[[object], dict]], every: int = 0):
        self.evaluators, self.every = list(evaluators), int(every)

    def due(self, step: int, last: bool) -> bool:
        return bool(self.evaluators) and (last or (self.every > 0 and step % self.every == 0))

    def run(self, params, step: int) -> dict:
        results, start = {}, time.perf_counter()
        for evaluator in self.evaluators:
            results.update(evaluator(params))
        results["eval/seconds"] = time.perf_counter() - start
        return results


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterable[dict]:
    """Split host arrays into batches of exactly `batch_size`, the last one zero-padded; `_mask`
    marks the real rows."""
    total = len(next(iter(arrays.values())))
    for start in range(0, total, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        real = len(next(iter(chunk.values())))
        pad = batch_size - real
        if pad:
            chunk = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                     for k, v in chunk.items()}
        chunk["_mask"] = np.arange(batch_size) < real
        yield chunk


def embed_all(encode: Callable, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> np.ndarray:
    """Run a jitted `encode(batch) -> [B, D]` over all rows of `arrays` (sharded over the mesh's
    batch axes), returning the real rows' outputs on the host. Single-process evaluation: each
    process embeds everything (evals agree across processes)."""
    batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
    out = []
    for batch in padded_batches(arrays, batch_size):
        mask = batch.pop("_mask")
        device_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        out.append(np.asarray(jax.device_get(encode(device_batch)))[mask])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
