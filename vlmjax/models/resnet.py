"""CLIP's modified ResNet image tower (`TwoTowers(image_arch="resnet")`; Radford et al. 2021).

Three changes to a torchvision ResNet: a stem of three 3x3 convolutions (the first of stride 2)
and a 2x2 average pool instead of one 7x7 convolution and a max pool; anti-aliased strides (a
stride-s block runs its 3x3 convolution at stride 1, then an s x s average pool, and its shortcut
pools before its 1x1 convolution); and attention pooling instead of global average pooling: the
mean of the final feature map is prepended to its positions, a learned position embedding is
added, and one multi-head attention with the mean token as its only query gives the output.
Convolutions have no bias. The output is [B, output_dim] (CLIP's image embedding: a TwoTowers
config sets `image_projection=False`).

Normalisation (`norm`): CLIP trains with BatchNorm, whose running statistics are state that
the trainer does not carry (it differentiates one params pytree and applies models with
`{"params": params}` only, no mutable `batch_stats`). So:
  "batchnorm"  BatchNorm in inference form, as CLIP's released weights compute it:
               (x - mean) / sqrt(var + eps) * scale + bias. `mean` and `var` are parameters
               behind stop_gradient: never trained (zero gradient, and 1-D parameters get no
               weight decay), loaded from pretrained weights. The form for pretrained CLIP
               ResNets, and for fine-tuning them with frozen statistics. Trained from scratch
               it is only a per-channel affine map (mean 0, var 1), not a normalisation.
  "groupnorm"  GroupNorm (gcd(norm_groups, channels) groups), stateless, so it normalises in
               training and evaluation alike: the choice for training from scratch.
Either way the last norm of each residual branch starts at scale 0 (as CLIP initialises its
bn3), so every block starts as its shortcut.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers as layer_lib  # `layers` is ResNet's block-count field

NORMS = ("batchnorm", "groupnorm")
STEM_STRIDE, BLOCK_EXPANSION, STAGES = 4, 4, 4
DOWNSAMPLING = 32  # stem (4) x three stride-2 stages


def feature_map_size(image_size: int) -> int:
    """Side of the final feature map (the attention pool sees its square + 1 tokens)."""
    return image_size // DOWNSAMPLING


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics (see the module docstring)."""
    epsilon: float = 1e-5
    zero_init: bool = False
    dtype: layer_lib.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = (x.shape[-1],)

        def param(name, init):
            return self.param(name, layer_lib.partitioned(init, (None,)), channels)

        scale = param("scale", nn.initializers.zeros if self.zero_init else nn.initializers.ones)
        bias = param("bias", nn.initializers.zeros)
        mean = jax.lax.stop_gradient(param("mean", nn.initializers.zeros))
        var = jax.lax.stop_gradient(param("var", nn.initializers.ones))
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)  # folded in float32
        return x * multiplier.astype(self.dtype) + (bias - mean * multiplier).astype(self.dtype)


def make_norm(kind: str, groups: int, epsilon: float, dtype, name: str, zero_init: bool = False,
              channels: int = 0) -> nn.Module:
    if kind == "batchnorm":
        return FrozenBatchNorm(epsilon, zero_init, dtype, name=name)
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=epsilon, dtype=dtype,
                        param_dtype=jnp.float32, name=name,
                        scale_init=layer_lib.partitioned(scale_init, (None,)),
                        bias_init=layer_lib.partitioned(nn.initializers.zeros, (None,)))


def conv(features: int, size: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    pad = size // 2
    return nn.Conv(features, (size, size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32, name=name,
                   kernel_init=layer_lib.partitioned(nn.initializers.he_normal(),
                                                  (None, None, None, None)))


def avg_pool(x, stride: int):
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride)) if stride > 1 else x


class Bottleneck(nn.Module):
    """1x1 (planes), 3x3 (planes), avg-pool(stride), 1x1 (4 x planes), plus the shortcut."""
    planes: int
    stride: int = 1
    norm: str = "batchnorm"
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dtype: layer_lib.Dtype = jnp.float32

    def _norm(self, name, channels, zero_init=False):
        return make_norm(self.norm, self.norm_groups, self.norm_eps, self.dtype, name, zero_init,
                         channels)

    @nn.compact
    def __call__(self, x):
        out_channels = self.planes * BLOCK_EXPANSION
        h = nn.relu(self._norm("norm1", self.planes)(conv(self.planes, 1, self.dtype, "conv1")(x)))
        h = nn.relu(self._norm("norm2", self.planes)(conv(self.planes, 3, self.dtype, "conv2")(h)))
        h = conv(out_channels, 1, self.dtype, "conv3")(avg_pool(h, self.stride))
        h = self._norm("norm3", out_channels, zero_init=True)(h)
        shortcut = x
        if self.stride > 1 or x.shape[-1] != out_channels:
            shortcut = conv(out_channels, 1, self.dtype, "downsample_conv")(
                avg_pool(x, self.stride))
            shortcut = self._norm("downsample_norm", out_channels)(shortcut)
        return nn.relu(h + shortcut)


