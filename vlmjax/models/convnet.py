"""A small VGG-style CNN image tower (`TwoTowers(image_arch="cnn")`).

CLIP shipped CNN image towers beside ViTs (its modified ResNets); this one is the smallest useful
member of that family, for the CPU-sized configs: a 2x2 space-to-depth patchify (no parameters),
then one stage per entry of `channels`: a 3x3 convolution, ReLU and a 2x2 max pool; then global
pooling over positions. Max pooling makes each feature a "somewhere in the image" detector, so a
10-16 px shape reads the same wherever it sits. That is what the tiny vlm_shapes configs need: as
an 8-way shape classifier this tower reaches ~90% after 64k examples on a 2-core CPU, where the
tiny patch-8 ViT is at 29% (README, "Measured: tiny models").
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers

POOLS = ("max", "gap", "none")


def space_to_depth(images, block: int):
    """[B, H, W, C] -> [B, H/block, W/block, block*block*C] (each block's pixels, row-major)."""
    batch, height, width, channels = images.shape
    if height % block or width % block:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size {block}")
    x = images.reshape(batch, height // block, block, width // block, block, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // block, width // block,
                                                 block * block * channels)


def max_pool_2x2(x):
    """2x2 max pool, stride 2, VALID (an odd last row or column is dropped), as
    `nn.max_pool(x, (2, 2), strides=(2, 2))`. Written as a reshape and a max: XLA:CPU
    differentiates that with a compare and a select, where reduce_window's gradient carries
    an index per window dimension; the tower's forward + backward is ~1.4x faster (batch 128
    at 64 px, 2-core CPU). Ties share the gradient instead of one winner taking it; after a
    ReLU the only ties are zeros, whose gradient is zero either way."""
    batch, height, width, channels = x.shape
    x = x[:, :height - height % 2, :width - width % 2]
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class ConvNet(nn.Module):
    """Images [B, H, W, 3] -> pooled features [B, channels[-1]] (`pool="none"`: the final
    feature map [B, h, w, channels[-1]]).

    `return_layers` (a PrefixLM's `vision_feature_layer`) returns a tuple of feature maps
    [B, h, w, C], indexed like a ViT's hidden states: 0 is the space-to-depth input, i the output
    of stage i, negative from the end (-1 the last stage); no pooling, and the stages after the
    deepest one asked for are not built.

    `last_stage_pool=False` leaves out the last stage's 2x2 max pool: the final map has twice
    the resolution (8x8 instead of 4x4 at 64 px, so 4x the image tokens of a BLIP or LLaVA
    reading it, each of a quarter of the area) and the same parameters; the global max pooling
    (`pool="max"`) is unchanged by it, so a contrastive run's features are exactly the same."""
    channels: Sequence[int] = (32, 64, 96)
    patch_size: int = 2          # space-to-depth block before the first convolution
    pool: str = "max"            # max | gap | none
    return_layers: tuple[int, ...] | None = None
    last_stage_pool: bool = True
    dtype: layers.Dtype = jnp.float32

    @property
    def width(self) -> int:
        return self.channels[-1]

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        if self.pool not in POOLS:
            raise ValueError(f"ConvNet pool {self.pool!r} is not one of {POOLS}")
        if not self.channels:
            raise ValueError("ConvNet channels must list at least one stage")
        stages = len(self.channels)
        wanted = None
        if self.return_layers is not None:
            for layer in self.return_layers:
                if not -stages - 1 <= layer <= stages:
                    raise ValueError(f"ConvNet return_layers entry {layer} is outside "
                                     f"[-{stages + 1}, {stages}] for {stages} stages "
                                     f"({stages + 1} feature maps)")
            wanted = [layer % (stages + 1) for layer in self.return_layers]
            stages = max(wanted)
        x = space_to_depth(images.astype(self.dtype), self.patch_size)
        states = [x]
        for i, out in enumerate(self.channels[:stages]):
            x = nn.Conv(out, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        param_dtype=jnp.float32, name=f"conv{i}",
                        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                       (None, None, None, None)),
                        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))(x)
            x = nn.relu(x)
            if self.last_stage_pool or i < len(self.channels) - 1:
                x = max_pool_2x2(x)
            states.append(x)
        if wanted is not None:
            return tuple(states[i] for i in wanted)
        if self.pool == "max":
            return jnp.max(x, axis=(1, 2))
        if self.pool == "gap":
            return jnp.mean(x, axis=(1, 2))
        return x
