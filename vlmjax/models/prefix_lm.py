"""PrefixLM (LLaVA, PaliGemma-style): projected image features in place of image tokens of a
decoder LLM.

    model = PrefixLM(vision=vit_kwargs, llm=decoder_kwargs, image_token_id=32000)
    logits = model.apply(v, tokens, images=images)            # float32 [B, L, V]
    cache = model.init_cache(batch, max_length)
    logits, cache = model.apply(v, prompt, images=images, segment_ids=m, positions=p, cache=cache)
    logits, cache = model.apply(v, next_tokens, segment_ids=..., positions=..., cache=cache)

Vision tower: a vlmjax image tower, `vision_arch` 'vit' (ViT; `vision`: its keyword arguments,
e.g. the `model.image` of a SigLIP / CLIP config, or a ViT module whose fields are taken) or 'cnn'
(convnet.ConvNet, the tiny SigLIP demo's tower: its feature maps, row-major, are the visual
tokens), under `vision/` in its own layout, so an image tower's params drop in (the blocks or
stages after the deepest feature layer, the final norm and the pooling head are not built: leave
them out). Its features are the hidden states `vision_feature_layer` (HF's `hidden_states` index:
-2 is LLaVA's penultimate layer; a list: those layers concatenated on the feature axis, which
for a CNN must share one grid), then `vision_feature_select_strategy`: `default` drops the class
token (the tower must have one), `full` keeps every token.

Projector (`projector/`): `linear` (one Dense, `linear_1`) or `mlp{N}x_gelu` (N Dense layers
`linear_1` .. `linear_N` with exact GELU between them; LLaVA-1.5 is mlp2x_gelu), to the LLM's
width, with biases (`projector_bias`). `projector_posemb` adds a learned vector per visual token
position (`projector/posemb` [T, D]): a ViT's tokens carry their position in their features, a
CNN's do not (convolutions are translation-equivariant), and the LLM would otherwise have only
RoPE offsets to tell "the star on the left" from the one on the right. `projector_norm`
'instance' first standardises each feature channel over the image's tokens (instance
normalisation): what is the same all over the image (the background's texture) goes, and what
sets one token apart (the object on it: its colour, its shape) becomes as large as the rest;
'layernorm' is a LayerNorm of the tokens (`projector/ln_vision`, BLIP-2's ln_vision over the
frozen tower's last states). HF LLaVA has none of them.

`projector="qformer"` is BLIP-2's stage 2 (models/blip2.py): `qformer` holds the Q-Former's
kwargs (models/qformer.py; its text input is dropped), the projector is a
blip2.QFormerProjector (`projector/ln_vision` under projector_norm 'layernorm',
`projector/qformer`, `projector/language_projection`) and an image gives num_query_tokens
visual tokens.

LLM (`llm/`): vlmjax.models.decoder.Decoder with the keyword arguments `llm`.

Images: float32 [B, H, W, 3], or [B, N, H, W, 3] for several per sample, normalised as the tower
expects. `tokens` hold `image_token_id` once per visual token (HF convention: T tokens per image,
T = the tower's tokens after the select strategy); a row's image tokens take the row's visual
tokens in order: image 0's T tokens, then image 1's. A row may hold fewer images' tokens than it
has images (text-only samples of a mixed batch hold none: their images are padding), but only
whole images: a count that is not a multiple of T, or more than the row's N*T, is an error
(ValueError naming both counts when the tokens are concrete; under jit, where the counts are not
known while tracing, that row's logits are NaN, never a silent misalignment).

Attention over the prefix (`prefix_attention`): `causal` (LLaVA) or `full` (PaliGemma: the
prefix, image + prompt, attends bidirectionally; the answer stays causal). `full` reads
`prefix_mask` bool [B, L] (True on the prefix tokens) for an uncached call; with a cache and no
`prefix_mask`, the first call's (the prompt's) real tokens are the prefix and later calls are
causal, which is what generation needs.

KV cache: `init_cache`, `reorder_cache`, `cache_logical_axes` are the Decoder's; images go only
to the call that holds their tokens (the prefill), after which their features live in the cache
(vlmjax.inference.generate).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models import layers
from vlmjax.models.decoder import Decoder
from vlmjax.models.two_towers import IMAGE_TOWERS, build_tower
from vlmjax.models.vit import ViT

SELECT_STRATEGIES = ("default", "full")
PROJECTOR_NORMS = ("none", "instance", "layernorm")
PREFIX_ATTENTION = ("causal", "full")
_MLP_PROJECTOR = re.compile(r"mlp(\d+)x_gelu")


def projector_depth(projector: str) -> int:
    """Dense layers of a projector name: 'linear' -> 1, 'mlp{N}x_gelu' -> N."""
    if projector == "linear":
        return 1
    match = _MLP_PROJECTOR.fullmatch(projector)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"projector {projector!r} is not 'linear' or 'mlp{{N}}x_gelu' (N >= 1, "
                         "e.g. 'mlp2x_gelu')")
    return int(match.group(1))


def instance_standardize(x, eps: float = 1e-6):
    """[..., T, C] -> each channel standardised over the T tokens of its image (zero mean, unit
    variance; a channel constant over the image becomes 0)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-2, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-2, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class Projector(nn.Module):
    """[B, T, Dv] -> [B, T, D]: (with `norm` 'instance', each input channel standardised over the
    image's tokens), `linear_1`, then GELU + `linear_{i}` for each further layer; with `posemb`,
    plus a learned `posemb` [T, D] (one vector per visual token position)."""
    width: int
    depth: int = 2
    use_bias: bool = True
    posemb: bool = False
    norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.norm == "instance":
            x = instance_standardize(x)
        elif self.norm == "layernorm":
            x = layers.make_norm("layernorm", self.dtype, 1e-6, name="ln_vision")(x)
        for i in range(self.depth):
            if i:
                x = layers.get_activation("gelu")(x)
            x = nn.Dense(self.width, use_bias=self.use_bias, dtype=self.dtype,
                         param_dtype=jnp.float32, name=f"linear_{i + 1}",
                         kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                                        (None, "embed")),
                         bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(x)
        if self.posemb:
            posemb = self.param("posemb", layers.partitioned(
                nn.initializers.normal(0.02), (None, "embed")), x.shape[-2:], jnp.float32)
            x = x + posemb.astype(x.dtype)
        return x


