"""Import big_vision two-tower checkpoints (SigLIP's released `.npz` format).

The `.npz` holds flattened flax params, `params/img/...`, `params/txt/...`, `params/t` (t') and
`params/b`; big_vision is flax too, so kernels keep their layouts and only names change. The
model config is read off the shapes. Layers saved with `scan=True` (one `encoderblock` with a
leading depth axis) are unstacked.

big_vision SigLIP: ViT with learned posemb and a MAP head (no image head when out_dim is None),
text transformer without mask pooled at the last position + `head` Dense, LayerNorm eps 1e-6,
tanh-approximated GELU (flax's `nn.gelu` default).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

PREFIX_RENAMES = (  # big_vision name prefix -> vlmjax
    (r"img/embedding/", "image_tower/patch_embed/"),
    (r"img/pos_embedding$", "image_tower/posemb/pos_embedding"),
    (r"img/cls$", "image_tower/cls"),
    (r"img/Transformer/encoderblock_(\d+)/", r"image_tower/encoder/block\1/"),
    (r"img/Transformer/encoder_norm/", "image_tower/final_norm/"),
    (r"img/MAPHead_0/", "image_tower/map_head/"),
    (r"img/head/", "image_proj/dense/"),
    (r"txt/Embed_0/embedding$", "text_tower/token_embed/embedding"),
    (r"txt/pos_embedding$", "text_tower/pos_embedding"),
    (r"txt/Encoder_0/encoderblock_(\d+)/", r"text_tower/encoder/block\1/"),
    (r"txt/Encoder_0/encoder_norm/", "text_tower/final_norm/"),
    (r"txt/head/", "text_proj/dense/"),
    (r"t$", "log_temperature"),
    (r"b$", "logit_bias"),
)
BLOCK_RENAMES = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2",
                 "MultiHeadDotProductAttention_0": "attn", "MlpBlock_0/Dense_0": "mlp/fc1",
                 "MlpBlock_0/Dense_1": "mlp/fc2"}
MAP_HEAD_RENAMES = dict(BLOCK_RENAMES, LayerNorm_0="norm")
SCANNED_ENCODERS = ("img/Transformer/encoderblock/", "txt/Encoder_0/encoderblock/")


def _unscan(flat: dict) -> dict:
    """`.../encoderblock/<param>` [depth, ...] -> `.../encoderblock_<i>/<param>`."""
    out = {}
    for name, value in flat.items():
        scanned = next((s for s in SCANNED_ENCODERS if name.startswith(s)), None)
        if scanned is None:
            out[name] = value
            continue
        rest = name[len(scanned):]
        for i, layer in enumerate(value):
            out[f"{scanned[:-1]}_{i}/{rest}"] = layer
    return out


def rename(name: str) -> str | None:
    """big_vision param name (without `params/`) -> vlmjax path, None if not a known param."""
    for pattern, replacement in PREFIX_RENAMES:
        match = re.match(pattern, name)
        if match is None:
            continue
        new = match.expand(replacement) + name[match.end():]
        inner = MAP_HEAD_RENAMES if "/map_head/" in new else (
            BLOCK_RENAMES if "/encoder/block" in new else {})
        for old, ours in inner.items():
            new = new.replace(f"/{old}/", f"/{ours}/")
        # vlmjax names are lower case: a flax auto-name left over (`Foo_0`) is not ours
        return None if any(c.isupper() for c in new) else new
    return None


def _count_blocks(flat: dict, tower: str) -> int:
    return len({int(m.group(1)) for k in flat
                if (m := re.match(rf"{tower}/encoder/block(\d+)/", k))})


def model_config_from_params(flat: dict, where: str) -> tuple[dict, list[int]]:
    """The model config implied by the converted params' shapes, and the image size [H, W]."""
    def need(key):
        if key not in flat:
            raise ValueError(f"{where}: no parameter for {key}; is this a big_vision two-tower "
                             "(SigLIP) checkpoint?")
        return flat[key]

    kernel = need("image_tower/patch_embed/kernel")  # [p, p, 3, D]
    if kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise ValueError(f"{where}: patch embedding kernel {kernel.shape} is not [p, p, 3, width]")
    class_token = "image_tower/cls" in flat
    pool = ("map" if "image_tower/map_head/probe" in flat else "cls" if class_token else "gap")
    posemb = need("image_tower/posemb/pos_embedding")
    grid = math.isqrt(posemb.shape[1] - int(class_token))
    if grid * grid != posemb.shape[1] - int(class_token):
        raise ValueError(f"{where}: image pos_embedding {posemb.shape} is not a square grid")

    def tower(prefix):
        return dict(depth=_count_blocks(flat, prefix),
                    num_heads=need(f"{prefix}/encoder/block0/attn/query/kernel").shape[1],
                    mlp_dim=need(f"{prefix}/encoder/block0/mlp/fc1/kernel").shape[1],
                    activation="gelu_tanh", norm_eps=1e-6)

    image = dict(patch_size=kernel.shape[0], width=kernel.shape[3], posemb="learn", pool=pool,
                 patch_bias="image_tower/patch_embed/bias" in flat, **tower("image_tower"))
    if class_token and pool != "cls":
        image["class_token"] = True
    embedding = need("text_tower/token_embed/embedding")
    text = dict(vocab_size=embedding.shape[0], width=embedding.shape[1],
                max_len=need("text_tower/pos_embedding").shape[1], causal=False, pool="last",
                **tower("text_tower"))
    text_proj = "text_proj/dense/kernel" in flat
    image_proj = "image_proj/dense/kernel" in flat
    embed_dim = (flat["text_proj/dense/kernel"].shape[1] if text_proj
                 else flat["image_proj/dense/kernel"].shape[1] if image_proj else image["width"])
    bias = flat.get("logit_bias")
    model = dict(image=image, text=text, embed_dim=int(embed_dim),
                 image_projection=image_proj, image_projection_bias="image_proj/dense/bias" in flat,
                 text_projection=text_proj, text_projection_bias="text_proj/dense/bias" in flat,
                 temperature_init=float(np.exp(need("log_temperature"))),
                 bias_init=None if bias is None else float(bias))
    return model, [grid * image["patch_size"]] * 2


def load_big_vision(path: str) -> tuple[dict, dict, dict]:
    """big_vision `.npz` -> (flat numpy params, model config, info), like `hf.load_hf`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"big_vision checkpoint {path} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        raw = {k: np.asarray(npz[k]) for k in npz.files}
    raw = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in raw.items()}
    flat, unknown = {}, []
    for name, value in _unscan(raw).items():
        new = rename(name)
        if new is None:
            unknown.append(name)
        else:
            flat[new] = value.astype(np.float32)
    if unknown:
        raise ValueError(f"{path}: parameters with no vlmjax equivalent: {sorted(unknown)[:10]}")
    for key in ("log_temperature", "logit_bias"):
        if key in flat:
            flat[key] = flat[key].reshape(())  # big_vision stores t and b with shape [1]
    model_config, image_size = model_config_from_params(flat, path)
    info = {"family": "siglip", "image_size": image_size,
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # big_vision: value_range(-1, 1)
    return flat, model_config, info
