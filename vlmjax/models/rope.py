"""Rotary position embeddings (RoPE) in HF's `rotate_half` layout, with HF's scalings.

`inverse_frequencies(head_dim, rope_theta, rope_scaling)` computes the [head_dim // 2] inverse
frequencies exactly as transformers' `ROPE_INIT_FUNCTIONS` do for `default`, `linear` and
`llama3`; `rope_scaling` is HF's `config.rope_parameters` without `rope_theta` (None = default).
`apply_rope(x_BLHK, positions_BL, inv_freq)` rotates the first and second halves of the head
dim as pairs (HF's layout, so HF q/k kernels map without permuting their rows).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
# The keys each rope_type reads besides rope_type itself (all required, as in HF).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    return "default" if not rope_scaling else rope_scaling.get("rope_type", "default")


def validate_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> None:
    kind = rope_type(rope_scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type {kind!r} is not one of {ROPE_TYPES}")
    missing = [k for k in _ROPE_KEYS[kind] if k not in (rope_scaling or {})]
    if missing:
        raise ValueError(f"rope_scaling of rope_type {kind!r} needs keys {list(_ROPE_KEYS[kind])}; "
                         f"missing {missing}")


def inverse_frequencies(head_dim: int, rope_theta: float,
                        rope_scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """float32 [head_dim // 2]: theta ** (-2i / head_dim), rescaled per `rope_scaling`."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    validate_rope_scaling(rope_scaling)
    kind = rope_type(rope_scaling)
    # HF: float32 exponents, then 1 / base ** e in float32.
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope_theta) ** exponents)).astype(np.float32)
    if kind == "linear":
        return (inv_freq / np.float32(rope_scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        return _llama3_scaling(inv_freq, rope_scaling)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
    """x [B, L, H, K], positions int [B, L] -> x rotated (same dtype).

    Angles, cos and sin are float32; as in HF they are cast to x's dtype before the rotation.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, K]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
