"""EfficientNet image tower (`TwoTowers(image_arch="efficientnet")`): ALIGN's image encoder, as
HF transformers' AlignVisionModel computes it.

- stem: zero-pad right/bottom by 1, 3x3 conv stride 2 (VALID), BatchNorm, swish;
- MBConv blocks, one stage per entry of the base lists (`in_channels`, `out_channels`,
  `kernel_sizes`, `strides`, `expand_ratios`, `num_block_repeats`), scaled by `round_filters`
  (width) and `round_repeats` (depth). A block: 1x1 expansion conv + BN + swish (if its expand
  ratio is not 1), depthwise kxk conv + BN + swish, squeeze-and-excitation (global mean, 1x1
  reduce to max(1, int(block input channels * squeeze_expansion_ratio)) + swish, 1x1 expand +
  sigmoid, rescale), 1x1 projection conv + BN. Only blocks after the first of their stage add
  the residual (HF's `id_skip`), after drop-connect;
- the depthwise conv of a stride-2 block pads (k//2 - 1, k//2) per side ("adjust", TF-style
  'same' for even inputs) or (k//2, k//2) when the block's index is in `depthwise_padding`;
  stride-1 blocks pad symmetrically ('same');
- no top 1x1 conv: HF's AlignVisionModel has none (ALIGN drops EfficientNet's classification
  head), so the features are the last block's `round_filters(out_channels[-1])` channels;
- pooling over all positions: "mean" (ALIGN) or "max" (HF's pooler, a `hidden_dim` window with
  ceil_mode, covers the whole map whenever HF can run), or "none" for the feature map.

BatchNorm runs in inference form only: y = (x - mean) / sqrt(var + eps) * scale + bias with the
stored running statistics, in train mode too. `mean` and `var` live in the params pytree so that
converters and checkpoints carry them, behind `stop_gradient`: they get zero gradient, and as 1-D
params they get no weight decay, so training leaves them as loaded. Limitation: the batch
statistics are never updated by training; from scratch (mean 0, var 1) each BN is an affine
layer, so an EfficientNet trained here is not the batch-normalised network of the paper.

Drop-connect (`drop_connect_rate * block / num_blocks`, stochastic depth per example, as the
EfficientNet reference; HF applies element-wise dropout there instead) only acts with
`train=True` and a "dropout" rng; at eval it is the identity, as in HF.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers

POOLS = ("mean", "max", "none")
STEM_CHANNELS = 32  # EfficientNet's stem width before round_filters (HF hard-codes it too)
CONV_AXES = (None, None, None, None)  # small kernels: replicated, as convnet.py's


def round_filters(channels: int, width_coefficient: float, divisor: int = 8) -> int:
    """Channels scaled by the width coefficient, rounded to a multiple of `divisor`, never
    below `divisor` nor more than 10% below the scaled value (EfficientNet, HF)."""
    scaled = channels * width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """Blocks of a stage scaled by the depth coefficient, rounded up."""
    return int(math.ceil(depth_coefficient * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    in_dim: int
    out_dim: int
    stride: int
    kernel: int
    expand_ratio: int
    residual: bool          # not the first block of its stage
    adjust_padding: bool    # stride 2: pad (k//2 - 1, k//2) instead of (k//2, k//2)
    drop_rate: float


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference form over the last axis; the statistics are params that training
    does not change (module docstring)."""
    epsilon: float = 1e-3
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]

        def param(name, init):
            return self.param(name, layers.partitioned(init, (None,)), (features,))

        scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
        mean = jax.lax.stop_gradient(param("mean", nn.initializers.zeros))
        var = jax.lax.stop_gradient(param("var", nn.initializers.ones))
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x.astype(jnp.float32) * multiplier + (bias - mean * multiplier)).astype(
            self.dtype)


def _conv(features, kernel, dtype, name, stride=1, padding=((0, 0), (0, 0)), groups=1,
          bias=False):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   feature_group_count=groups, use_bias=bias, dtype=dtype,
                   param_dtype=jnp.float32, name=name,
                   kernel_init=layers.partitioned(
                       nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_AXES),
                   bias_init=layers.partitioned(nn.initializers.zeros, (None,)))


def depthwise_padding(kernel: int, stride: int, adjust: bool) -> tuple:
    """((top, bottom), (left, right)) of a depthwise conv, as HF pads it."""
    if stride == 1:  # torch padding="same"
        lo = (kernel - 1) // 2
        return ((lo, kernel - 1 - lo),) * 2
    half = kernel // 2
    return ((half - 1, half),) * 2 if adjust else ((half, half),) * 2


