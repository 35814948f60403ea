"""Vision Transformer image tower (ViT, as used by CLIP, SigLIP, BLIP-2 and LLaVA)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers

POOLS = ("cls", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d")
STEMS = ("patch", "conv")


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of ConvStem's stride-2 convolutions: doubling, ending at `width`."""
    num_convs = patch_size.bit_length() - 1
    return [max(width >> (num_convs - 1 - i), 8) for i in range(num_convs)]


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions down to the patch grid, then a 1x1 projection to `width`.

    Xiao et al. 2021 ("Early convolutions help transformers see better"): a few convolutions
    instead of one patchify layer give the ViT a locality prior, which small models on small
    objects need (see README, tiny configs). Channels double per layer and end at `width`.
    """
    patch_size: int
    width: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        x = images
        for i, channels in enumerate(conv_stem_channels(self.patch_size, self.width)):
            x = nn.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        dtype=self.dtype, param_dtype=jnp.float32, name=f"conv{i}",
                        kernel_init=layers.partitioned(nn.initializers.he_normal(),
                                                       (None, None, None, None)))(x)
            x = nn.gelu(layers.make_norm("layernorm", self.dtype, 1e-6, name=f"norm{i}")(x))
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="proj",
                        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                       (None, "embed")),
                        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(x)


class ViT(layers.EncoderTower):
    """Images [B, H, W, 3] -> pooled features [B, width] (or all tokens [B, N, width] for
    `pool="none"`).

    `output_layer` (block index, negative from the end: -2 is LLaVA's penultimate layer) returns
    that block's hidden states instead: blocks after it are not built and no final norm is applied;
    the pooling still applies. A class token (CLIP layout: prepended, covered by the learned
    position embedding) is used when `class_token` is set, by default iff `pool="cls"`.

    `return_layers` (LLaVA's `vision_feature_layer`) returns a tuple of hidden states [B, N, width]
    (the class token included), indexed as HF's `hidden_states`: 0 is the embedded tokens, i the
    output of the i-th block, negative from the end (-1 the last block, -2 the penultimate one);
    no final norm, no pooling, and the blocks after the deepest one asked for are not built.
    The encoder's fields (width 768, depth 12, num_heads 12, ...) are layers.EncoderTower's.
    """
    patch_size: int = 16
    posemb: str = "learn"
    pool: str = "map"
    class_token: bool | None = None
    pre_norm: bool = False       # CLIP's ln_pre on the embedded tokens
    patch_bias: bool = True      # CLIP's patch embedding has no bias
    stem: str = "patch"          # "conv": ConvStem (patch_size must be a power of two)
    output_layer: int | None = None
    return_layers: tuple[int, ...] | None = None

    def _check(self):
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool {self.pool!r} is not one of {POOLS}")
        if self.posemb not in POSEMBS:
            raise ValueError(f"ViT posemb {self.posemb!r} is not one of {POSEMBS}")
        if self.stem not in STEMS:
            raise ValueError(f"ViT stem {self.stem!r} is not one of {STEMS}")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"ViT stem 'conv' needs a power-of-two patch_size >= 2, got "
                             f"{self.patch_size}")
        if self.output_layer is not None and not -self.depth <= self.output_layer < self.depth:
            raise ValueError(f"ViT output_layer {self.output_layer} is outside [-{self.depth}, "
                             f"{self.depth - 1}] for depth {self.depth}")
        if self.return_layers is not None:
            if self.output_layer is not None:
                raise ValueError("ViT: set output_layer or return_layers, not both")
            for layer in self.return_layers:
                if not -self.depth - 1 <= layer <= self.depth:
                    raise ValueError(f"ViT return_layers entry {layer} is outside "
                                     f"[-{self.depth + 1}, {self.depth}] for depth {self.depth} "
                                     f"({self.depth + 1} hidden states)")

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        self._check()
        class_token = self.pool == "cls" if self.class_token is None else self.class_token
        if self.stem == "conv":
            x = ConvStem(self.patch_size, self.width, self.dtype, name="conv_stem")(
                images.astype(self.dtype))
        else:
            x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                        padding="VALID", use_bias=self.patch_bias, dtype=self.dtype,
                        param_dtype=jnp.float32, name="patch_embed",
                        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                       (None, None, None, "embed")),
                        bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(
                images.astype(self.dtype))
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, self.width)
        if self.posemb == "sincos2d":
            x = x + layers.sincos_2d(grid_h, grid_w, self.width).astype(self.dtype)[None]
        if class_token:
            cls = self.param("cls", layers.partitioned(nn.initializers.zeros,
                                                       (None, None, "embed")), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype),
                                 x], axis=1)
        if self.posemb == "learn":
            x = layers.LearnedPosEmb(std=self.width ** -0.5, name="posemb")(x)
        if self.pre_norm:
            x = layers.make_norm(self.norm, self.dtype, self.norm_eps, name="pre_norm")(x)
        x = nn.Dropout(self.dropout)(layers.constrain(x, layers.RESIDUAL_BLD),
                                     deterministic=not train)

        if self.return_layers is not None:
            blocks = [layer % (self.depth + 1) for layer in self.return_layers]
            if max(blocks) == 0:
                return tuple(x for _ in blocks)
            _, states = layers.encoder(self, max(blocks))(x, train=train, return_states=True)
            return tuple(x if block == 0 else states[block - 1] for block in blocks)
        depth = self.depth if self.output_layer is None else self.output_layer % self.depth + 1
        x = layers.encoder(self, depth)(x, train=train)
        if self.output_layer is None:
            x = layers.make_norm(self.norm, self.dtype, self.norm_eps, name="final_norm")(x)

        if self.pool == "cls":
            return x[:, 0]
        if self.pool == "gap":
            return jnp.mean(x[:, int(class_token):], axis=1)
        if self.pool == "map":
            return layers.map_head(self)(x)
        return x
