"""BLIP (Li et al. 2022): a ViT image encoder and one BERT-style text transformer in three modes.

  mode            first token  self-attention           cross-attention  head       objective
  text            [CLS] (bos)  bidirectional, encoder's  none             text_proj  ITC
  image-grounded  [ENC]        bidirectional, encoder's  image tokens     itm_head   ITM (+ MLM)
  decoder         [DEC]        causal, decoder's         image tokens     lm head    LM

As in BLIP, the encoder and the decoder share every parameter except their self-attention
sublayers (`share="all_but_self_attention"`: one `text_shared` transformer whose layers hold
`self_attention_encoder` and `self_attention_decoder`); `share="nothing"` gives each its own
transformer (`text_encoder`, `text_decoder`). `parts` names which halves exist: ("encoder",) is
HF's BlipForImageTextRetrieval, ("decoder",) its BlipForConditionalGeneration.

The text blocks are BERT's (post-norm): x = LN(x + Attn(x)); x = LN(x + CrossAttn(x, image));
x = LN(x + MLP(x)), after token + absolute position embeddings and a LayerNorm. The LM head is
BERT's prediction head (dense, activation, LayerNorm, then the tied word embeddings + a bias).
The image tokens are the ViT's last hidden states after its final LayerNorm (class token
first); the ITC image feature is vision_proj of the class token.

Captioning follows `vlmjax.inference.generate`'s model contract: `__call__(tokens, segment_ids=,
positions=, cache=, images= | image_embeds=)` -> (float32 logits, cache) through the decoder,
with a pure KV cache for its self-attention; the image tokens are given to every decode step
(`decode_inputs={"image_embeds": ...}`), their cross-attention keys are recomputed per step.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.convnet import ConvNet
from vlmjax.models.decoder import attention_mask as segment_attention_mask, segment_positions
from vlmjax.models.two_towers import l2_normalize
from vlmjax.models.vit import ViT
from vlmjax.sharding import constrain

SHARE = ("all_but_self_attention", "nothing")
IMAGE_ARCHS = ("vit", "cnn")
PARTS = ("encoder", "decoder")
# BLIP keeps its ITC temperature in [0.001, 0.5] (it clamps the parameter every step).
TEMPERATURE_RANGE = (0.001, 0.5)
CACHE_KV_AXES = ("act_batch", "act_heads", None, None)  # [B, H, S, K] per layer


# Kernel inits of the text transformer: BERT's normal(0.02), or variance 1 / fan_in. At BERT's
# width (768) both give the attention paths a similar gain; at a tiny width 0.02 leaves the
# cross-attention's contribution to the residual at ~1%, so an image-grounded head trained from
# scratch sits at its prior (models/blip tiny: ITM never left 67% with "bert").
INITS = ("bert", "fan_in")


def kernel_init(scheme: str, in_axes: tuple, out_axes: tuple):
    if scheme not in INITS:
        raise ValueError(f"BLIP text init_scheme {scheme!r} is not one of {INITS}")
    if scheme == "bert":
        base = nn.initializers.normal(0.02)
    else:
        # DenseGeneral initialises its kernel flattened to [fan_in, fan_out].
        base = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    return layers.partitioned(base, in_axes + out_axes)


def _dense_general(features, axis, in_axes, out_axes, dtype, name, init_scheme="bert"):
    return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32, name=name,
                           kernel_init=kernel_init(init_scheme, in_axes, out_axes),
                           bias_init=layers.partitioned(nn.initializers.zeros, out_axes))


class _Kernel(nn.Module):
    """A bare weight matrix `kernel` (the untied LM head's output, read as [width, vocab])."""
    shape: tuple[int, int]
    axes: tuple[str, str]

    @nn.compact
    def __call__(self):
        return self.param("kernel", layers.partitioned(nn.initializers.normal(0.02), self.axes),
                          self.shape)


class BertAttention(nn.Module):
    """BERT's attention sublayer, post-norm: LN(x + Out(Attn(x -> kv))). Self-attention when
    `kv` is None (with an optional KV cache [B, H, S, K] written at `index`), else
    cross-attention to `kv` (whose width may differ: BLIP's image tokens)."""
    num_heads: int
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_scheme: str = "bert"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, kv=None, *, train=False, kv_cache=None, index=None):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"text width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads
        src = x if kv is None else kv

        def proj(name, inputs):
            dense = _dense_general((self.num_heads, head_dim), -1, ("embed",),
                                   ("heads", "head_dim"), self.dtype, name, self.init_scheme)
            return constrain(dense(inputs), layers.HEADS_BLHK)

        q, k, v = proj("query", x), proj("key", src), proj("value", src)
        layout = "BSHK"
        if kv_cache is not None:
            kv_cache = {n: jax.lax.dynamic_update_slice(
                kv_cache[n], new.transpose(0, 2, 1, 3).astype(kv_cache[n].dtype),
                (0, 0, index, 0)) for n, new in (("k", k), ("v", v))}
            k, v, layout = kv_cache["k"], kv_cache["v"], "BHSK"
        rng = self.make_rng("dropout") if train and self.attention_dropout > 0 else None
        h = layers.dot_product_attention(q, k, v, mask, kv_layout=layout, dropout_rng=rng,
                                         dropout_rate=self.attention_dropout if train else 0.0)
        h = _dense_general(width, (-2, -1), ("heads", "head_dim"), ("embed",), self.dtype,
                           "out", self.init_scheme)(constrain(h, layers.HEADS_BLHK))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        x = layers.make_norm("layernorm", self.dtype, self.norm_eps, name="norm")(x + h)
        return constrain(x, layers.RESIDUAL_BLD), kv_cache