def vision_kwargs(vision: Mapping[str, Any], arch: str, feature_layers: tuple[int, ...],
                  dtype) -> dict:
    """The image tower's keyword arguments for reading the hidden states `feature_layers`
    (HF's hidden_states indices) of a `vision` config (a CNN: its feature maps)."""
    kwargs = dict(vision)
    if arch == "cnn":
        if kwargs.get("pool", "none") != "none" or kwargs.get("return_layers") is not None:
            raise ValueError("model.vision: a model reading a CNN tower's feature maps takes "
                             "no pool or return_layers; leave them out")
        kwargs.pop("pool", None)
        return {"dtype": dtype, **kwargs, "pool": "none", "return_layers": feature_layers}
    if kwargs.get("output_layer") is not None:
        raise ValueError("model.vision.output_layer is set: the layers read are "
                         "vision_feature_layer")
    kwargs.pop("output_layer", None)
    return {"dtype": dtype, **kwargs, "return_layers": feature_layers}


def check_select_strategy(vision: Mapping[str, Any], arch: str, strategy: str) -> None:
    """ValueError unless `strategy` is known and, for 'default', the tower has a class token."""
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not one of "
                         f"{SELECT_STRATEGIES}")
    has_cls = vision.get("class_token")
    if has_cls is None:
        has_cls = arch == "vit" and vision.get("pool", "map") == "cls"
    if strategy == "default" and not has_cls:
        raise ValueError("vision_feature_select_strategy 'default' drops the class token, "
                         "and this vision tower has none (class_token / pool='cls'): use "
                         "'full'")


