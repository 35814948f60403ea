"""Conversion between the unrolled and the scanned parameter layouts of stacked layers.

Two layouts are known:
- `layers.Encoder` / `decoder.DecoderLayers`: unrolled `block0..block{n-1}` are the only keys
  of their subtree (`encoder/block{i}`, `layers/block{i}`); scanned (`scan_layers=True`) they
  are one `blocks` subtree.
- `blip.BlipText` (BLIP's and ALIGN's BERT): unrolled `layer_0..layer_{n-1}` sit beside other
  keys (token_embed, pos_embedding, embed_norm, ...); scanned they are one `layer_scan` beside
  the same keys.
Unrolled is what the converters read and write; scanned, every leaf has a leading [n] axis.
`to_scanned`, `to_unrolled` and `is_scanned` walk the whole tree, so they apply to a TwoTowers
model's params as to a single tower's, and leave everything else as it is.

BLIP-2's Q-Former names its (unscanned) layers `layer_{i}` too, so `to_scanned` of a whole
BLIP-2 tree would stack them: convert into a model's layout with `match_layout`, which converts
only the subtrees that are scanned in the model.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"block(\d+)$")
SCANNED = "blocks"
_LAYER = re.compile(r"layer_(\d+)$")
LAYER_SCANNED = "layer_scan"  # not `layers`: decoder.py's DecoderLayers holds `layers/blocks`


def _numbered(names, pattern) -> list[str]:
    """The names matching `pattern` if they number 0..n-1 (in order), else []."""
    found = {int(m.group(1)): name for name in names if (m := pattern.match(str(name)))}
    return [found[i] for i in range(len(found))] if sorted(found) == list(range(len(found))) \
        else []


def _stack(subtrees: list, what: str):
    if len({str(jax.tree.structure(t)) for t in subtrees}) > 1:
        raise ValueError(f"{what} differ in structure and cannot be stacked")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *subtrees)


def _unstack(stacked, what: str) -> list:
    depths = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(depths) != 1:
        raise ValueError(f"scanned {what} leaves disagree on the layer count: {depths}")
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depths.pop())]


def _scan_here(node: dict) -> dict:
    """`node` with its own unrolled layers (not its descendants') scanned."""
    blocks = _numbered(node, _BLOCK)
    if node and len(blocks) == len(node):  # an Encoder's subtree: blocks only
        return {SCANNED: _stack([node[b] for b in blocks], "encoder blocks")}
    layers = _numbered(node, _LAYER)
    if layers and LAYER_SCANNED not in node:
        rest = {k: v for k, v in node.items() if k not in layers}
        return {**rest, LAYER_SCANNED: _stack([node[n] for n in layers], "BERT layers")}
    return node


def _unroll_here(node: dict) -> dict:
    """`node` with its own scanned layers (not its descendants') unrolled."""
    if set(node) == {SCANNED} and isinstance(node[SCANNED], Mapping):
        return {f"block{i}": b for i, b in enumerate(_unstack(node[SCANNED], "encoder"))}
    if isinstance(node.get(LAYER_SCANNED), Mapping):
        rest = {k: v for k, v in node.items() if k != LAYER_SCANNED}
        return {**rest, **{f"layer_{i}": layer for i, layer in
                           enumerate(_unstack(node[LAYER_SCANNED], "BERT layer"))}}
    return node


def _holds_scanned(node: Mapping) -> bool:
    return SCANNED in node or LAYER_SCANNED in node


def to_scanned(params: Mapping[str, Any]) -> dict:
    """`block0..block{n-1}` subtrees -> one `blocks` subtree, and `layer_0..layer_{n-1}` ->
    one `layer_scan` beside their siblings, with stacked [n, ...] leaves. Every such group in
    the tree is stacked (a Q-Former's too): to scan only what a model scans, use
    `match_layout`."""
    if not isinstance(params, Mapping):
        return params
    node = _scan_here(dict(params))
    return {k: v if k in (SCANNED, LAYER_SCANNED) else to_scanned(v) for k, v in node.items()}


def to_unrolled(params: Mapping[str, Any]) -> dict:
    """One `blocks` subtree -> `block0..block{n-1}`, one `layer_scan` -> `layer_0..`."""
    if not isinstance(params, Mapping):
        return params
    return {k: to_unrolled(v) for k, v in _unroll_here(dict(params)).items()}


def is_scanned(params: Mapping[str, Any]) -> bool:
    """Whether any encoder or BERT in `params` is in the scanned layout."""
    if not isinstance(params, Mapping):
        return False
    return _holds_scanned(params) or any(is_scanned(v) for v in params.values())


def match_layout(params: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
    """`params` in the layout of `like` (e.g. converter output for a scan_layers model),
    subtree by subtree: a group is scanned only where `like` has it scanned, so a BLIP-2
    model's scanned ViT does not stack its Q-Former's `layer_{i}`. Subtrees `like` lacks are
    left as they are (shape checks name them)."""
    if not isinstance(params, Mapping) or not isinstance(like, Mapping):
        return params
    node = dict(params)
    if _holds_scanned(like) and not _holds_scanned(node):
        node = _scan_here(node)
    elif _holds_scanned(node) and not _holds_scanned(like):
        node = _unroll_here(node)
    return {k: match_layout(v, like[k]) if k in like else v for k, v in node.items()}