class BertSettings(nn.Module):
    """The fields of a BERT-style (post-norm) layer: BLIP's text layers and BLIP-2's Q-Former
    layers declare them through this class."""
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_scheme: str = "bert"      # INITS (not `init`: that would hide Module.init)
    dtype: Any = jnp.float32

    def attention_kwargs(self) -> dict:
        return dict(num_heads=self.num_heads, norm_eps=self.norm_eps, dropout=self.dropout,
                    attention_dropout=self.attention_dropout, init_scheme=self.init_scheme,
                    dtype=self.dtype)


class BertLayer(BertSettings):
    """One BLIP text layer: a self-attention per mode (`self_attentions`), a shared
    cross-attention to the image tokens (skipped without `image_embeds`) and a post-norm MLP."""
    self_attentions: tuple[str, ...] = PARTS

    def setup(self):
        kwargs = self.attention_kwargs()
        # A dict attribute names its modules self_attention_{part}.
        self.self_attention = {part: BertAttention(**kwargs) for part in self.self_attentions}
        self.cross_attention = BertAttention(**kwargs)
        self.mlp = layers.MLP(self.mlp_dim, self.activation, dtype=self.dtype)
        self.mlp_dropout = nn.Dropout(self.dropout)
        self.mlp_norm = layers.make_norm("layernorm", self.dtype, self.norm_eps)

    # train positional: remat's static argument (BlipText's remat)
    def __call__(self, x, mask, part, image_embeds=None, train=False, *, kv_cache=None,
                 index=None):
        x, kv_cache = self.self_attention[part](x, mask, train=train, kv_cache=kv_cache,
                                                index=index)
        if image_embeds is not None:
            x, _ = self.cross_attention(x, None, image_embeds, train=train)
        h = self.mlp_dropout(self.mlp(x), deterministic=not train)
        return constrain(self.mlp_norm(x + h), layers.RESIDUAL_BLD), kv_cache


