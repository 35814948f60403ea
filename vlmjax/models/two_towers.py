"""Two-tower contrastive model (CLIP, ALIGN, SigLIP, LiT).

An image tower and a text tower, each followed by an optional linear projection to the shared
embedding width, L2-normalised; plus the learnable log-temperature t' (temperature t = exp(t'))
and, for SigLIP, the learnable logit bias b.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.bert import BertTextTower
from vlmjax.models.cbow import CBOW
from vlmjax.models.convnet import ConvNet
from vlmjax.models.efficientnet import EfficientNet
from vlmjax.models.resnet import ResNet
from vlmjax.models.text import TextTransformer
from vlmjax.models.vit import ViT

IMAGE_TOWERS = {"vit": ViT, "cnn": ConvNet, "resnet": ResNet,
                "efficientnet": EfficientNet}  # model.image_arch -> module
TEXT_TOWERS = {"transformer": TextTransformer, "cbow": CBOW,
               "bert": BertTextTower}  # model.text_arch -> module

CLIP_TEMPERATURE_INIT = 1 / 0.07   # CLIP: t' = log(1/0.07)
SIGLIP_TEMPERATURE_INIT = 10.0     # SigLIP: t' = log 10
SIGLIP_BIAS_INIT = -10.0           # SigLIP: b = -10
EMBEDDING_BD = ("act_batch", "act_embed")  # logical axes of a tower's pooled output


def l2_normalize(x, eps: float = 1e-6):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class Projection(nn.Module):
    """Linear map of a tower's pooled features into the shared embedding; identity if `dim` is
    None (SigLIP's image tower, whose MAP head already outputs the embedding)."""
    dim: int | None
    use_bias: bool = False
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.dim is None:
            return x
        return nn.Dense(self.dim, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=jnp.float32, name="dense",
                        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                       ("embed", None)),
                        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(x)


def with_defaults(module, kwargs: Mapping[str, Any] | None) -> dict:
    """A module's constructor fields (without flax's parent and name) with their defaults,
    updated by `kwargs`: what a config that leaves fields unset means."""
    defaults = {f.name: f.default for f in dataclasses.fields(module)
                if f.default is not dataclasses.MISSING and f.name not in ("parent", "name")}
    return {**defaults, **dict(kwargs or {})}


def build_tower(module, kwargs: Mapping[str, Any], what: str):
    """`module(**kwargs)`, with an unknown keyword named in the error with the valid ones."""
    fields = sorted(with_defaults(module, None))
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {unknown} for {module.__name__}; valid keys: "
                         f"{fields}")
    return module(**kwargs)


class TwoTowers(nn.Module):
    """`image` / `text`: keyword arguments of the image tower / TextTransformer (None: no such
    tower). `image_arch` picks the image tower (a key of IMAGE_TOWERS: "vit" is ViT, "cnn"
    convnet.ConvNet), `text_arch` the text tower (a key of TEXT_TOWERS). A text tower is called
    as `tower(tokens [B, L], text_mask [B, L] or None, train=...)` -> [B, width].

    `embed_dim`: shared embedding width; `image_projection` / `text_projection` say whether a
    tower gets a linear projection to it (with `*_projection_bias`). `temperature_init` is t
    (not t'); `bias_init` None means no bias parameter (CLIP). `use_text_mask=False` ignores the
    padding mask, as SigLIP's released models do (they pool the last, padded, position).
    """
    image: Mapping[str, Any] | None = None
    text: Mapping[str, Any] | None = None
    image_arch: str = "vit"
    text_arch: str = "transformer"
    embed_dim: int | None = None
    image_projection: bool = True
    image_projection_bias: bool = False
    text_projection: bool = True
    text_projection_bias: bool = False
    temperature_init: float = CLIP_TEMPERATURE_INIT
    bias_init: float | None = None
    use_text_mask: bool = True  # False: the text tower sees padding too (SigLIP's reference)
    dtype: layers.Dtype = jnp.float32

    def setup(self):
        if self.image is not None:
            if self.image_arch not in IMAGE_TOWERS:
                raise ValueError(f"image_arch {self.image_arch!r} is not one of "
                                 f"{sorted(IMAGE_TOWERS)}")
            self.image_tower = build_tower(IMAGE_TOWERS[self.image_arch],
                                           {"dtype": self.dtype, **dict(self.image)},
                                           "model.image")
            self.image_proj = Projection(self.embed_dim if self.image_projection else None,
                                         self.image_projection_bias, self.dtype)
        if self.text is not None:
            if self.text_arch not in TEXT_TOWERS:
                raise ValueError(f"text_arch {self.text_arch!r} is not one of "
                                 f"{sorted(TEXT_TOWERS)}")
            self.text_tower = build_tower(TEXT_TOWERS[self.text_arch],
                                          {"dtype": self.dtype, **dict(self.text)}, "model.text")
            self.text_proj = Projection(self.embed_dim if self.text_projection else None,
                                        self.text_projection_bias, self.dtype)
        if self.temperature_init <= 0:
            raise ValueError(f"temperature_init must be > 0, got {self.temperature_init}")
        self.log_temperature = self.param(
            "log_temperature", layers.partitioned(
                nn.initializers.constant(math.log(self.temperature_init)), ()), ())
        if self.bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", layers.partitioned(nn.initializers.constant(self.bias_init), ()),
                ())

    def encode_image(self, images, *, train: bool = False):
        """[B, H, W, 3] -> L2-normalised float32 [B, embed_dim]."""
        if self.image is None:
            raise ValueError("this TwoTowers model has no image tower (image=None)")
        features = self.image_proj(self.image_tower(images, train=train))
        return l2_normalize(layers.constrain(features, EMBEDDING_BD))

    def encode_text(self, tokens, text_mask=None, *, train: bool = False):
        """[..., L] token ids (+ [..., L] bool mask) -> L2-normalised float32 [..., embed_dim];
        leading dims beyond the batch (e.g. [B, K, L]: K hard negatives per image) are
        flattened into the tower's batch."""
        if self.text is None:
            raise ValueError("this TwoTowers model has no text tower (text=None)")
        *lead, length = tokens.shape
        text_mask = text_mask.reshape(-1, length) if self.use_text_mask and (
            text_mask is not None) else None
        features = self.text_proj(self.text_tower(tokens.reshape(-1, length), text_mask,
                                                  train=train))
        return l2_normalize(layers.constrain(features, EMBEDDING_BD)).reshape(*lead, -1)

    def __call__(self, images=None, tokens=None, text_mask=None, *, train: bool = False):
        """Returns (zimg, ztxt, out); either embedding is None when its input is None.
        out: `temperature` t = exp(t') and `bias` (SigLIP models only), float32 scalars."""
        zimg = None if images is None else self.encode_image(images, train=train)
        ztxt = None if tokens is None else self.encode_text(tokens, text_mask, train=train)
        out = {"temperature": jnp.exp(self.log_temperature.astype(jnp.float32))}
        if self.bias_init is not None:
            out["bias"] = self.logit_bias.astype(jnp.float32)
        return zimg, ztxt, out
