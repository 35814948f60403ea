"""Model FLOPs, and the peak they are compared against (MFU).

The trainer counts FLOPs with XLA's cost analysis of the compiled step
(`compiled_flops_per_example`); the analytic counts below are the cross-check (tests/train/
test_flops.py) and what the benchmarks quote.

Counts multiply-adds of the matmuls as 2 FLOPs (attention projections, attention scores and
values, MLPs, patch embedding, projections, the contrastive logits); norms, softmax and
elementwise ops are ignored, as in the usual MFU convention. Training = 3x forward.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from vlmjax.models.convnet import ConvNet
from vlmjax.models.efficientnet import EfficientNet
from vlmjax.models.two_towers import TEXT_TOWERS, with_defaults
from vlmjax.models.vit import conv_stem_channels
from vlmjax.train import conv_flops


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    per_layer = tokens * (8 * width * width + 4 * width * mlp_dim) + 4 * tokens * tokens * width
    return depth * per_layer


def map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
    # keys/values for every token; query, output and MLP for the single probe.
    return tokens * 4 * width * width + 4 * width * width + 4 * tokens * width + 4 * width * mlp_dim


def conv_stem_flops(image_size: int, patch: int, width: int) -> float:
    """vit.ConvStem: stride-2 3x3 convolutions (channels doubling up to `width`), then a 1x1
    projection, on the patch grid."""
    flops, channels_in, side = 0.0, 3, image_size
    for channels in conv_stem_channels(patch, width):
        side = (side + 1) // 2  # padding 1, stride 2
        flops += 2 * side * side * 9 * channels_in * channels
        channels_in = channels
    return flops + 2 * side * side * channels_in * width


def vit_flops(cfg: dict, image_size: int) -> float:
    patch, width = cfg.get("patch_size", 16), cfg.get("width", 768)
    mlp_dim = cfg.get("mlp_dim") or 4 * width
    patches = (image_size // patch) ** 2
    tokens = patches + int(cfg.get("class_token") or cfg.get("pool", "map") == "cls")
    if cfg.get("stem", "patch") == "conv":
        flops = conv_stem_flops(image_size, patch, width)
    else:
        flops = 2 * patches * patch * patch * 3 * width
    depth = cfg.get("depth", 12)
    if cfg.get("output_layer") is not None:  # later blocks are not built
        depth = cfg["output_layer"] % depth + 1
    flops += encoder_flops(tokens, width, depth, mlp_dim)
    if cfg.get("pool", "map") == "map":
        flops += map_head_flops(tokens, width, mlp_dim)
    return flops


def convnet_flops(cfg: dict, image_size: int) -> float:
    """convnet.ConvNet: per stage a 3x3 convolution at the current resolution, then a 2x2 pool."""
    net = ConvNet(**cfg)
    side = image_size // net.patch_size
    channels_in, flops = 3 * net.patch_size ** 2, 0.0
    for channels in net.channels:
        flops += 2 * side * side * 9 * channels_in * channels
        channels_in, side = channels, side // 2
    return flops


def image_tower_flops(model: dict, image_size: int) -> float:
    arch = model.get("image_arch", "vit")
    if arch == "cnn":
        return convnet_flops(model["image"], image_size)
    if arch == "resnet":
        return conv_flops.resnet_flops(model["image"], image_size)
    if arch == "efficientnet":
        return conv_flops.efficientnet_flops(model["image"], image_size)
    return vit_flops(model["image"], image_size)


def image_tower_width(model: dict) -> int:
    """Width of the image tower's pooled output: what the image projection maps from."""
    arch = model.get("image_arch", "vit")
    if arch == "cnn":
        return ConvNet(**model["image"]).width
    if arch == "resnet":
        return model["image"].get("output_dim", 1024)
    if arch == "efficientnet":
        return EfficientNet(**model["image"]).width
    return model["image"].get("width", 768)


