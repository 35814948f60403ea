"""Resizing learned 2-D position embeddings to a new patch grid (new image resolution).

Bilinear with corners aligned (the first and last patch positions keep their embeddings, as in
big_vision's `resample_posemb`, which uses `scipy.ndimage.zoom(order=1)`): growing an (h, w)
grid to ((h-1)k+1, (w-1)k+1) keeps every original embedding at its own position and fills in
between linearly. A class token (CLIP) is kept as it is.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _linear_weights(old: int, new: int) -> np.ndarray:
    """[new, old] matrix: row i interpolates the old positions at new position i."""
    if new == 1 or old == 1:
        coords = np.full(new, (old - 1) / 2.0)
    else:
        coords = np.arange(new) * (old - 1) / (new - 1)
    low = np.clip(np.floor(coords).astype(int), 0, old - 1)
    high = np.minimum(low + 1, old - 1)
    frac = coords - low
    weights = np.zeros((new, old))
    weights[np.arange(new), low] += 1.0 - frac
    weights[np.arange(new), high] += frac
    return weights


def resize_grid(grid_hwd: np.ndarray, new_hw: Sequence[int]) -> np.ndarray:
    """[h, w, D] -> [new_h, new_w, D], bilinear with aligned corners, computed in float64."""
    rows = _linear_weights(grid_hwd.shape[0], int(new_hw[0]))
    cols = _linear_weights(grid_hwd.shape[1], int(new_hw[1]))
    return np.einsum("Hh,hwd,Ww->HWd", rows, grid_hwd.astype(np.float64), cols)


def square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} position embeddings are not a square grid; pass the "
                         "grid (h, w) they were trained on")
    return side, side


def resize_posemb(posemb: np.ndarray, new_grid: Sequence[int],
                  old_grid: Sequence[int] | None = None, num_prefix: int = 0) -> np.ndarray:
    """posemb [1, num_prefix + h*w, D] -> [1, num_prefix + new_h*new_w, D].

    `num_prefix` leading tokens (1 for CLIP's class token) are copied unchanged. `old_grid`
    (h, w) defaults to the square grid the patch count implies.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embedding shape {posemb.shape} is not [1, tokens, width]")
    new_grid = tuple(int(n) for n in new_grid)
    if len(new_grid) != 2 or min(new_grid) < 1:
        raise ValueError(f"new grid {new_grid} is not a pair of positive sizes (h, w)")
    prefix, patches = posemb[:, :num_prefix], posemb[0, num_prefix:]
    old_grid = square_grid(len(patches)) if old_grid is None else tuple(int(n) for n in old_grid)
    if old_grid[0] * old_grid[1] != len(patches):
        raise ValueError(f"grid {old_grid} has {old_grid[0] * old_grid[1]} positions but the "
                         f"embedding has {len(patches)} (after {num_prefix} prefix tokens)")
    if old_grid == new_grid:
        return posemb
    grid = resize_grid(patches.reshape(*old_grid, -1), new_grid)
    resized = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, resized], axis=1)


def resize_image_posemb(flat_params: dict, model_config: dict, old_size: Sequence[int],
                        new_size: Sequence[int]) -> dict:
    """Flat params whose image position embedding fits images of `new_size` (H, W) instead of
    `old_size`. Sizes must be multiples of the patch size."""
    image = model_config.get("image")
    key = "image_tower/posemb/pos_embedding"
    if image is None or key not in flat_params:
        raise ValueError("this model has no learned image position embedding to resize")
    patch = image["patch_size"]
    for size in (old_size, new_size):
        if len(size) != 2 or size[0] % patch or size[1] % patch:
            raise ValueError(f"image size {tuple(size)} is not (H, W) in multiples of the patch "
                             f"size {patch}")
    has_class_token = image.get("class_token")
    if has_class_token is None:
        has_class_token = image.get("pool", "map") == "cls"
    out = dict(flat_params)
    out[key] = resize_posemb(flat_params[key], (new_size[0] // patch, new_size[1] // patch),
                             (old_size[0] // patch, old_size[1] // patch),
                             num_prefix=int(has_class_token))
    return out