class AttentionPool(nn.Module):
    """[B, h, w, D] -> [B, output_dim]: the mean token, attending to itself and every position."""
    num_heads: int
    output_dim: int
    dtype: layer_lib.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, 1 + hw, D]
        std = dim ** -0.5  # CLIP's init of the position embedding and every projection
        pos = self.param("pos_embedding", layer_lib.partitioned(nn.initializers.normal(std),
                                                             (None, "embed")), x.shape[1:])
        x = x + pos.astype(self.dtype)
        head_dim = dim // self.num_heads

        def proj(name):
            return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                   param_dtype=jnp.float32, name=name,
                                   kernel_init=layer_lib.partitioned(
                                       nn.initializers.normal(std), ("embed", "heads", "head_dim")),
                                   bias_init=layer_lib.partitioned(nn.initializers.zeros,
                                                                ("heads", "head_dim")))

        out = layer_lib.dot_product_attention(proj("query")(x[:, :1]), proj("key")(x),
                                           proj("value")(x), None)  # [B, 1, H, K]
        out = nn.DenseGeneral(self.output_dim, axis=(-2, -1), dtype=self.dtype,
                              param_dtype=jnp.float32, name="out",
                              kernel_init=layer_lib.partitioned(nn.initializers.normal(std),
                                                             ("heads", "head_dim", "embed")),
                              bias_init=layer_lib.partitioned(nn.initializers.zeros, ("embed",)))(out)
        return out[:, 0]


class ResNet(nn.Module):
    """Images [B, image_size, image_size, 3] -> [B, output_dim].

    `layers`: bottleneck blocks per stage (RN50: (3, 4, 6, 3), RN101: (3, 4, 23, 3)); stage i
    has 2^i x `width` planes and 4x as many output channels, so the attention pool works at
    width 32 x `width` with `num_heads` heads. `remat` (none | full | save-dots) recomputes each
    block in the backward pass (layer_lib.remat_policy)."""
    layers: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    num_heads: int = 32
    output_dim: int = 1024
    image_size: int = 224
    norm: str = "batchnorm"      # batchnorm (frozen statistics) | groupnorm: module docstring
    norm_groups: int = 32
    norm_eps: float = 1e-5
    remat: str = "none"
    dtype: layer_lib.Dtype = jnp.float32

    @property
    def embed_width(self) -> int:
        """Channels of the final feature map: what the attention pool attends over."""
        return self.width * 2 ** (STAGES - 1) * BLOCK_EXPANSION

    def check(self):
        if len(self.layers) != STAGES or any(type(n) is not int or n < 1 for n in self.layers):
            raise ValueError(f"ResNet layers {tuple(self.layers)!r} must be {STAGES} block counts "
                             f">= 1, e.g. (3, 4, 6, 3) for RN50")
        if self.width < 2 or self.width % 2:
            raise ValueError(f"ResNet width {self.width} must be an even number >= 2 (the stem "
                             f"starts at width / 2)")
        if self.image_size < DOWNSAMPLING or self.image_size % DOWNSAMPLING:
            raise ValueError(f"ResNet image_size {self.image_size} must be a positive multiple "
                             f"of {DOWNSAMPLING}")
        if self.num_heads < 1 or self.embed_width % self.num_heads:
            raise ValueError(f"ResNet num_heads {self.num_heads} must divide the attention "
                             f"pool's width {self.embed_width} (32 x width {self.width})")
        if self.norm not in NORMS:
            raise ValueError(f"ResNet norm {self.norm!r} is not one of {NORMS}")
        if self.output_dim < 1:
            raise ValueError(f"ResNet output_dim must be >= 1, got {self.output_dim}")
        layer_lib.remat_policy(self.remat)  # raises on an unknown setting

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        del train  # no dropout, and the norms behave alike in training and evaluation
        self.check()
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"ResNet got {images.shape[1]}x{images.shape[2]} images but was "
                             f"built for image_size {self.image_size}")
        norm_kwargs = dict(norm=self.norm, norm_groups=self.norm_groups, norm_eps=self.norm_eps,
                           dtype=self.dtype)
        x = images.astype(self.dtype)
        half = self.width // 2
        for i, (channels, stride) in enumerate(((half, 2), (half, 1), (self.width, 1))):
            x = conv(channels, 3, self.dtype, f"stem_conv{i}", stride)(x)
            x = make_norm(self.norm, self.norm_groups, self.norm_eps, self.dtype,
                          f"stem_norm{i}", channels=channels)(x)
            x = nn.relu(x)
        x = avg_pool(x, 2)
        block_cls = Bottleneck
        if self.remat != "none":
            block_cls = nn.remat(Bottleneck, policy=layer_lib.remat_policy(self.remat))
        for stage, blocks in enumerate(self.layers):
            for j in range(blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                x = block_cls(self.width * 2 ** stage, stride, **norm_kwargs,
                              name=f"stage{stage}_block{j}")(x)
        return AttentionPool(self.num_heads, self.output_dim, self.dtype, name="attn_pool")(x)