def text_flops(cfg: dict, length: int) -> float:
    """A TextTransformer (or BERT: the same encoder, pooled at a token, no head)."""
    width = cfg.get("width", 512)
    mlp_dim = cfg.get("mlp_dim") or 4 * width
    flops = encoder_flops(length, width, cfg.get("depth", 12), mlp_dim)
    if cfg.get("pool", "last") == "map":
        flops += map_head_flops(length, width, mlp_dim)
    return flops


def text_tower_config(model: dict) -> dict:
    """The text tower's fields with its own defaults (BERT's width is not a TextTransformer's)."""
    return with_defaults(TEXT_TOWERS[model.get("text_arch", "transformer")], model["text"])


def text_tower_flops(model: dict, length: int) -> float:
    cfg = text_tower_config(model)
    arch = model.get("text_arch", "transformer")
    if arch == "cbow":  # a gather and a mean: no multiply-adds but the optional projection
        return 2.0 * cfg["width"] ** 2 if cfg["projection"] else 0.0
    if arch == "bert":
        return text_flops({**cfg, "pool": "first"}, length)
    return text_flops(cfg, length)


def two_towers_train_flops_per_example(model: dict, image_size: int, text_length: int,
                                       batch_size: int, hard_negatives: int = 0) -> float:
    """Forward + backward FLOPs per example of a TwoTowers model with a contrastive loss, with
    `hard_negatives` extra captions per example encoded and scored."""
    widths = {"image": image_tower_width(model), "text": text_tower_config(model)["width"]}
    embed = model.get("embed_dim") or widths["image"]
    projects = {tower: model.get(f"{tower}_projection", True) and bool(model.get("embed_dim"))
                for tower in ("image", "text")}
    text = text_tower_flops(model, text_length) + (
        2 * widths["text"] * embed if projects["text"] else 0)
    forward = image_tower_flops(model, image_size) + text * (1 + hard_negatives)
    if projects["image"]:
        forward += 2 * widths["image"] * embed
    forward += 2 * (batch_size + hard_negatives) * embed  # this example's logits
    return 3 * forward


# Dense matmul peaks per chip (vendor data sheets; no sparsity), by device_kind substring, most
# specific first, and by compute dtype: the MFU denominator on accelerators. NVIDIA float32 is
# the TF32 tensor-core rate (XLA's default float32 matmul precision there); TPU data sheets give
# no float32 figure, so float32 on TPU (like CPU) is measured instead.
PEAK_FLOPS = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("GH200", {"bfloat16": 989e12, "float32": 494.7e12}),
    ("B200", {"bfloat16": 2250e12, "float32": 1100e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float32": 183e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("A10", {"bfloat16": 125e12, "float32": 62.5e12}),
    ("TPU v6", {"bfloat16": 918e12}), ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12}), ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}), ("TPU v3", {"bfloat16": 123e12}),
)


def device_peak_flops(device=None, dtype: str = "bfloat16") -> float | None:
    """Data-sheet peak FLOP/s of `device` (default: the first device) for `dtype` matmuls; None
    if unknown (CPUs, unlisted chips or dtypes): measure instead with `measure_matmul_flops`."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    for name, peaks in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return peaks.get(dtype)
    return None


def compiled_flops_per_example(compiled, global_batch: int) -> float:
    """FLOPs per example of a compiled train step, from XLA's cost analysis plus the matmul
    FLOPs it leaves out of loops (it counts a while body once: scanned layers, a scanned
    accumulation loop; `hlo_flops.loop_dot_flops_missed`). The analysis is of one device's
    partitioned program, so it is scaled by the device count."""
    from vlmjax.train.hlo_flops import loop_dot_flops_missed
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    shardings = jax.tree.leaves(compiled.input_shardings)
    devices = len(shardings[0].device_set) if shardings else 1
    total = float(cost.get("flops", 0.0)) + loop_dot_flops_missed(compiled.as_text())
    return total * devices / global_batch


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
