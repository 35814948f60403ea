"""Token selection: greedy, and sampling with temperature, top-k and top-p warpers.

The warpers run in float32, in Hugging Face's default order (temperature, then top-k, then
top-p), with its semantics:
  temperature   logits / temperature;
  top_k         logits below the k-th largest are removed (ties with it are kept);
  top_p         sorted ascending, tokens whose cumulative probability is <= 1 - top_p are
                removed; the most likely token is always kept.
Removed tokens get -inf, so sampling never picks them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_temperature(logits_BV, temperature):
    return logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def apply_top_k(logits_BV, top_k: int):
    """Keeps the `top_k` largest logits per row (and any tied with the k-th); 0 = all."""
    top_k = min(int(top_k), logits_BV.shape[-1])
    if top_k <= 0:
        return logits_BV
    kth = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
    return jnp.where(logits_BV < kth, -jnp.inf, logits_BV)


def apply_top_p(logits_BV, top_p):
    """Nucleus filtering as HF's TopPLogitsWarper (min_tokens_to_keep=1); `top_p` may be traced."""
    ascending = jnp.sort(logits_BV, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = cumulative <= 1.0 - jnp.asarray(top_p, jnp.float32)
    remove = remove.at[..., -1].set(False)
    # The kept tokens are a suffix of the ascending order: keep logits >= its first value.
    first_kept = jnp.argmin(remove, axis=-1)  # index of the first False
    threshold = jnp.take_along_axis(ascending, first_kept[..., None], axis=-1)
    return jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)


def warp(logits_BV, temperature, top_k: int, top_p, use_top_p: bool):
    """Temperature, top-k, top-p (the latter only when `use_top_p`, a static flag)."""
    logits = apply_temperature(logits_BV, temperature)
    logits = apply_top_k(logits, top_k)
    if use_top_p:
        logits = apply_top_p(logits, top_p)
    return logits


def sample(rng, logits_BV, temperature, top_k: int, top_p, use_top_p: bool):
    """int32 [B] tokens drawn from the warped distribution."""
    warped = warp(logits_BV, temperature, top_k, top_p, use_top_p)
    return jax.random.categorical(rng, warped, axis=-1).astype(jnp.int32)


def greedy(logits_BV):
    """int32 [B]: the most likely token (the first on ties, as torch.argmax)."""
    # max, then the first index holding it: two plain reductions that XLA:CPU vectorises,
    # about 2x faster than jnp.argmax's (value, index) reduce at a 32k vocabulary. A NaN counts
    # as the maximum, as in jnp.argmax and torch.argmax.
    best = jnp.max(logits_BV, axis=-1, keepdims=True)
    nan = jnp.isnan(logits_BV)
    hit = jnp.where(nan.any(axis=-1, keepdims=True), nan, logits_BV == best)
    index = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits_BV.shape[-1] - 1), axis=-1)
