"""Cross-attention fusion (Flamingo, OpenFlamingo, Idefics v1): a frozen decoder LM reads images
through tanh-gated cross-attention blocks; a Perceiver resampler turns each image into
`num_latents` visual tokens.

    model = FusionLM(vision=vit_kwargs, llm=decoder_kwargs, image_token_id=..., ...)
    logits = model.apply(v, tokens, images=images, image_mask=m)   # float32 [B, L, V]
    # images [B, N, H, W, 3]; m bool [B, L, N]: which images each token sees

Vision tower (`vision/`): a vlmjax ViT (or the tiny CNN) read at `vision_feature_layer` (HF's
hidden_states index: -1 is the last block's output before any final norm, what Idefics reads)
with `vision_feature_select_strategy` ('full' keeps the class token, as Idefics does).

`feature_posemb` (not in Flamingo, whose ViT features carry their positions): a learned vector per
visual token position (`media_posemb/`) added before the resampler, for a CNN tower.

Resampler (`perceiver/`, PerceiverResampler): learned latents [T, E]; each of `depth` blocks is
latents += Attn(q = LN(latents), kv = [LN(features); LN(latents)]), latents += FFN(latents)
(LayerNorm, Dense, ReLU, Dense, as Idefics); a final LayerNorm. `resampler=None` (Idefics'
use_resampler=False) passes the tower's tokens through.

LLM (`llm/`): models.decoder.Decoder with `cross_attention` = this model's `cross_attention`
kwargs and `every` = `cross_attn_every`: blocks `llm/layers/xattn{j}` before layers 0, k, 2k, ...
(see models/cross_attention.py; gates start at 0, so a new model computes the frozen LM's logits).

Media masks: `image_mask` bool [B, L, N]. Without one, it is derived from the tokens
(`media_mask_from_tokens`): the `image_token_id` token and the tokens after it see that image
(`only_attend_immediate_media`, default) or every image so far; an `end_of_chunk_id` token ends
its chunk: the tokens after it see no image until the next one (Idefics' processor). Text before
the first image sees none and gets exactly the LM's output.

Added tokens (`additional_vocab_size`, Idefics' decoupled embeddings): ids >= the LM's vocabulary
read rows of `additional_embed` [A, D] and get logits from `additional_head` [D, A] appended to
the LM's: the LM's own table stays frozen while `<image>` / `<|endofchunk|>` are learned.

Generation (vlmjax.inference.generate): the prefill call carries `images` (and `image_mask`);
the cross-attention keys/values of every block and the mask row the next token would see go
into the cache, and the generated tokens extend the mask as media_mask_from_tokens does (after
an end of chunk they see nothing; a generated image token has no image: immediate media then
see nothing; all-media mode keeps what it saw). Cached and uncached decoding agree.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models import layers
from vlmjax.models.decoder import Decoder, LMHead
from vlmjax.models.prefix_lm import (ReadsVisionFeatures, check_select_strategy,
                                     vision_kwargs, visual_tokens)
from vlmjax.models.two_towers import IMAGE_TOWERS, build_tower
from vlmjax.models.vit import ViT


def media_mask_from_tokens(tokens, image_token_id: int, num_images: int,
                           end_of_chunk_id: int | None = None, only_immediate: bool = True,
                           xp=jnp):
    """tokens int [B, L] -> bool [B, L, num_images]: the images each token sees (module
    docstring). `xp` is jax.numpy (in a model) or numpy (in the input pipeline)."""
    is_image = tokens == image_token_id
    latest = xp.cumsum(is_image.astype(np.int32), axis=1) - 1            # -1: before any image
    if end_of_chunk_id is not None:
        # A chunk ends after its end token: count, per position, the images since the last end.
        ends = (tokens == end_of_chunk_id).astype(np.int32)
        ended_before = xp.cumsum(ends, axis=1) - ends                     # ends strictly before
        image_end_count = xp.where(is_image, ended_before, -1)
        # ends before the latest image: a running max of the end count seen at image tokens
        ends_at_latest = _running_max(image_end_count, xp)
        latest = xp.where(ended_before > ends_at_latest, -1, latest)
    images = xp.arange(num_images)[None, None]
    seen = latest[..., None]
    return (images == seen) if only_immediate else ((images <= seen) & (seen >= 0))


def _running_max(x, xp):
    if xp is np:
        return np.maximum.accumulate(x, axis=1)
    return jax.lax.cummax(x, axis=1)


class PerceiverAttention(nn.Module):
    num_heads: int
    head_dim: int
    qk_norm: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features, latents):
        width = latents.shape[-1]

        def norm(name, x):  # q/k norms are over head_dim: no "embed" axis
            if name in ("q_norm", "k_norm"):
                return nn.LayerNorm(self.norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                                    name=name)(x)
            return layers.make_norm("layernorm", self.dtype, self.norm_eps, name=name)(x)

        def heads(name):
            return nn.DenseGeneral((self.num_heads, self.head_dim), use_bias=False,
                                   dtype=self.dtype, param_dtype=jnp.float32, name=name,
                                   kernel_init=layers.partitioned(
                                       nn.initializers.lecun_normal(),
                                       ("embed", "heads", "head_dim")))

        features, latents = norm("features_norm", features), norm("latents_norm", latents)
        both = jnp.concatenate([features, latents], axis=1)
        q, k, v = heads("query")(latents), heads("key")(both), heads("value")(both)
        if self.qk_norm:
            q, k = norm("q_norm", q), norm("k_norm", k)
        out = layers.dot_product_attention(q, k, v, None)
        return nn.DenseGeneral(width, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                               param_dtype=jnp.float32, name="out",
                               kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                              ("heads", "head_dim", "embed")))(out)


class PerceiverResampler(nn.Module):
    """Visual features [b, P, E] -> [b, num_latents, E] (module docstring)."""
    num_latents: int = 64
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 96
    mlp_ratio: int = 4
    activation: str = "relu"
    qk_norm: bool = False
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        width = features.shape[-1]
        latents = self.param("latents", layers.partitioned(nn.initializers.normal(1.0),
                                                           (None, "embed")),
                             (self.num_latents, width))
        x = jnp.broadcast_to(latents.astype(self.dtype), (features.shape[0], *latents.shape))
        features = features.astype(self.dtype)
        act = layers.get_activation(self.activation)
        for i in range(self.depth):
            x = x + PerceiverAttention(self.num_heads, self.head_dim, self.qk_norm,
                                       self.norm_eps, self.dtype, name=f"block{i}_attn")(
                features, x)
            h = layers.make_norm("layernorm", self.dtype, self.norm_eps,
                                 name=f"block{i}_mlp_norm")(x)
            h = act(_plain_dense(width * self.mlp_ratio, ("embed", "mlp"), self.dtype,
                                 f"block{i}_fc")(h))
            x = x + _plain_dense(width, ("mlp", "embed"), self.dtype, f"block{i}_proj")(h)
        return layers.make_norm("layernorm", self.dtype, self.norm_eps, name="final_norm")(x)


class FeaturePosemb(nn.Module):
    """A learned vector per visual token position added to the features [B, T, E] (`embedding`
    [T, E], zero init): a CNN's tokens do not say where they are, and neither cross-attention
    nor the resampler can tell positions apart without it."""

    @nn.compact
    def __call__(self, features):
        table = self.param("embedding", layers.partitioned(nn.initializers.zeros,
                                                            (None, "embed")),
                           features.shape[1:])
        return features + table.astype(features.dtype)


def _plain_dense(features, axes, dtype, name):
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=layers.partitioned(nn.initializers.lecun_normal(), axes))


class FusionLM(ReadsVisionFeatures, nn.Module):
    vision: Mapping[str, Any] | ViT
    llm: Mapping[str, Any]
    image_token_id: int
    end_of_chunk_id: int | None = None
    vision_arch: str = "vit"
    vision_feature_layer: int | Sequence[int] = -1
    vision_feature_select_strategy: str = "full"
    resampler: Mapping[str, Any] | None = None
    cross_attention: Mapping[str, Any] | None = None
    cross_attn_every: int = 1
    only_attend_immediate_media: bool = True
    additional_vocab_size: int = 0
    feature_posemb: bool = False
    dtype: Any = jnp.float32

    def _llm_kwargs(self) -> dict:
        cross = {**dict(self.cross_attention or {}), "every": int(self.cross_attn_every)}
        return {"dtype": self.dtype, **dict(self.llm), "cross_attention": cross}

    def setup(self):
        if self.vision_arch not in IMAGE_TOWERS:
            raise ValueError(f"vision_arch {self.vision_arch!r} is not one of "
                             f"{sorted(IMAGE_TOWERS)}")
        vision = vision_kwargs(self.vision, self.vision_arch, self.feature_layers, self.dtype)
        tower = IMAGE_TOWERS[self.vision_arch]
        build_tower(tower, vision, "model.vision")
        check_select_strategy(vision, self.vision_arch, self.vision_feature_select_strategy)
        self.vision_tower = tower(**vision, name="vision")
        if self.feature_posemb:
            self.media_posemb = FeaturePosemb(name="media_posemb")
        if self.resampler is not None:
            self.perceiver = build_tower(PerceiverResampler,
                                         {"dtype": self._dtype(), **dict(self.resampler)},
                                         "model.resampler")
        self.language_model = Decoder(**self._llm_kwargs(), name="llm")
        width = self._llm_kwargs()["width"]
        if self.additional_vocab_size:
            self.additional_embed = self.param(
                "additional_embed", layers.partitioned(nn.initializers.normal(0.02),
                                                       (None, "embed")),
                (self.additional_vocab_size, width))
            self.additional_head = LMHead(self.additional_vocab_size, name="additional_head")

    # ------------------------------------------------------------------------------- compute
    def image_features(self, images):
        """images [B, N, H, W, 3] (or [B, H, W, 3]) -> visual tokens [B, N * T, E]."""
        if images.ndim == 4:
            images = images[:, None]
        if images.ndim != 5:
            raise ValueError(f"images must be [B, N, H, W, 3], got {images.shape}")
        batch, count = images.shape[:2]
        states = self.vision_tower(images.reshape(batch * count, *images.shape[2:]))
        tokens = visual_tokens(states, self.vision_arch, self.vision_feature_select_strategy,
                               self.feature_layers).astype(self._dtype())
        if self.feature_posemb:
            tokens = self.media_posemb(tokens)
        if self.resampler is not None:
            tokens = self.perceiver(tokens)
        return tokens.reshape(batch, count * tokens.shape[1], tokens.shape[-1])

    def media_mask(self, tokens, num_images: int):
        return media_mask_from_tokens(tokens, self.image_token_id, num_images,
                                      self.end_of_chunk_id, self.only_attend_immediate_media)

    def embed(self, tokens):
        """Token embeddings [B, L, D]; added ids (>= the LM's vocabulary) read
        `additional_embed`."""
        vocab = self.language_model.vocab_size
        if not self.additional_vocab_size:
            return self.language_model.embed(tokens)
        added = tokens >= vocab
        base = self.language_model.embed(jnp.where(added, 0, tokens))
        rows = jnp.take(self.additional_embed.astype(base.dtype),
                        jnp.clip(tokens - vocab, 0, self.additional_vocab_size - 1), axis=0)
        return jnp.where(added[..., None], rows, base)

    def __call__(self, tokens, images=None, image_mask=None, *, segment_ids=None,
                 positions=None, cache=None, return_hidden=False):
        media = media_mask = None
        if images is not None:
            images = images if images.ndim == 5 else images[:, None]
            media = self.image_features(images)
            num_images = images.shape[1]
            if image_mask is None:
                image_mask = self.media_mask(tokens, num_images)
            if image_mask.shape != (*tokens.shape, num_images):
                raise ValueError(f"image_mask has shape {image_mask.shape}; tokens {tokens.shape}"
                                 f" and {num_images} image(s) need {(*tokens.shape, num_images)}")
            per_image = media.shape[1] // num_images
            media_mask = jnp.repeat(image_mask.astype(bool), per_image, axis=-1)
        elif image_mask is not None:
            raise ValueError("image_mask without images")
        elif cache is not None and "media_mask" in cache:
            media_mask = self._generated_media_mask(tokens, cache["media_mask"])
        out = self.language_model(tokens, segment_ids=segment_ids, positions=positions,
                                  embeddings=self.embed(tokens), cache=cache, return_hidden=True,
                                  media=media, media_mask=media_mask)
        hidden, new_cache = (out, None) if cache is None else out
        result = hidden if return_hidden else self.logits(hidden)
        if cache is None:
            return result
        if media_mask is not None:  # what the next token will see
            ended = self.end_of_chunk_id is not None and (tokens[:, -1:] == self.end_of_chunk_id)
            new_cache["media_mask"] = media_mask[:, -1] & ~ended
        return result, new_cache

    def _generated_media_mask(self, tokens, carried):
        """[B, L, S] for tokens after the prompt (no new images): they see what the prompt's
        last token left (`carried`), as media_mask_from_tokens would: nothing after an end of
        chunk, and (immediate media) nothing after an image token, whose image does not exist."""
        blocked = jnp.zeros(tokens.shape, bool)
        if self.end_of_chunk_id is not None:
            ends = (tokens == self.end_of_chunk_id).astype(jnp.int32)
            blocked |= jnp.cumsum(ends, axis=1) - ends > 0
        if self.only_attend_immediate_media:
            blocked |= jnp.cumsum(tokens == self.image_token_id, axis=1) > 0
        return carried[:, None, :] & ~blocked[..., None]

    def logits(self, hidden):
        logits = self.language_model.logits(hidden)
        if self.additional_vocab_size:
            logits = jnp.concatenate([logits, self.additional_head(hidden)], axis=-1)
        return logits

    # --------------------------------------------------------------------------------- cache
    def init_cache(self, batch: int, max_length: int) -> dict:
        return Decoder(**self._llm_kwargs(), parent=None).init_cache(batch, max_length)

    @staticmethod
    def reorder_cache(cache: dict, rows) -> dict:
        return Decoder.reorder_cache(cache, rows)

    def cache_logical_axes(self) -> dict:
        return Decoder(**self._llm_kwargs(), parent=None).cache_logical_axes()