class BlipText(nn.Module):
    """BERT-style text transformer with cross-attention; `parts` picks its self-attentions.
    `__call__` returns the last hidden states [B, L, width] (and the KV cache when given one).

    The layers are `layer_0 .. layer_{depth-1}` (the layout the converters read and write), or
    with `scan_layers=True` one `layer_scan` run under `nn.scan`, every parameter with a leading
    [depth] axis (compile time flat in depth; `vlmjax.models.scan_layout` converts between the
    two). A scanned transformer takes no KV cache: decode unrolled with the same params after
    `scan_layout.to_unrolled`."""
    vocab_size: int = 30524
    max_len: int = 512
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None     # default 4 * width
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    parts: tuple[str, ...] = PARTS
    tie_word_embeddings: bool = True
    init_scheme: str = "bert"      # INITS: the attention and head kernels' init
    remat: str = "none"            # layers.REMAT_POLICIES: recompute each layer in the backward
    scan_layers: bool = False      # nn.scan over the layers (param `layer_scan`)
    dtype: Any = jnp.float32

    def setup(self):
        self.token_embed = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
            embedding_init=layers.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.pos_embedding = self.param("pos_embedding", layers.partitioned(
            nn.initializers.normal(0.02), (None, "embed")), (self.max_len, self.width))
        self.embed_norm = layers.make_norm("layernorm", self.dtype, self.norm_eps)
        self.embed_dropout = nn.Dropout(self.dropout)
        # A remat layer takes no KV cache (decoding needs no backward).
        layer_cls = BertLayer
        if self.remat != "none":
            # Under scan the loop already keeps XLA from merging the recomputation into the
            # forward pass, so CSE prevention would only cost (as layers.Encoder).
            layer_cls = nn.remat(BertLayer, policy=layers.remat_policy(self.remat),
                                 prevent_cse=not self.scan_layers,
                                 static_argnums=(3, 5))  # part, train
        layer_kwargs = dict(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
            activation=self.activation, norm_eps=self.norm_eps, dropout=self.dropout,
            attention_dropout=self.attention_dropout, init_scheme=self.init_scheme,
            dtype=self.dtype, self_attentions=tuple(self.parts))
        if self.scan_layers:
            self.layer_scan = layer_cls(**layer_kwargs)  # run by _scanned under nn.scan
        else:
            self.layer = [layer_cls(**layer_kwargs) for _ in range(self.depth)]  # layer_0 ..
        if "decoder" in self.parts:  # BERT's prediction head (the LM and MLM logits)
            self.head_transform = nn.Dense(
                self.width, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=kernel_init(self.init_scheme, ("embed",), ("mlp",)),
                bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))
            self.head_norm = layers.make_norm("layernorm", self.dtype, self.norm_eps)
            self.lm_bias = self.param("lm_bias", layers.partitioned(nn.initializers.zeros,
                                                                    ("vocab",)),
                                      (self.vocab_size,))
            if not self.tie_word_embeddings:
                self.lm_out = _Kernel((self.width, self.vocab_size), ("embed", "vocab"))

    def _check(self, part, length):
        if part not in self.parts:
            raise ValueError(f"this BLIP text transformer has no {part} (its parts: "
                             f"{tuple(self.parts)}); set model.parts to include it")
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the text max_len {self.max_len}")

    def _scanned(self, x, mask, part, image_embeds, train):
        """The layers as one nn.scan over `layer_scan`; `part` and `train` are Python values,
        so the body closes over them (with the mask and image tokens) instead of scanning
        them."""
        def body(layer, carry, _):
            carry, _ = layer(carry, mask, part, image_embeds, train)
            return carry, None

        return layers.scan_over_layers(body, self.depth)(self.layer_scan, x, None)[0]

    def __call__(self, tokens, mask, part, image_embeds=None, *, positions=None, train=False,
                 cache=None, index=None):
        """`mask` [B, 1, L, S] bool (True = attend); `positions` [B, L] (default 0..L-1)."""
        self._check(part, tokens.shape[1])
        if cache is not None and self.scan_layers:
            raise ValueError("a BLIP text transformer with scan_layers takes no KV cache: "
                             "decode with scan_layers=False and the params after "
                             "vlmjax.models.scan_layout.to_unrolled")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.token_embed(tokens) + jnp.take(self.pos_embedding, positions, axis=0).astype(
            self.dtype)
        x = self.embed_dropout(self.embed_norm(x), deterministic=not train)
        x = constrain(x, layers.RESIDUAL_BLD)
        if image_embeds is not None:
            image_embeds = image_embeds.astype(self.dtype)
        if cache is None:
            if self.scan_layers:
                return self._scanned(x, mask, part, image_embeds, train)
            for layer in self.layer:
                x, _ = layer(x, mask, part, image_embeds, train)
            return x
        if self.remat != "none":
            raise ValueError("a BLIP text transformer with remat takes no KV cache: decode "
                             "with remat='none' (the params are the same)")
        new_cache = []
        for i, layer in enumerate(self.layer):
            layer_cache = {n: cache[n][i] for n in ("k", "v")}
            x, layer_cache = layer(x, mask, part, image_embeds, train, kv_cache=layer_cache,
                                   index=index)
            new_cache.append(layer_cache)
        return x, {n: tuple(c[n] for c in new_cache) for n in ("k", "v")}

    def head_inputs(self, hidden):
        """The prediction head as (h [B, L, width + 1], kernel [width + 1, vocab]) with
        logits = h @ kernel: the transformed states with a unit of 1s, whose kernel row is the
        head's bias, so losses.lm's chunked cross-entropy computes it unchanged."""
        h = layers.get_activation(self.activation)(self.head_transform(hidden))
        h = self.head_norm(h)
        kernel = (self.token_embed.embedding.T if self.tie_word_embeddings
                  else self.lm_out())
        h = jnp.concatenate([h, jnp.ones((*h.shape[:-1], 1), h.dtype)], axis=-1)
        return h, jnp.concatenate([kernel, self.lm_bias[None]], axis=0)

    def logits(self, hidden):
        """float32 [B, L, vocab] of the prediction head."""
        h, kernel = self.head_inputs(hidden)
        logits = jnp.dot(h, kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def text_kwargs(text: Mapping[str, Any] | None, parts, dtype) -> dict:
    return {**dict(text or {}), "parts": tuple(parts), "dtype": dtype}


class Blip(nn.Module):
    """BLIP: `image` are the image tower's kwargs, `text` BlipText kwargs; `embed_dim` the ITC
    space; `share` and `parts` as in the module docstring. `image_arch` 'vit' (BLIP's: the
    ViT's tokens with a class token) or 'cnn' (convnet.ConvNet, the tiny SigLIP recipe's tower,
    which sees shape: its last feature map's positions as tokens, after one token that is their
    max over positions, the CNN's own pooling, in the class token's place)."""
    image: Mapping[str, Any] | None = None
    text: Mapping[str, Any] | None = None
    image_arch: str = "vit"
    embed_dim: int = 256
    share: str = "all_but_self_attention"
    parts: tuple[str, ...] = PARTS
    temperature_init: float = 0.07
    dtype: Any = jnp.float32

    def setup(self):
        if self.share not in SHARE:
            raise ValueError(f"BLIP share {self.share!r} is not one of {SHARE}")
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"BLIP parts {tuple(self.parts)} must be a non-empty subset of "
                             f"{PARTS}")
        if self.image_arch not in IMAGE_ARCHS:
            raise ValueError(f"BLIP image_arch {self.image_arch!r} is not one of {IMAGE_ARCHS}")
        if self.image_arch == "cnn":
            self.vision = ConvNet(**{**dict(self.image or {}), "pool": "none",
                                     "dtype": self.dtype})
        else:
            self.vision = ViT(**{**dict(self.image or {}), "pool": "none", "class_token": True,
                                 "dtype": self.dtype})
        if self.share == "all_but_self_attention":
            self.text_shared = BlipText(**text_kwargs(self.text, self.parts, self.dtype))
        else:
            for part in self.parts:
                setattr(self, f"text_{part}",
                        BlipText(**text_kwargs(self.text, (part,), self.dtype)))
        if "encoder" in self.parts:
            def proj():
                return nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=layers.partitioned(
                                    nn.initializers.normal(0.02), ("embed", None)))
            self.vision_proj, self.text_proj = proj(), proj()
            self.itm_head = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32,
                                     kernel_init=layers.partitioned(nn.initializers.normal(0.02),
                                                                    ("embed", None)))
            self.temp = self.param("temp", nn.initializers.constant(self.temperature_init), ())

    # ---------------------------------------------------------------------------------- parts
    def _tower(self, part):
        if part not in self.parts:
            raise ValueError(f"this BLIP model has no text {part} (model.parts = "
                             f"{tuple(self.parts)})")
        return self.text_shared if self.share == "all_but_self_attention" else getattr(
            self, f"text_{part}")

    def image_features(self, images, *, train=False):
        """The image tokens [B, 1 + patches, vision width] (class token first, final norm; a
        CNN: its feature map's max over positions first, then the positions row-major)."""
        if self.image_arch == "vit":
            return self.vision(images, train=train)
        grid = self.vision(images)
        tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        return jnp.concatenate([jnp.max(tokens, axis=1, keepdims=True), tokens], axis=1)

    def temperature(self):
        """BLIP's ITC temperature, clamped to TEMPERATURE_RANGE; the gradient passes the clamp
        (BLIP clamps the parameter in place, so it keeps learning at the bound)."""
        return self.temp + jax.lax.stop_gradient(jnp.clip(self.temp, *TEMPERATURE_RANGE)
                                                 - self.temp)

    def encode_image(self, images, *, train=False, image_embeds=None):
        """L2-normalised ITC image features [B, embed_dim] (from `image_embeds` if given)."""
        if image_embeds is None:
            image_embeds = self.image_features(images, train=train)
        return l2_normalize(self.vision_proj(image_embeds[:, 0]).astype(jnp.float32))

    def encode_text(self, tokens, text_mask=None, *, train=False):
        """L2-normalised ITC text features [B, embed_dim]: the unimodal encoder's first token."""
        hidden = self._tower("encoder")(tokens, _key_mask(tokens, text_mask), "encoder",
                                        train=train)
        return l2_normalize(self.text_proj(hidden[:, 0]).astype(jnp.float32))

    def grounded_text(self, image_embeds, tokens, text_mask=None, *, train=False):
        """The image-grounded encoder's hidden states [B, L, width] (bidirectional)."""
        return self._tower("encoder")(tokens, _key_mask(tokens, text_mask), "encoder",
                                      image_embeds, train=train)

    def itm_logits(self, images, tokens, text_mask=None, *, train=False, image_embeds=None):
        """[B, 2] image-text matching logits (class 1 = match) from the first token, which
        BLIP sets to [ENC]."""
        if image_embeds is None:
            image_embeds = self.image_features(images, train=train)
        hidden = self.grounded_text(image_embeds, tokens, text_mask, train=train)
        return self.itm_head(hidden[:, 0]).astype(jnp.float32)

    def mlm_logits(self, images, tokens, text_mask=None, *, train=False, image_embeds=None):
        """[B, L, vocab] masked-LM logits of the image-grounded encoder, through the shared
        prediction head (needs both parts: the head is the decoder's)."""
        if image_embeds is None:
            image_embeds = self.image_features(images, train=train)
        hidden = self.grounded_text(image_embeds, tokens, text_mask, train=train)
        return self._tower("decoder").logits(hidden)

    def decoder_hidden(self, image_embeds, tokens, text_mask=None, *, train=False):
        """The image-grounded decoder's hidden states [B, L, width] (causal)."""
        mask = _key_mask(tokens, text_mask) & layers.causal_mask(tokens.shape[1])
        return self._tower("decoder")(tokens, mask, "decoder", image_embeds, train=train)

    def head_inputs(self, hidden):
        """The decoder's prediction head as (h, kernel) with logits = h @ kernel (BlipText)."""
        return self._tower("decoder").head_inputs(hidden)

    def caption_logits(self, images, tokens, text_mask=None, *, train=False, image_embeds=None):
        """[B, L, vocab] next-token logits of the image-grounded decoder (causal; the first
        token is BLIP's [DEC])."""
        if image_embeds is None:
            image_embeds = self.image_features(images, train=train)
        hidden = self.decoder_hidden(image_embeds, tokens, text_mask, train=train)
        return self._tower("decoder").logits(hidden)

    def init_all(self, images, tokens):
        """Touches every part (for `init`): image features, ITC, ITM and the decoder."""
        image_embeds = self.image_features(images)
        out = {}
        if "encoder" in self.parts:
            out["itc"] = (self.encode_image(None, image_embeds=image_embeds),
                          self.encode_text(tokens), self.temperature())
            out["itm"] = self.itm_logits(None, tokens, image_embeds=image_embeds)
        if "decoder" in self.parts:
            out["lm"] = self.caption_logits(None, tokens, image_embeds=image_embeds)
        return out

    # ------------------------------------------------------------------ generation (decoder)
    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None, images=None,
                 image_embeds=None):
        """Decoder logits in `vlmjax.inference.generate`'s contract: -> logits (no cache) or
        (logits, cache). Padding is segment 0; positions default to 0.. per row's segment."""
        if image_embeds is None:
            if images is None:
                raise ValueError("BLIP captioning needs images or image_embeds")
            image_embeds = self.image_features(images)
        batch, length = tokens.shape
        segment_ids = (jnp.ones((batch, length), jnp.int32) if segment_ids is None
                       else segment_ids.astype(jnp.int32))
        if positions is None:
            if cache is not None:
                raise ValueError("a cached call needs explicit positions")
            positions = segment_positions(segment_ids)
        decoder = self._tower("decoder")
        slots = jnp.arange(length)
        if cache is None:
            mask = segment_attention_mask(segment_ids, segment_ids, slots, slots)
            return decoder.logits(decoder(tokens, mask, "decoder", image_embeds,
                                          positions=positions))
        index = cache["index"]
        k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, index))
        mask = segment_attention_mask(segment_ids, k_segments, index + slots,
                                      jnp.arange(k_segments.shape[1]))
        hidden, kv = decoder(tokens, mask, "decoder", image_embeds, positions=positions,
                             cache=cache, index=index)
        return decoder.logits(hidden), {**kv, "segment_ids": k_segments,
                                        "index": index + length}

    def init_cache(self, batch: int, max_length: int) -> dict:
        text = BlipText(**text_kwargs(self.text, self.parts, self.dtype), parent=None)
        shape = (batch, text.num_heads, max_length, text.width // text.num_heads)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(text.depth))
        return {"k": zeros, "v": jax.tree.map(jnp.zeros_like, zeros),
                "segment_ids": jnp.zeros((batch, max_length), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    @staticmethod
    def reorder_cache(cache: dict, rows) -> dict:
        return {"k": tuple(x[rows] for x in cache["k"]), "v": tuple(x[rows] for x in cache["v"]),
                "segment_ids": cache["segment_ids"][rows], "index": cache["index"]}

    @staticmethod
    def cache_logical_axes() -> dict:
        return {"k": CACHE_KV_AXES, "v": CACHE_KV_AXES, "segment_ids": ("act_batch", None),
                "index": ()}


def _key_mask(tokens, text_mask):
    """[B, 1, 1, L]: every query attends to the real tokens (BERT masks keys only)."""
    if text_mask is None:
        text_mask = jnp.ones(tokens.shape, bool)
    return text_mask.astype(bool)[:, None, None, :]
