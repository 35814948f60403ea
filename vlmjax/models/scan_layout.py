"""Conversion between the unrolled and the scanned parameter layouts of `layers.Encoder`.

Unrolled: `encoder/block0/...`, ..., `encoder/block{n-1}/...` (what the converters read and
write). Scanned (`scan_layers=True`): `encoder/blocks/...`, every leaf with a leading [n] axis.
Both functions walk the whole tree, so they apply to a TwoTowers model's params as to a single
tower's, and leave everything that is not an encoder as it is.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"block(\d+)$")
SCANNED = "blocks"


def _is_unrolled_encoder(tree: Mapping) -> bool:
    names = list(tree)
    if not names or not all(_BLOCK.match(str(k)) for k in names):
        return False
    return sorted(int(_BLOCK.match(k).group(1)) for k in names) == list(range(len(names)))


def to_scanned(params: Mapping[str, Any]) -> dict:
    """`block0..block{n-1}` subtrees -> one `blocks` subtree with stacked [n, ...] leaves."""
    if not isinstance(params, Mapping):
        return params
    if _is_unrolled_encoder(params):
        blocks = [params[f"block{i}"] for i in range(len(params))]
        structures = {str(jax.tree.structure(b)) for b in blocks}
        if len(structures) > 1:
            raise ValueError("encoder blocks differ in structure and cannot be stacked")
        return {SCANNED: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return {k: to_scanned(v) for k, v in params.items()}


def to_unrolled(params: Mapping[str, Any]) -> dict:
    """One `blocks` subtree with [n, ...] leaves -> `block0..block{n-1}` subtrees."""
    if not isinstance(params, Mapping):
        return params
    if set(params) == {SCANNED} and isinstance(params[SCANNED], Mapping):
        stacked = params[SCANNED]
        depths = {x.shape[0] for x in jax.tree.leaves(stacked)}
        if len(depths) != 1:
            raise ValueError(f"scanned encoder leaves disagree on the layer count: {depths}")
        depth = depths.pop()
        return {f"block{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
    return {k: to_unrolled(v) for k, v in params.items()}


def is_scanned(params: Mapping[str, Any]) -> bool:
    """Whether any encoder in `params` is in the scanned layout."""
    if not isinstance(params, Mapping):
        return False
    return SCANNED in params or any(is_scanned(v) for v in params.values())


def match_layout(params: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
    """`params` in the layout of `like` (e.g. converter output for a scan_layers model)."""
    if is_scanned(like) and not is_scanned(params):
        return to_scanned(params)
    if is_scanned(params) and not is_scanned(like):
        return to_unrolled(params)
    return dict(params)
