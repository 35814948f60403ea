"""BLIP-2's Q-Former (Li et al. 2023): learned queries that read a frozen image encoder.

One BERT-style post-norm transformer over the sequence [queries; text]:
- the queries (`num_query_tokens` learned embeddings) and the text (word + absolute position
  embeddings, positions 0..L-1) share each layer's self-attention, under one of the stage-1
  masks (`stage1_mask`);
- the query positions alone cross-attend to the image features in layers i with
  i % cross_attention_freq == 0;
- query and text positions have separate feed-forward sublayers (`query_ffn`, `text_ffn`).
One LayerNorm (`embed_norm`) normalises the whole embedded sequence, queries included: HF's
Blip2QFormerModel.layernorm, LAVIS's embeddings.LayerNorm. The image features enter as given
(BLIP-2 normalises them before the Q-Former: HF's vision post_layernorm, LAVIS's ln_vision).

`__call__(image_embeds, tokens=None, text_mask=None, kind=...)` -> (query states [B, Q, D] or
None, text states [B, L, D] or None). Queries only (`tokens=None`) is HF's Blip2QFormerModel;
text only (`image_embeds=None`) is its text pass (query_length=0). Under "unimodal" one joint
pass equals BLIP-2's separate query and text passes (ITC); "bidirectional" is ITM;
"multimodal_causal" is ITG (LAVIS feeds the text the queries' cached keys, which is the same).

A model without `text_input` (HF use_qformer_text_input false, BLIP-2's stage 2) has no text
embeddings or text FFN. `init` creates the text params only when called with tokens.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.blip import BertAttention, BertSettings
from vlmjax.sharding import constrain

MASK_KINDS = ("unimodal", "bidirectional", "multimodal_causal")
# BLIP-2 draws the query tokens and the text embeddings from N(0, 0.02) (BERT's
# initializer_range); HF's Blip2QFormerModel holds neither, so its loader draws them too.
EMBED_INIT_STD = 0.02
EMBEDDING_PARAMS = ("query_tokens", "token_embed/embedding", "pos_embedding")


def stage1_mask(kind: str, num_queries: int, text_mask) -> jnp.ndarray:
    """[B, 1, Q + L, Q + L] bool (True = attend) over [queries; text] for a stage-1 objective:
    "unimodal" (ITC): queries see queries, text sees text; "bidirectional" (ITM): all see all;
    "multimodal_causal" (ITG): queries see queries, text sees every query and the text up to
    itself. Padded text keys (`text_mask` [B, L] False) are never attended."""
    if kind not in MASK_KINDS:
        raise ValueError(f"Q-Former mask kind {kind!r} is not one of {MASK_KINDS}")
    batch, length = text_mask.shape
    is_query = jnp.arange(num_queries + length) < num_queries
    q_is_query, k_is_query = is_query[:, None], is_query[None, :]
    if kind == "unimodal":
        allowed = q_is_query == k_is_query
    elif kind == "bidirectional":
        allowed = jnp.ones_like(q_is_query & k_is_query)
    else:
        causal = jnp.tril(jnp.ones((len(is_query),) * 2, bool))
        allowed = jnp.where(q_is_query, k_is_query, k_is_query | causal)
    real_keys = jnp.concatenate([jnp.ones((batch, num_queries), bool),
                                 text_mask.astype(bool)], axis=1)
    return allowed[None, None] & real_keys[:, None, None, :]


class PostNormMLP(nn.Module):
    """BERT's feed-forward sublayer: LN(x + MLP(x))."""
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train=False):
        h = layers.MLP(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(x)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        x = layers.make_norm("layernorm", self.dtype, self.norm_eps, name="norm")(x + h)
        return constrain(x, layers.RESIDUAL_BLD)


class QFormerLayer(BertSettings):
    """Shared self-attention; cross-attention (queries only) if `has_cross_attention`; the
    query and text FFNs. `x` is [B, num_queries + L, D]."""
    has_cross_attention: bool = True
    text_input: bool = True

    def setup(self):
        mlp = dict(mlp_dim=self.mlp_dim, activation=self.activation, norm_eps=self.norm_eps,
                   dropout=self.dropout, dtype=self.dtype)
        self.self_attention = BertAttention(**self.attention_kwargs())
        if self.has_cross_attention:
            self.cross_attention = BertAttention(**self.attention_kwargs())
        self.query_ffn = PostNormMLP(**mlp)
        if self.text_input:
            self.text_ffn = PostNormMLP(**mlp)

    def __call__(self, x, mask, num_queries, image_embeds, *, train=False):
        x, _ = self.self_attention(x, mask, train=train)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        out = []
        if num_queries:
            if self.has_cross_attention:
                queries, _ = self.cross_attention(queries, None, image_embeds, train=train)
            out.append(self.query_ffn(queries, train=train))
        if text.shape[1]:
            out.append(self.text_ffn(text, train=train))
        return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]


