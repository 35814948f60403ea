"""Text transformer tower (CLIP's causal text encoder, SigLIP's bidirectional one)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers

POOLS = ("last", "eos", "first", "map", "none")


def last_valid_index(text_mask):
    """Index of the last True in each row of [B, L] (0 for an all-False row)."""
    length = text_mask.shape[1]
    return jnp.maximum(length - 1 - jnp.argmax(text_mask[:, ::-1], axis=1), 0) * text_mask.any(1)


class TextTransformer(layers.EncoderTower):
    """Token ids [B, L] (+ bool mask [B, L], True = real token) -> [B, width] pooled features,
    or [B, L, width] for `pool="none"`.

    Pooling: `last` = the last real token (SigLIP, and any causal LM); `eos` = the first `eos_id`
    token (CLIP), falling back to the last real token; `first` = position 0 (BERT's [CLS]);
    `map` = attention pooling over the real tokens. Padded tokens never affect real ones.
    """
    vocab_size: int = 32_000
    max_len: int = 64
    width: int = 512             # the other encoder fields: layers.EncoderTower's
    num_heads: int = 8
    causal: bool = False
    pool: str = "last"
    eos_id: int | None = None

    @nn.compact
    def __call__(self, tokens, text_mask=None, *, train: bool = False):
        if self.pool not in POOLS:
            raise ValueError(f"TextTransformer pool {self.pool!r} is not one of {POOLS}")
        if self.pool == "eos" and self.eos_id is None:
            raise ValueError("TextTransformer pool='eos' needs eos_id")
        batch, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the tower's max_len {self.max_len}")
        if text_mask is None:
            text_mask = jnp.ones((batch, length), bool)
        text_mask = text_mask.astype(bool)

        token_embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                               param_dtype=jnp.float32, name="token_embed",
                               embedding_init=layers.partitioned(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")))
        # Under FSDP the table's embed dim is gathered before the lookup (as every weight is
        # before its use): looked up from the sharded table, the [B, L, D] rows would come out
        # split over `embed`, and XLA would replicate them whole to split them by the batch.
        table = layers.constrain(token_embed.embedding, ("act_vocab", None))
        x = jnp.take(table.astype(self.dtype), tokens, axis=0)
        pos = self.param("pos_embedding", layers.partitioned(nn.initializers.normal(0.01),
                                                             (None, None, "embed")),
                         (1, self.max_len, self.width))
        x = layers.constrain(x + pos[:, :length].astype(self.dtype), layers.RESIDUAL_BLD)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        mask = layers.padding_mask(text_mask)
        if self.causal:
            mask = mask & layers.causal_mask(length)
        x = layers.encoder(self)(x, mask, train=train)
        x = layers.make_norm(self.norm, self.dtype, self.norm_eps, name="final_norm")(x)

        rows = jnp.arange(batch)
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "last":
            return x[rows, last_valid_index(text_mask)]
        if self.pool == "eos":
            is_eos = (tokens == self.eos_id) & text_mask
            idx = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1), last_valid_index(text_mask))
            return x[rows, idx]
        if self.pool == "map":
            return layers.map_head(self)(x, text_mask)
        return x
