"""BLIP-2 (Li et al. 2023): a Q-Former between a frozen image encoder and a frozen LLM.

Stage 2 is a `PrefixLM` (models/prefix_lm.py) with `projector="qformer"`: its projector is a
`QFormerProjector` (below) and the query outputs fill the LLM's image-token rows, one image token
per query (HF convention), so `model.apply(v, tokens, images=images)`, the KV cache and
generation are the PrefixLM's. HF's Blip2ForConditionalGeneration maps onto it as
  vision_model (its encoder)            -> vision/            (the frozen tower; its hidden
                                                               states of vision_feature_layer -1)
  vision_model.post_layernorm           -> projector/ln_vision (LAVIS's ln_vision)
  query_tokens, qformer                 -> projector/qformer/
  language_projection                   -> projector/language_projection
  language_model                        -> llm/

Stage 1 is `Blip2Stage1`: the same tower and projector (without the language projection; the
Q-Former with its text embeddings and text FFNs), and the heads of the three objectives:
  ITC  encode_image: the L2-normalised vision_proj of each query output [B, Q, E];
       encode_text: text_proj of the text-only pass's first token [B, E]; the similarity of an
       image and a text is the max over the queries (losses.matching.similarity)
  ITM  itm_logits: the bidirectional pass ([queries; text] all see all), itm_head of each query
       output, averaged over the queries -> [B, 2] (class 1 = match)
  ITG  itg_hidden: the multimodal-causal pass (text sees the queries and earlier text; the first
       token is [DEC]), then BERT's prediction head (head_transform, head_norm, the tied word
       embeddings and lm_bias; head_inputs)
A stage-1 run's `vision/` and `projector/` are a stage-2 model's (the text parts are dropped).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models import layers
from vlmjax.models.blip import TEMPERATURE_RANGE, kernel_init
from vlmjax.models.prefix_lm import (check_select_strategy, vision_kwargs, visual_tokens)
from vlmjax.models.qformer import QFormer
from vlmjax.models.two_towers import IMAGE_TOWERS, build_tower, l2_normalize

VISION_NORMS = ("none", "layernorm")


def _dense(features, name, dtype, in_axis="embed", out_axis=None, std=0.02, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    name=name, kernel_init=layers.partitioned(nn.initializers.normal(std),
                                                              (in_axis, out_axis)),
                    bias_init=layers.partitioned(nn.initializers.zeros, (out_axis,)))


class QFormerProjector(nn.Module):
    """Visual tokens [B, T, Dv] -> the Q-Former's query outputs [B, Q, Dq] (`width` None) or
    their projection to an LLM of width `width` [B, Q, width] (`language_projection`).
    `norm` 'layernorm' first normalises the tokens (`ln_vision`, eps `vision_norm_eps`: the
    tower's norm_eps): BLIP-2 feeds the Q-Former a LayerNorm of the frozen tower's last states."""
    qformer: Mapping[str, Any]
    width: int | None = None
    norm: str = "layernorm"
    vision_norm_eps: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        if self.norm not in VISION_NORMS:
            raise ValueError(f"Q-Former projector norm {self.norm!r} is not one of "
                             f"{VISION_NORMS}")
        if self.norm == "layernorm":
            self.ln_vision = layers.make_norm("layernorm", self.dtype, self.vision_norm_eps)
        self.qformer_module = QFormer(**{"dtype": self.dtype, **dict(self.qformer)},
                                      name="qformer")
        if self.width is not None:
            self.language_projection = nn.Dense(
                self.width, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))

    def normalize(self, visual):
        return self.ln_vision(visual) if self.norm == "layernorm" else visual

    def qformer_states(self, visual, tokens=None, text_mask=None, *, kind="bidirectional",
                       train=False):
        """The Q-Former on the normalised `visual` tokens (None: text only): (queries, text)."""
        image_embeds = None if visual is None else self.normalize(visual)
        return self.qformer_module(image_embeds, tokens, text_mask, kind=kind, train=train)

    def word_embeddings(self):
        return self.qformer_module.word_embeddings()

    def __call__(self, visual, *, train=False):
        queries, _ = self.qformer_states(visual, train=train)
        return queries if self.width is None else self.language_projection(queries)


def _vision_tower(module, vision, arch, feature_layers, strategy):
    """(tower, its kwargs): the image tower reading `feature_layers`, named `vision`."""
    if arch not in IMAGE_TOWERS:
        raise ValueError(f"vision_arch {arch!r} is not one of {sorted(IMAGE_TOWERS)}")
    kwargs = vision_kwargs(vision, arch, feature_layers, module.vision_dtype or module.dtype)
    tower = IMAGE_TOWERS[arch]
    build_tower(tower, kwargs, "model.vision")
    check_select_strategy(kwargs, arch, strategy)
    return tower(**kwargs, name="vision")


class Blip2Stage1(nn.Module):
    """BLIP-2's stage-1 model (module docstring). `vision` are the frozen tower's kwargs
    (`vision_arch` 'vit' | 'cnn'; PrefixLM's vision_feature_layer / select_strategy), `qformer`
    QFormer kwargs (text_input True), `embed_dim` the ITC space (BLIP-2: 256). `vision_dtype`
    runs the frozen tower in its own compute dtype (BLIP-2 keeps its frozen ViT in fp16)."""
    vision: Mapping[str, Any]
    qformer: Mapping[str, Any]
    vision_arch: str = "vit"
    vision_feature_layer: int | Sequence[int] = -1
    vision_feature_select_strategy: str = "full"
    projector_norm: str = "layernorm"
    embed_dim: int = 256
    temperature_init: float = 0.07
    dtype: Any = jnp.float32
    vision_dtype: Any = None       # the frozen tower's compute dtype (None: dtype), e.g. bf16

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (int(layer),) if isinstance(layer, (int, np.integer)) else tuple(map(int, layer))

    def setup(self):
        qformer = dict(self.qformer)
        if not qformer.get("text_input", True):
            raise ValueError("a stage-1 Q-Former reads text: model.qformer.text_input must be "
                             "True")
        self.vision_tower = _vision_tower(self, self.vision, self.vision_arch,
                                          self.feature_layers,
                                          self.vision_feature_select_strategy)
        self.projector = QFormerProjector(qformer, None, self.projector_norm,
                                          float(dict(self.vision).get("norm_eps", 1e-6)),
                                          dtype=self.dtype)
        width = int(qformer.get("width", QFormer.width))
        self.vision_proj = _dense(self.embed_dim, "vision_proj", self.dtype)
        self.text_proj = _dense(self.embed_dim, "text_proj", self.dtype)
        self.itm_head = _dense(2, "itm_head", self.dtype)
        scheme = qformer.get("init_scheme", "bert")
        self.head_transform = nn.Dense(
            width, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=kernel_init(scheme, ("embed",), ("mlp",)),
            bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))
        self.head_norm = layers.make_norm("layernorm", self.dtype,
                                          float(qformer.get("norm_eps", QFormer.norm_eps)))
        vocab = int(qformer.get("vocab_size", QFormer.vocab_size))
        self.lm_bias = self.param("lm_bias", layers.partitioned(nn.initializers.zeros,
                                                                ("vocab",)), (vocab,))
        self.temp = self.param("temp", nn.initializers.constant(self.temperature_init), ())
        self._activation = qformer.get("activation", QFormer.activation)

    # ------------------------------------------------------------------------------- features
    def image_features(self, images, *, train=False):
        """The frozen tower's visual tokens [B, T, Dv] (before ln_vision), in the compute
        dtype of the rest of the model."""
        del train  # the tower is frozen and runs deterministically
        states = self.vision_tower(images)
        return visual_tokens(states, self.vision_arch, self.vision_feature_select_strategy,
                             self.feature_layers).astype(self.dtype)

    def temperature(self):
        """The ITC temperature, clamped to BLIP's range; the gradient passes the clamp."""
        return self.temp + jax.lax.stop_gradient(jnp.clip(self.temp, *TEMPERATURE_RANGE)
                                                 - self.temp)

    def _embeds(self, images, image_embeds, train):
        return self.image_features(images, train=train) if image_embeds is None else image_embeds

    def encode_image(self, images, *, train=False, image_embeds=None):
        """L2-normalised ITC features of each query [B, Q, embed_dim]."""
        queries, _ = self.projector.qformer_states(self._embeds(images, image_embeds, train),
                                                   train=train)
        return l2_normalize(self.vision_proj(queries).astype(jnp.float32))

    def encode_text(self, tokens, text_mask=None, *, train=False):
        """L2-normalised ITC text features [B, embed_dim]: the text-only pass's first token."""
        _, text = self.projector.qformer_states(None, tokens, text_mask, kind="unimodal",
                                                train=train)
        return l2_normalize(self.text_proj(text[:, 0]).astype(jnp.float32))

    def itm_logits(self, images, tokens, text_mask=None, *, train=False, image_embeds=None):
        """[B, 2] ITM logits (class 1 = match): itm_head of each query output of the
        bidirectional pass, averaged over the queries."""
        queries, _ = self.projector.qformer_states(self._embeds(images, image_embeds, train),
                                                   tokens, text_mask, kind="bidirectional",
                                                   train=train)
        return jnp.mean(self.itm_head(queries).astype(jnp.float32), axis=1)

    def itg_hidden(self, image_embeds, tokens, text_mask=None, *, train=False):
        """The text states [B, L, width] of the multimodal-causal pass (ITG)."""
        _, text = self.projector.qformer_states(image_embeds, tokens, text_mask,
                                                kind="multimodal_causal", train=train)
        return text

    def head_inputs(self, hidden):
        """BERT's prediction head as (h [B, L, width + 1], kernel [width + 1, vocab]) with
        logits = h @ kernel: the bias rides as a unit of 1s (as BlipText.head_inputs)."""
        h = self.head_norm(layers.get_activation(self._activation)(self.head_transform(hidden)))
        kernel = self.projector.word_embeddings().T
        h = jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)
        return h, jnp.concatenate([kernel, self.lm_bias[None]], axis=0)

    def itg_logits(self, images, tokens, text_mask=None, *, train=False, image_embeds=None):
        """float32 [B, L, vocab] next-token logits of ITG."""
        hidden = self.itg_hidden(self._embeds(images, image_embeds, train), tokens, text_mask,
                                 train=train)
        h, kernel = self.head_inputs(hidden)
        return jnp.dot(h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)

    def init_all(self, images, tokens):
        """Touches every part (for `init`)."""
        embeds = self.image_features(images)
        return (self.encode_image(None, image_embeds=embeds), self.encode_text(tokens),
                self.temperature(), self.itm_logits(None, tokens, image_embeds=embeds),
                self.itg_logits(None, tokens, image_embeds=embeds))
