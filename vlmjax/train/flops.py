"""Model FLOPs counted analytically from the config, and the peak they are compared against.

Counts multiply-adds of the matmuls as 2 FLOPs (attention projections, attention scores and
values, MLPs, patch embedding, projections, the contrastive logits); norms, softmax and
elementwise ops are ignored, as in the usual MFU convention. Training = 3x forward.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    per_layer = tokens * (8 * width * width + 4 * width * mlp_dim) + 4 * tokens * tokens * width
    return depth * per_layer


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
    # keys/values for every token; query, output and MLP for the single probe.
    return tokens * 4 * width * width + 4 * width * width + 4 * tokens * width + 4 * width * mlp_dim


def vit_flops(cfg: dict, image_size: int) -> float:
    patch, width = cfg.get("patch_size", 16), cfg.get("width", 768)
    mlp_dim = cfg.get("mlp_dim") or 4 * width
    patches = (image_size // patch) ** 2
    tokens = patches + int(cfg.get("class_token") or cfg.get("pool", "map") == "cls")
    flops = 2 * patches * patch * patch * 3 * width
    flops += encoder_flops(tokens, width, cfg.get("depth", 12), mlp_dim)
    if cfg.get("pool", "map") == "map":
        flops += map_head_flops(tokens, width, mlp_dim)
    return flops


def text_flops(cfg: dict, length: int) -> float:
    width = cfg.get("width", 512)
    mlp_dim = cfg.get("mlp_dim") or 4 * width
    flops = encoder_flops(length, width, cfg.get("depth", 12), mlp_dim)
    if cfg.get("pool", "last") == "map":
        flops += map_head_flops(length, width, mlp_dim)
    return flops


def two_towers_train_flops_per_example(model: dict, image_size: int, text_length: int,
                                       batch_size: int) -> float:
    """Forward + backward FLOPs per example of a TwoTowers model with a contrastive loss."""
    embed = model.get("embed_dim") or model["image"].get("width", 768)
    forward = vit_flops(model["image"], image_size) + text_flops(model["text"], text_length)
    for tower in ("image", "text"):
        if model.get(f"{tower}_projection", True) and model.get("embed_dim"):
            forward += 2 * model[tower].get("width", 768) * embed
    forward += 2 * batch_size * embed  # this example's row of the B x B logits
    return 3 * forward


def measure_matmul_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Median FLOP/s of a large square matmul through JAX on the default device: the achievable
    peak of this machine (used as the MFU denominator on CPU)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)
