"""The one table that maps Hugging Face CLIPModel / SiglipModel weights to vlmjax params.

Import and export both walk `weight_map(family, model_config)`; each entry says how a tensor's
layout changes between torch (`nn.Linear` weights are [out, in], convs are [out, in, kh, kw],
attention is one [D, D] matrix per q/k/v) and flax (`Dense` kernels are [in, out], convs
[kh, kw, in, out], attention kernels [D, heads, head_dim]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

FAMILIES = ("clip", "siglip")


@dataclass(frozen=True)
class Layout:
    to_vlmjax: Callable[[np.ndarray, int], np.ndarray]
    to_hf: Callable[[np.ndarray, int], np.ndarray]


# (array, heads) -> array; `heads` is used by the attention layouts only.
SAME = Layout(lambda t, h: t, lambda f, h: f)
DENSE = Layout(lambda t, h: t.T, lambda f, h: f.T)
CONV = Layout(lambda t, h: t.transpose(2, 3, 1, 0), lambda f, h: f.transpose(3, 2, 0, 1))
QKV_KERNEL = Layout(lambda t, h: t.T.reshape(t.shape[1], h, -1),
                    lambda f, h: f.reshape(f.shape[0], -1).T)
QKV_BIAS = Layout(lambda t, h: t.reshape(h, -1), lambda f, h: f.reshape(-1))
OUT_KERNEL = Layout(lambda t, h: t.T.reshape(h, -1, t.shape[0]),
                    lambda f, h: f.reshape(-1, f.shape[-1]).T)
BATCHED = Layout(lambda t, h: t[None], lambda f, h: f[0])          # position embeddings
CLASS_TOKEN = Layout(lambda t, h: t.reshape(1, 1, -1), lambda f, h: f.reshape(-1))
SCALAR = Layout(lambda t, h: t.reshape(()), lambda f, h: f.reshape(()))      # CLIP logit_scale
SCALAR1 = Layout(lambda t, h: t.reshape(()), lambda f, h: f.reshape(1))      # SigLIP: shape [1]


@dataclass(frozen=True)
class Entry:
    hf: str
    vlmjax: str
    layout: Layout
    heads: int = 0


def _norm(hf: str, ours: str) -> list[Entry]:
    return [Entry(f"{hf}.weight", f"{ours}/scale", SAME), Entry(f"{hf}.bias", f"{ours}/bias", SAME)]


def _linear(hf: str, ours: str, bias: bool = True) -> list[Entry]:
    return [Entry(f"{hf}.weight", f"{ours}/kernel", DENSE)] + (
        [Entry(f"{hf}.bias", f"{ours}/bias", SAME)] if bias else [])


def _attention(hf: str, ours: str, heads: int) -> list[Entry]:
    entries = []
    for hf_name, our_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        entries += [Entry(f"{hf}.{hf_name}.weight", f"{ours}/{our_name}/kernel", QKV_KERNEL, heads),
                    Entry(f"{hf}.{hf_name}.bias", f"{ours}/{our_name}/bias", QKV_BIAS, heads)]
    return entries + [Entry(f"{hf}.out_proj.weight", f"{ours}/out/kernel", OUT_KERNEL, heads),
                      Entry(f"{hf}.out_proj.bias", f"{ours}/out/bias", SAME)]


def _encoder(hf: str, ours: str, depth: int, heads: int) -> list[Entry]:
    entries = []
    for i in range(depth):
        h, o = f"{hf}.encoder.layers.{i}", f"{ours}/encoder/block{i}"
        entries += _norm(f"{h}.layer_norm1", f"{o}/norm1") + _norm(f"{h}.layer_norm2", f"{o}/norm2")
        entries += _attention(f"{h}.self_attn", f"{o}/attn", heads)
        entries += _linear(f"{h}.mlp.fc1", f"{o}/mlp/fc1") + _linear(f"{h}.mlp.fc2", f"{o}/mlp/fc2")
    return entries


def weight_map(family: str, model_config: Mapping[str, Any]) -> list[Entry]:
    """Every HF state-dict tensor of a `family` model and the vlmjax param it becomes.

    SigLIP's MAP head packs q/k/v into one `in_proj_weight`; the table names its three parts
    `head.attention.{q,k,v}_proj.*` (see `split_packed_attention` / `pack_attention`).
    """
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is not one of {FAMILIES}")
    image, text = model_config["image"], model_config["text"]
    v, t = "vision_model", "text_model"
    entries = [Entry(f"{v}.embeddings.patch_embedding.weight", "image_tower/patch_embed/kernel",
                     CONV),
               Entry(f"{v}.embeddings.position_embedding.weight",
                     "image_tower/posemb/pos_embedding", BATCHED)]
    entries += _encoder(v, "image_tower", image["depth"], image["num_heads"])
    entries += _norm(f"{v}.post_layernorm", "image_tower/final_norm")
    entries += [Entry(f"{t}.embeddings.token_embedding.weight", "text_tower/token_embed/embedding",
                      SAME),
                Entry(f"{t}.embeddings.position_embedding.weight", "text_tower/pos_embedding",
                      BATCHED)]
    entries += _encoder(t, "text_tower", text["depth"], text["num_heads"])
    entries += _norm(f"{t}.final_layer_norm", "text_tower/final_norm")
    if family == "clip":
        entries += [Entry(f"{v}.embeddings.class_embedding", "image_tower/cls", CLASS_TOKEN),
                    Entry("logit_scale", "log_temperature", SCALAR)]
        entries += _norm(f"{v}.pre_layrnorm", "image_tower/pre_norm")
        entries += _linear("visual_projection", "image_proj/dense", bias=False)
        entries += _linear("text_projection", "text_proj/dense", bias=False)
    else:
        entries += [Entry(f"{v}.embeddings.patch_embedding.bias", "image_tower/patch_embed/bias",
                          SAME),
                    Entry(f"{v}.head.probe", "image_tower/map_head/probe", SAME),
                    Entry("logit_scale", "log_temperature", SCALAR1),
                    Entry("logit_bias", "logit_bias", SCALAR1)]
        entries += _attention(f"{v}.head.attention", "image_tower/map_head/attn",
                              image["num_heads"])
        entries += _norm(f"{v}.head.layernorm", "image_tower/map_head/norm")
        entries += _linear(f"{v}.head.mlp.fc1", "image_tower/map_head/mlp/fc1")
        entries += _linear(f"{v}.head.mlp.fc2", "image_tower/map_head/mlp/fc2")
        entries += _linear(f"{t}.head", "text_proj/dense")
    return entries


PACKED = "vision_model.head.attention.in_proj_"  # torch.nn.MultiheadAttention's packed q/k/v


def split_packed_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """in_proj_weight [3D, D] / in_proj_bias [3D] -> q/k/v_proj.weight / .bias (rows q, k, v)."""
    state = dict(state)
    for suffix in ("weight", "bias"):
        packed = state.pop(PACKED + suffix, None)
        if packed is None:
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(packed, 3, axis=0)):
            state[f"vision_model.head.attention.{name}.{suffix}"] = part
    return state


def pack_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = dict(state)
    for suffix in ("weight", "bias"):
        names = [f"vision_model.head.attention.{n}.{suffix}"
                 for n in ("q_proj", "k_proj", "v_proj")]
        if all(n in state for n in names):
            state[PACKED + suffix] = np.concatenate([state.pop(n) for n in names], axis=0)
    return state