def visual_tokens(states, arch: str, strategy: str, feature_layers) -> jnp.ndarray:
    """A tower's `return_layers` outputs -> its visual tokens [b, T, C]: a CNN's feature maps
    row-major, the class token dropped under 'default', the layers concatenated on C."""
    if arch == "cnn":  # feature maps [b, h, w, C] -> tokens [b, h * w, C]
        grids = {s.shape[1:3] for s in states}
        if len(grids) > 1:
            raise ValueError(f"vision_feature_layer {list(feature_layers)} picks CNN "
                             f"feature maps of different sizes {sorted(grids)}; the "
                             "layers concatenated must share one grid")
        states = [s.reshape(s.shape[0], -1, s.shape[-1]) for s in states]
    if strategy == "default":
        states = [s[:, 1:] for s in states]
    return jnp.concatenate(states, axis=-1)


def _module_fields(module) -> dict:
    """The constructor fields of a (config-only) module instance, without parent and name."""
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class ReadsVisionFeatures:
    """What the models that read a vision tower's features (PrefixLM, FusionLM) share: `vision`
    given as a tower instance becomes its fields, the compute dtype, the feature layers."""

    def __post_init__(self):
        if isinstance(self.vision, nn.Module):  # a tower instance: its fields are the config
            object.__setattr__(self, "vision", _module_fields(self.vision))
        super().__post_init__()

    def _dtype(self):
        return layers.DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (int(layer),) if isinstance(layer, (int, np.integer)) else tuple(map(int, layer))


