"""Continuous bag-of-words text tower (`TwoTowers(text_arch="cbow")`).

The mean of the token embeddings of a caption's real tokens: a bag-of-words baseline, and the
cheapest text tower a contrastive run can have. Word order is invisible to it (a caption and its
word-order permutations embed alike); swapped attribute words are not.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers


class CBOW(nn.Module):
    """Token ids [B, L] (+ bool mask [B, L], True = real token; None = all real) -> [B, width]:
    the mean embedding of the real tokens (zeros for a row with none), then, with `projection`,
    a dense layer width -> width. `max_len` bounds L, as a TextTransformer's does, so the two
    towers take the same config."""
    vocab_size: int = 32_000
    max_len: int = 64
    width: int = 512
    projection: bool = False
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, text_mask=None, *, train: bool = False):
        del train  # no dropout
        if self.vocab_size < 1 or self.width < 1:
            raise ValueError(f"CBOW vocab_size {self.vocab_size} and width {self.width} must "
                             "be >= 1")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the tower's max_len {self.max_len}")
        embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                         name="token_embed",
                         embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                           ("vocab", "embed")))
        x = embed(tokens)  # [B, L, width]
        if text_mask is None:
            features = x.mean(axis=1)
        else:
            weights = text_mask.astype(x.dtype)[..., None]
            count = jnp.maximum(weights.sum(axis=1), 1)  # an empty caption: zeros, not NaN
            features = (x * weights).sum(axis=1) / count
        if self.projection:
            features = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                                name="projection",
                                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                               ("embed", None)),
                                bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(
                features)
        return features
