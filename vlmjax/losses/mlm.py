"""BERT's masked-language-model corruption (Devlin et al. 2019), the MLM objective the seed names.

    tokens_in, targets, mlm_mask = mask_tokens(rng, tokens, text_mask, mask_id=..., vocab_size=V)

Each real, non-special token is chosen with `probability` (BERT: 0.15); a chosen token becomes
`mask_id` 80% of the time, a random token 10%, and stays itself 10%. The loss counts the chosen
positions only (`mlm_mask`), predicting the original token (`targets` = the input tokens).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def mask_tokens(rng, tokens, text_mask, *, mask_id: int, vocab_size: int,
                probability: float = 0.15, keep_ids: Sequence[int] = ()):
    """-> (corrupted tokens, targets, chosen) for int32 tokens [B, L] and bool text_mask [B, L];
    ids in `keep_ids` (BOS, [ENC], EOS, ...) and padding are never chosen."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"MLM probability {probability!r} must be in (0, 1)")
    choose_rng, kind_rng, random_rng = jax.random.split(rng, 3)
    eligible = text_mask.astype(bool)
    for token in keep_ids:
        eligible &= tokens != token
    chosen = eligible & jax.random.bernoulli(choose_rng, probability, tokens.shape)
    kind = jax.random.uniform(kind_rng, tokens.shape)  # < 0.8 mask, < 0.9 random, else keep
    random_tokens = jax.random.randint(random_rng, tokens.shape, 0, vocab_size, tokens.dtype)
    corrupted = jnp.where(kind < 0.8, jnp.asarray(mask_id, tokens.dtype),
                          jnp.where(kind < 0.9, random_tokens, tokens))
    return jnp.where(chosen, corrupted, tokens), tokens, chosen