class QFormer(nn.Module):
    """BLIP-2's Q-Former; the defaults are BLIP-2's (BERT-base, 32 queries)."""
    num_query_tokens: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_freq: int = 2
    text_input: bool = True        # text embeddings and text FFNs (stage 1)
    vocab_size: int = 30522
    max_len: int = 512
    activation: str = "gelu"
    norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_scheme: str = "bert"      # blip.INITS
    dtype: Any = jnp.float32

    def setup(self):
        if self.cross_attention_freq < 1:
            raise ValueError(f"Q-Former cross_attention_freq {self.cross_attention_freq} must "
                             "be >= 1")
        self.query_tokens = self.param("query_tokens", layers.partitioned(
            nn.initializers.normal(EMBED_INIT_STD), (None, None, "embed")),
            (1, self.num_query_tokens, self.width))
        if self.text_input:
            self.token_embed = nn.Embed(
                self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                embedding_init=layers.partitioned(nn.initializers.normal(EMBED_INIT_STD),
                                                  ("vocab", "embed")))
            self.pos_embedding = self.param(
                "pos_embedding", layers.partitioned(nn.initializers.normal(EMBED_INIT_STD),
                                                    (None, "embed")), (self.max_len, self.width))
        self.embed_norm = layers.make_norm("layernorm", self.dtype, self.norm_eps)
        self.embed_dropout = nn.Dropout(self.dropout)
        self.layer = [QFormerLayer(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation,
            norm_eps=self.norm_eps, dropout=self.dropout,
            attention_dropout=self.attention_dropout, init_scheme=self.init_scheme,
            dtype=self.dtype,
            has_cross_attention=i % self.cross_attention_freq == 0, text_input=self.text_input)
            for i in range(self.depth)]  # named layer_0 .. layer_{depth-1}

    def word_embeddings(self):
        """The text embedding table [vocab, width] (BLIP-2's ITG head ties its output to it)."""
        if not self.text_input:
            raise ValueError("this Q-Former has no text input (text_input=False)")
        return self.token_embed.embedding

    def _embed(self, batch, tokens, with_queries):
        parts = []
        if with_queries:
            parts.append(jnp.broadcast_to(self.query_tokens, (batch, *self.query_tokens.shape[1:])
                                          ).astype(self.dtype))
        if tokens is not None:
            if not self.text_input:
                raise ValueError("this Q-Former has no text input (text_input=False, HF "
                                 "use_qformer_text_input false): call it without tokens")
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"text length {tokens.shape[1]} exceeds the Q-Former max_len "
                                 f"{self.max_len}")
            parts.append(self.token_embed(tokens)
                         + self.pos_embedding[:tokens.shape[1]].astype(self.dtype))
        return self.embed_norm(jnp.concatenate(parts, axis=1))

    def __call__(self, image_embeds, tokens=None, text_mask=None, *, kind="bidirectional",
                 train=False):
        """`image_embeds` [B, N, encoder width] or None (text only); `tokens` int [B, L] or None
        (queries only); `text_mask` bool [B, L] (True = real token, default all); `kind` one of
        MASK_KINDS. -> (query states [B, Q, D] | None, text states [B, L, D] | None)."""
        if image_embeds is None and tokens is None:
            raise ValueError("the Q-Former needs image_embeds (queries), tokens (text) or both")
        with_queries = image_embeds is not None
        batch = (image_embeds if with_queries else tokens).shape[0]
        num_queries = self.num_query_tokens if with_queries else 0
        if tokens is None:
            text_mask = jnp.zeros((batch, 0), bool)
        elif text_mask is None:
            text_mask = jnp.ones(tokens.shape, bool)
        mask = stage1_mask(kind, num_queries, text_mask)
        x = self.embed_dropout(self._embed(batch, tokens, with_queries), deterministic=not train)
        x = constrain(x, layers.RESIDUAL_BLD)
        if with_queries:
            image_embeds = image_embeds.astype(self.dtype)
        for layer in self.layer:
            x = layer(x, mask, num_queries, image_embeds, train=train)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        return (queries if with_queries else None), (None if tokens is None else text)
