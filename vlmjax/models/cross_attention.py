"""Flamingo's tanh-gated cross-attention block, inserted into a decoder LM (models/fusion.py).

    x = x + tanh(alpha_attn) * CrossAttn(Norm(x), media)      # queries: text, keys: media
    x = x + tanh(alpha_ffn) * FFN(Norm(x))

The gates `alpha_attn` / `alpha_ffn` start at `gate_init` (0: the block is the identity, so a
frozen LM with new blocks computes exactly the LM's logits until the gates move). `gate` is
'float' (one scalar each, Flamingo) or 'vector' (one per channel: Idefics' alpha_type).

`media_mask` bool [B, L, S] says which media tokens each text token sees. A token that sees none
(text before the first image) gets zeros from the attention (no softmax over an all-masked row,
so no NaN); with `skip_without_media` (default) it skips the FFN too, so its output is exactly
the LM's; without (Idefics, open_flamingo), only its attention output is zeroed and the gated
FFN still applies.

Norms and FFN are the decoder's own kinds (`norm`, `mlp`, `activation`): Idefics uses RMSNorm
and SwiGLU with the LM's widths. `qk_norm` RMS-normalises queries and keys per head (Idefics'
qk_layer_norms). Keys/values come from the media tokens' own width (e.g. the resampler's) and
are computed once per call (`project_media`), so generation caches them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.decoder import _dense, feed_forward
from vlmjax.sharding import constrain

GATES = ("float", "vector")


class FeedForward(nn.Module):
    """decoder.feed_forward as a module (params `gate`, `up`, `down`)."""
    kind: str
    mlp_dim: int
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        return feed_forward(h, self.kind, self.mlp_dim, self.activation, False, self.dtype)


class GatedCrossAttention(nn.Module):
    width: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"
    mlp: str = "gated"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    qk_norm: bool = False
    gate: str = "float"
    gate_init: float = 0.0
    skip_without_media: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        if self.gate not in GATES:
            raise ValueError(f"cross_attention gate {self.gate!r} is not one of {GATES}")
        heads = (self.num_heads, self.head_dim)
        self.query = _dense(heads, ("embed",), ("heads", "head_dim"), False, self.dtype, "query")
        self.key = _dense(heads, ("embed",), ("heads", "head_dim"), False, self.dtype, "key")
        self.value = _dense(heads, ("embed",), ("heads", "head_dim"), False, self.dtype, "value")
        self.out = _dense(self.width, ("heads", "head_dim"), ("embed",), False, self.dtype,
                          "out", axis=(-2, -1))
        if self.qk_norm:
            self.q_norm = layers.RMSNorm(self.norm_eps, self.dtype)
            self.k_norm = layers.RMSNorm(self.norm_eps, self.dtype)
        self.attn_norm = layers.make_norm(self.norm, self.dtype, self.norm_eps)
        self.mlp_norm = layers.make_norm(self.norm, self.dtype, self.norm_eps)
        self.ffn = FeedForward(self.mlp, self.mlp_dim, self.activation, self.dtype)
        shape = (self.width,) if self.gate == "vector" else ()
        init = layers.partitioned(nn.initializers.constant(self.gate_init), ("embed",)[:len(shape)])
        self.alpha_attn = self.param("alpha_attn", init, shape)
        self.alpha_ffn = self.param("alpha_ffn", init, shape)

    def project_media(self, media):
        """media tokens [B, S, E] -> (keys, values) [B, S, H, K] (keys normed under qk_norm)."""
        media = media.astype(self.dtype)
        keys = self.key(media)
        if self.qk_norm:
            keys = self.k_norm(keys)
        return constrain(keys, layers.HEADS_BLHK), constrain(self.value(media), layers.HEADS_BLHK)

    def __call__(self, x, media_kv, media_mask):
        """x [B, L, D], media_kv from `project_media`, media_mask bool [B, L, S] -> [B, L, D]."""
        has_media = media_mask.any(-1)[..., None]  # [B, L, 1]
        q = self.query(self.attn_norm(x))
        if self.qk_norm:
            q = self.q_norm(q)
        keys, values = media_kv
        out = layers.dot_product_attention(constrain(q, layers.HEADS_BLHK), keys.astype(q.dtype),
                                           values.astype(q.dtype), media_mask[:, None])
        attended = jnp.where(has_media, self.out(constrain(out, layers.HEADS_BLHK)), 0)
        y = x + jnp.tanh(self.alpha_attn).astype(self.dtype) * attended
        ffn = jnp.tanh(self.alpha_ffn).astype(self.dtype) * self.ffn(self.mlp_norm(y))
        y = y + (jnp.where(has_media, ffn, 0) if self.skip_without_media else ffn)
        return constrain(y, layers.RESIDUAL_BLD)