class PrefixLM(ReadsVisionFeatures, nn.Module):
    vision: Mapping[str, Any] | ViT
    llm: Mapping[str, Any]
    image_token_id: int
    vision_arch: str = "vit"
    vision_feature_layer: int | Sequence[int] = -2
    vision_feature_select_strategy: str = "default"
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    projector_posemb: bool = False
    projector_norm: str = "none"
    prefix_attention: str = "causal"
    qformer: Mapping[str, Any] | None = None
    dtype: Any = jnp.float32

    # ------------------------------------------------------------------------------ structure
    def _vision_kwargs(self) -> dict:
        return vision_kwargs(self.vision, self.vision_arch, self.feature_layers, self.dtype)

    def _llm_kwargs(self) -> dict:
        return {"dtype": self.dtype, **dict(self.llm)}

    def _check(self):
        if self.vision_arch not in IMAGE_TOWERS:
            raise ValueError(f"vision_arch {self.vision_arch!r} is not one of "
                             f"{sorted(IMAGE_TOWERS)}")
        if self.projector_norm not in PROJECTOR_NORMS:
            raise ValueError(f"projector_norm {self.projector_norm!r} is not one of "
                             f"{PROJECTOR_NORMS}")
        if self.prefix_attention not in PREFIX_ATTENTION:
            raise ValueError(f"prefix_attention {self.prefix_attention!r} is not one of "
                             f"{PREFIX_ATTENTION}")
        if not self.feature_layers:
            raise ValueError("vision_feature_layer is an empty list")
        if (self.projector == "qformer") != (self.qformer is not None):
            raise ValueError("projector 'qformer' and the qformer kwargs (model.qformer) go "
                             f"together; got projector {self.projector!r} and qformer "
                             f"{'set' if self.qformer is not None else 'unset'}")
        if self.projector == "qformer" and (self.projector_posemb
                                            or self.projector_norm == "instance"):
            raise ValueError("projector 'qformer' takes no projector_posemb and no "
                             "projector_norm 'instance' (its norm is BLIP-2's ln_vision, "
                             "'layernorm')")

    def setup(self):
        self._check()
        vision = self._vision_kwargs()
        tower = IMAGE_TOWERS[self.vision_arch]
        build_tower(tower, vision, "model.vision")  # unknown keys: an error naming the valid ones
        self.vision_tower = tower(**vision, name="vision")
        check_select_strategy(vision, self.vision_arch, self.vision_feature_select_strategy)
        width = self._llm_kwargs()["width"]
        if self.projector == "qformer":
            from vlmjax.models.blip2 import QFormerProjector  # blip2 builds on this module
            self.mm_projector = QFormerProjector(
                {**dict(self.qformer), "text_input": False}, width,
                self.projector_norm, float(vision.get("norm_eps", 1e-6)),
                use_bias=self.projector_bias, dtype=self._dtype(), name="projector")
        else:
            self.mm_projector = Projector(width, projector_depth(self.projector),
                                          self.projector_bias, self.projector_posemb,
                                          self.projector_norm, self._dtype(), name="projector")
        self.language_model = Decoder(**self._llm_kwargs(), name="llm")

    # ------------------------------------------------------------------------------- compute
    def image_features(self, images):
        """[B, H, W, 3] or [B, N, H, W, 3] -> projected visual tokens [B, N * T, D] (compute
        dtype), image by image."""
        if images.ndim == 4:
            images = images[:, None]
        if images.ndim != 5:
            raise ValueError(f"images must be [B, H, W, 3] or [B, N, H, W, 3], got "
                             f"{images.shape}")
        batch, count = images.shape[:2]
        states = self.vision_tower(images.reshape(batch * count, *images.shape[2:]))
        tokens = visual_tokens(states, self.vision_arch, self.vision_feature_select_strategy,
                               self.feature_layers)
        features = self.mm_projector(tokens.astype(self._dtype()))
        return features.reshape(batch, count * features.shape[1], features.shape[-1])

    def embed_inputs(self, tokens, images=None):
        """Token embeddings [B, L, D] with the visual tokens in the image-token rows, and a
        bool [B] that is True for rows whose image-token count is not whole images."""
        embeddings = self.language_model.embed(tokens)
        bad = jnp.zeros(tokens.shape[:1], bool)
        if images is None:
            return embeddings, bad
        features = self.image_features(images)  # [B, M, D]
        per_image = features.shape[1] // (1 if images.ndim == 4 else images.shape[1])
        is_image = tokens == self.image_token_id
        counts = jnp.sum(is_image, axis=1)
        if _is_concrete(counts):
            for row, count in enumerate(np.asarray(counts)):
                if count % per_image or count > features.shape[1]:
                    raise ValueError(
                        f"row {row} holds {int(count)} image tokens (image_token_id "
                        f"{self.image_token_id}), and its images give {features.shape[1]} "
                        f"visual tokens ({features.shape[1] // per_image} image(s) x "
                        f"{per_image}): the tokens must hold {per_image} per image "
                        "(HF convention: one image token per visual token)")
        bad = (counts % per_image != 0) | (counts > features.shape[1])
        rank = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        visual = jnp.take_along_axis(features, rank[..., None], axis=1)
        embeddings = jnp.where(is_image[..., None], visual.astype(embeddings.dtype), embeddings)
        return layers.constrain(embeddings, layers.RESIDUAL_BLD), bad

    def __call__(self, tokens, images=None, *, segment_ids=None, positions=None, cache=None,
                 prefix_mask=None, return_hidden=False):
        embeddings, bad = self.embed_inputs(tokens, images)
        if self.prefix_attention == "causal" and prefix_mask is not None:
            raise ValueError("prefix_mask is given, and prefix_attention is 'causal': set "
                             "prefix_attention='full' for a bidirectional prefix")
        if self.prefix_attention == "full" and prefix_mask is None:
            if cache is None:
                raise ValueError("prefix_attention 'full' needs prefix_mask [B, L] (True on the "
                                 "image + prompt tokens) for a call without a cache")
            real = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids != 0
            prefix_mask = real & (cache["index"] == 0)  # the prompt: the first cached call
        out = self.language_model(tokens, segment_ids=segment_ids, positions=positions,
                                  embeddings=embeddings, cache=cache, prefix_mask=prefix_mask,
                                  return_hidden=return_hidden)
        logits, new_cache = (out, None) if cache is None else out
        logits = jnp.where(bad[:, None, None], jnp.nan, logits)
        return logits if cache is None else (logits, new_cache)

    # --------------------------------------------------------------------------------- cache
    def init_cache(self, batch: int, max_length: int) -> dict:
        return Decoder(**self._llm_kwargs(), parent=None).init_cache(batch, max_length)

    @staticmethod
    def reorder_cache(cache: dict, rows) -> dict:
        return Decoder.reorder_cache(cache, rows)

    def cache_logical_axes(self) -> dict:
        return Decoder(**self._llm_kwargs(), parent=None).cache_logical_axes()