class MBConvBlock(nn.Module):
    spec: BlockSpec
    squeeze_expansion_ratio: float = 0.25
    activation: str = "silu"
    batch_norm_eps: float = 1e-3
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):  # train positional: remat's static argument
        s, act = self.spec, layers.get_activation(self.activation)

        def bn(name):
            return FrozenBatchNorm(self.batch_norm_eps, self.dtype, name=name)

        inputs, width = x, s.in_dim * s.expand_ratio
        if s.expand_ratio != 1:
            x = act(bn("expand_bn")(_conv(width, 1, self.dtype, "expand_conv")(x)))
        pad = depthwise_padding(s.kernel, s.stride, s.adjust_padding)
        x = _conv(width, s.kernel, self.dtype, "depthwise_conv", s.stride, pad, groups=width)(x)
        x = act(bn("depthwise_bn")(x))
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        squeezed = act(_conv(max(1, int(s.in_dim * self.squeeze_expansion_ratio)), 1,
                             self.dtype, "se_reduce", bias=True)(squeezed))
        x = x * jax.nn.sigmoid(_conv(width, 1, self.dtype, "se_expand", bias=True)(squeezed))
        x = bn("project_bn")(_conv(s.out_dim, 1, self.dtype, "project_conv")(x))
        if not s.residual:
            return x
        if train and s.drop_rate > 0:
            keep = 1.0 - s.drop_rate
            kept = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
            x = jnp.where(kept, x / keep, 0).astype(x.dtype)
        return x + inputs


class EfficientNet(nn.Module):
    """Images [B, H, W, 3] -> pooled features [B, width] (`pool="none"`: [B, h, w, width]).
    Field names and defaults are HF AlignVisionConfig's (EfficientNet-B7 scaling, ALIGN-base);
    `activation` is a layers.ACTIVATIONS name (HF's "swish" is "silu")."""
    width_coefficient: float = 2.0
    depth_coefficient: float = 3.1
    depth_divisor: int = 8
    kernel_sizes: Sequence[int] = (3, 3, 5, 3, 5, 5, 3)
    in_channels: Sequence[int] = (32, 16, 24, 40, 80, 112, 192)
    out_channels: Sequence[int] = (16, 24, 40, 80, 112, 192, 320)
    strides: Sequence[int] = (1, 2, 2, 2, 1, 2, 1)
    num_block_repeats: Sequence[int] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: Sequence[int] = (1, 6, 6, 6, 6, 6, 6)
    depthwise_padding: Sequence[int] = ()  # block indices whose stride-2 padding is symmetric
    squeeze_expansion_ratio: float = 0.25
    batch_norm_eps: float = 1e-3
    drop_connect_rate: float = 0.2
    activation: str = "silu"
    pool: str = "mean"
    remat: str = "none"  # none | full | save-dots: recompute each MBConv block in the backward
    dtype: layers.Dtype = jnp.float32

    def filters(self, channels: int) -> int:
        return round_filters(channels, self.width_coefficient, self.depth_divisor)

    @property
    def width(self) -> int:
        return self.filters(self.out_channels[-1])

    def blocks(self) -> list[BlockSpec]:
        """Every MBConv block in order, as HF's AlignVisionEncoder builds them."""
        lists = {n: getattr(self, n) for n in ("kernel_sizes", "in_channels", "out_channels",
                                                "strides", "num_block_repeats", "expand_ratios")}
        if len({len(v) for v in lists.values()}) != 1 or not self.in_channels:
            raise ValueError("EfficientNet stage lists must be non-empty and of one length, got "
                             + ", ".join(f"{n}={list(v)}" for n, v in lists.items()))
        total = sum(round_repeats(n, self.depth_coefficient) for n in self.num_block_repeats)
        specs = []
        for stage in range(len(self.in_channels)):
            out_dim = self.filters(self.out_channels[stage])
            for j in range(round_repeats(self.num_block_repeats[stage], self.depth_coefficient)):
                index = len(specs)
                specs.append(BlockSpec(
                    in_dim=self.filters(self.in_channels[stage]) if j == 0 else out_dim,
                    out_dim=out_dim, stride=self.strides[stage] if j == 0 else 1,
                    kernel=self.kernel_sizes[stage], expand_ratio=self.expand_ratios[stage],
                    residual=j > 0, adjust_padding=index not in tuple(self.depthwise_padding),
                    drop_rate=self.drop_connect_rate * index / total))
        return specs

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        if self.pool not in POOLS:
            raise ValueError(f"EfficientNet pool {self.pool!r} is not one of {POOLS}")
        act = layers.get_activation(self.activation)
        specs = self.blocks()
        x = _conv(self.filters(STEM_CHANNELS), 3, self.dtype, "stem_conv", stride=2,
                  padding=((0, 1), (0, 1)))(images.astype(self.dtype))
        x = act(FrozenBatchNorm(self.batch_norm_eps, self.dtype, name="stem_bn")(x))
        block_cls = MBConvBlock
        if self.remat != "none":  # blocks differ in shape from stage to stage: no scan
            block_cls = nn.remat(MBConvBlock, policy=layers.remat_policy(self.remat),
                                 static_argnums=(2,))
        for i, spec in enumerate(specs):
            x = block_cls(spec, self.squeeze_expansion_ratio, self.activation,
                          self.batch_norm_eps, self.dtype, name=f"block{i}")(x, train)
        if self.pool == "mean":
            return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.pool == "max":
            return jnp.max(x, axis=(1, 2))
        return x
