"""Decoder-only language models of the Llama / Qwen2 family, with a pure KV cache.

    model = Decoder(vocab_size, width, depth, num_heads, mlp_dim, num_kv_heads=..., ...)
    logits = model.apply(v, tokens)                          # float32 [B, L, V]
    hidden = model.apply(v, tokens, return_hidden=True)      # final-normed [B, L, D]

RMSNorm, RoPE (rope.py: default / linear / llama3, HF's rotate_half layout), SwiGLU, grouped-
query attention (`num_kv_heads`), explicit `head_dim`, optional q/k/v bias (Qwen2) and output
bias (`out_bias`: Llama's attention_bias=True biases q/k/v and o), tied or untied embeddings,
optional sliding window (a query attends to the `sliding_window` latest slots, itself
included, as HF's sliding attention). Parameters are float32 with logical axes;
`dtype` is the compute dtype.

OPT (the BLIP-2 LLM) is the same Decoder with `norm="layernorm"` (scale and bias),
`mlp="plain"` (down(act(up)): OPT's fc1/fc2, ReLU), `mlp_bias`, q/k/v and out biases, and
`position_embedding="learned"`: no RoPE; the row `positions + position_offset` (OPT: 2) of the
table `position_embed` [num_positions, D] is added to the input embeddings (token or given).

Sequences: `segment_ids` int32 [B, L] (0 = padding, 1..n = documents). Attention is causal and
stays within a document; `positions` default to restarting at 0 per document. A left-padded
prompt is segment_ids = its mask (one document per row) and positions = cumsum(mask) - 1.

`embeddings` [B, L, D] replaces the token embeddings (LLaVA puts projected image features into
the image-token rows of `model.apply(v, tokens, method=model.embed)` and passes the result).
`prefix_mask` bool [B, L] (PaliGemma-style prefix LM): the True tokens of a document also attend
to the later True tokens of the same call (bidirectional over the prefix); the others stay
causal. With a cache, the keys of earlier calls are all before the new queries, so a prefix must
come in one call (generation: the prompt).

KV cache (pure: the cache goes in and comes out of `apply`, nothing is stored in the module):
    cache = model.init_cache(batch, max_length)              # zeros; no params needed
    logits, cache = model.apply(v, prompt, segment_ids=mask, positions=pos, cache=cache)
    logits, cache = model.apply(v, next_token[:, None], segment_ids=..., positions=..., cache=cache)
The new tokens are written at slots [cache["index"], index + L) of every layer's keys/values;
queries attend to the filled slots of their own document up to their own slot. The cache holds
`k`, `v`: a tuple of `depth` arrays [B, Hkv, S, K] (compute dtype), or one stacked
[depth, B, Hkv, S, K] array under `scan_layers` (heads before slots, so that decoding reads
them without a transpose), `segment_ids` [B, S] (0 = empty) and `index`.
`reorder_cache(cache, rows)` gathers batch rows (beam search); `cache_logical_axes` names the
axes for sharding (kv heads over `tensor`, like the attention activations).

Layers: `layers/block{i}` unrolled, or `layers/blocks` with a leading [depth] axis under
`scan_layers` (vlmjax.models.scan_layout converts); `remat` as the encoders.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers, rope
from vlmjax.sharding import constrain

LOGITS_BLV = ("act_batch", "act_length", "act_vocab")
CACHE_KV_AXES = (None, "act_batch", "act_heads", None, None)  # [depth, B, Hkv, S, K]
MLP_KINDS = ("gated", "plain")
POSITION_EMBEDDINGS = ("rope", "learned")
_lecun = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def segment_positions(segment_ids):
    """[B, L] segment ids -> positions restarting at 0 wherever the segment changes."""
    idx = jnp.arange(segment_ids.shape[1])[None]
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return (idx - start).astype(jnp.int32)


def attention_mask(q_segments, k_segments, q_slots, k_slots, sliding_window=None,
                   q_prefix=None, k_prefix=None):
    """[B, 1, Lq, Lk] bool: same non-padding document, causal by slot (or both prefix tokens:
    `q_prefix` [B, Lq], `k_prefix` [B, Lk]), within the window."""
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    causal = k_slots[None, None, :] <= q_slots[None, :, None]
    if q_prefix is not None:
        causal = causal | (q_prefix[:, :, None] & k_prefix[:, None, :])
    mask = same & causal
    if sliding_window:
        mask &= q_slots[None, :, None] - k_slots[None, None, :] < sliding_window
    return mask[:, None]


def _dense(features, in_axes, out_axes, use_bias, dtype, name, axis=-1):
    features = features if isinstance(features, tuple) else (features,)
    return nn.DenseGeneral(
        features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=layers.partitioned(_lecun, (*in_axes, *out_axes)),
        bias_init=layers.partitioned(nn.initializers.zeros, out_axes))


def feed_forward(h, kind: str, mlp_dim: int, activation: str, use_bias: bool, dtype):
    """The decoder's MLP on normed h [B, L, D], its params `gate`, `up`, `down` created in the
    calling compact module: 'gated' down(act(gate) * up) (SwiGLU), 'plain' down(act(up))."""
    act = layers.get_activation(activation)

    def up_proj(name):
        return _dense(mlp_dim, ("embed",), ("mlp",), use_bias, dtype, name)(h)

    hidden = act(up_proj("gate")) * up_proj("up") if kind == "gated" else act(up_proj("up"))
    hidden = constrain(hidden, layers.HIDDEN_BLF)
    return _dense(h.shape[-1], ("mlp",), ("embed",), use_bias, dtype, "down")(hidden)


class DecoderBlock(nn.Module):
    """Pre-norm Llama block: x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x)) (OPT: LayerNorm and
    a plain MLP, see `Decoder`). With `kv_cache` the new keys/values are written at slot
    `index` of this layer's {"k", "v"} [B, Hkv, S, K] and the block returns (x, kv_cache)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"
    norm_eps: float = 1e-6
    inv_freq: Any = None              # None: no RoPE (learned positions are in the input)
    qkv_bias: bool = False
    out_bias: bool = False
    sliding_window: int | None = None
    fused_attention: bool = False
    norm: str = "rmsnorm"
    mlp: str = "gated"
    mlp_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, q_segments, k_segments, index, kv_cache=None, prefix=None):
        width = x.shape[-1]
        h = layers.make_norm(self.norm, self.dtype, self.norm_eps, name="attn_norm")(x)
        q, k, v = (_dense((heads, self.head_dim), ("embed",), (axes, "head_dim"), self.qkv_bias,
                          self.dtype, name)(h)
                   for name, heads, axes in (("query", self.num_heads, "heads"),
                                             ("key", self.num_kv_heads, "kv_heads"),
                                             ("value", self.num_kv_heads, "kv_heads")))
        if self.inv_freq is not None:
            q = rope.apply_rope(q, positions, self.inv_freq)
            k = rope.apply_rope(k, positions, self.inv_freq)
        q, k, v = (constrain(t, layers.HEADS_BLHK) for t in (q, k, v))
        q_slots = index + jnp.arange(x.shape[1])
        kv_layout = "BSHK"
        if kv_cache is not None:
            # The cache keeps heads before slots ([.., B, Hkv, S, K]): attention then reads it
            # as a batched matmul with no per-step transpose (a copy of the whole cache).
            kv_cache = {n: jax.lax.dynamic_update_slice(
                kv_cache[n], new.transpose(0, 2, 1, 3).astype(kv_cache[n].dtype),
                (0, 0, index, 0)) for n, new in (("k", k), ("v", v))}
            k, v = kv_cache["k"], kv_cache["v"]
            k_slots, kv_layout = jnp.arange(k.shape[2]), "BHSK"
        else:
            k_slots = q_slots
        mask = attention_mask(q_segments, k_segments, q_slots, k_slots, self.sliding_window,
                              *(prefix or (None, None)))
        out = layers.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask,
                                           fused=self.fused_attention, kv_layout=kv_layout)
        out = constrain(out, layers.HEADS_BLHK)
        x = x + _dense(width, ("heads", "head_dim"), ("embed",), self.out_bias, self.dtype, "out",
                       axis=(-2, -1))(out)
        h = layers.make_norm(self.norm, self.dtype, self.norm_eps, name="mlp_norm")(x)
        x = x + feed_forward(h, self.mlp, self.mlp_dim, self.activation, self.mlp_bias,
                             self.dtype)
        return constrain(x, layers.RESIDUAL_BLD), kv_cache


class DecoderLayers(nn.Module):
    """`depth` DecoderBlocks, unrolled (`block{i}`) or under nn.scan (`blocks`), with remat.

    `cross_attention` (GatedCrossAttention kwargs + `every`): a gated cross-attention block
    `xattn{j}` before every `every`-th block (0, every, 2*every, ...: Idefics' and
    open_flamingo's placement), unrolled only. It runs when `media` is given: a dict with
    `mask` bool [B, L, S] and either `tokens` [B, S, E] (projected here) or `kv` (the
    per-block keys/values of an earlier call, from the cache); the call then also returns
    the keys/values it used."""
    depth: int
    block_kwargs: Mapping[str, Any]
    remat: str = "none"
    scan_layers: bool = False
    cross_attention: Mapping[str, Any] | None = None

    def _cross_blocks(self):
        from vlmjax.models.cross_attention import GatedCrossAttention  # it builds on this module
        kwargs = dict(self.cross_attention)
        every = kwargs.pop("every")
        block_cls = GatedCrossAttention
        if self.remat != "none":
            block_cls = nn.remat(GatedCrossAttention, policy=layers.remat_policy(self.remat))
        return every, [block_cls(**kwargs, name=f"xattn{j}")
                       for j in range(-(-self.depth // every))]

    @nn.compact
    def __call__(self, x, positions, q_segments, k_segments, index, kv_cache=None, prefix=None,
                 media=None):
        block_cls = DecoderBlock
        if self.remat != "none":
            block_cls = nn.remat(DecoderBlock, policy=layers.remat_policy(self.remat),
                                 prevent_cse=not self.scan_layers)
        args = (positions, q_segments, k_segments, index)
        if self.cross_attention is not None and self.scan_layers:
            raise ValueError("cross attention blocks need scan_layers=False")
        every, cross, media_kv = 0, [], None
        if self.cross_attention is not None and media is not None:
            every, cross = self._cross_blocks()
            media_kv = media.get("kv") or tuple(block.project_media(media["tokens"])
                                                for block in cross)
        if not self.scan_layers:
            # One cache array per layer (a tuple): a layer reads and updates its own buffer in
            # place, where slicing a stacked [depth, ...] cache would copy it every step.
            kv_out = []
            for i in range(self.depth):
                if cross and i % every == 0:
                    x = cross[i // every](x, media_kv[i // every], media["mask"])
                layer_cache = None if kv_cache is None else {n: kv_cache[n][i] for n in ("k", "v")}
                x, layer_cache = block_cls(**self.block_kwargs, name=f"block{i}")(
                    x, *args, layer_cache, prefix)
                kv_out.append(layer_cache)
            kv_out = None if kv_cache is None else {n: tuple(c[n] for c in kv_out)
                                                    for n in ("k", "v")}
            return (x, kv_out) if media is None else (x, kv_out, media_kv)

        def body(block, carry, layer_cache):
            carry, layer_cache = block(carry, *args, layer_cache, prefix)
            return carry, layer_cache

        scanned = layers.scan_over_layers(body, self.depth, rngs=("params",))
        return scanned(block_cls(**self.block_kwargs, name="blocks"), x, kv_cache)


class LMHead(nn.Module):
    """Untied unembedding: hidden [B, L, D] -> float32 logits [B, L, V] (param `kernel`)."""
    vocab_size: int

    @nn.compact
    def __call__(self, hidden):
        kernel = self.param("kernel", layers.partitioned(_lecun, ("embed", "vocab")),
                            (hidden.shape[-1], self.vocab_size))
        return project_logits(hidden, kernel)


def project_logits(hidden, kernel_DV):
    """hidden [B, L, D] @ kernel [D, V] in the compute dtype, accumulated in float32."""
    logits = jnp.einsum("bld,dv->blv", hidden, kernel_DV.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS_BLV)


class Decoder(nn.Module):
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None   # default num_heads (multi-head); 1 = multi-query
    head_dim: int | None = None       # default width // num_heads
    activation: str = "silu"
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: Mapping[str, Any] | None = None  # HF rope_parameters without rope_theta
    qkv_bias: bool = False
    out_bias: bool = False            # Llama attention_bias=True biases o_proj too
    tie_embeddings: bool = False
    sliding_window: int | None = None
    embed_init_std: float = 0.02
    remat: str = "none"
    scan_layers: bool = False
    fused_attention: bool = False
    norm: str = "rmsnorm"             # "layernorm" (OPT)
    mlp: str = "gated"                # down(act(gate) * up); "plain": down(act(up)) (OPT)
    mlp_bias: bool = False
    position_embedding: str = "rope"  # "learned": add rows of `position_embed` (OPT), no RoPE
    num_positions: int = 0            # rows of the learned table (OPT: max positions + offset)
    position_offset: int = 0          # position p reads row p + offset (OPT: 2)
    cross_attention: Mapping[str, Any] | None = None  # gated blocks (models/cross_attention.py)
    dtype: Any = jnp.float32

    # ------------------------------------------------------------------------------ structure
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.width // self.num_heads

    def _dtype(self):
        return layers.DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype

    def setup(self):
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.kv_heads}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp {self.mlp!r} is not one of {list(MLP_KINDS)}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding {self.position_embedding!r} is not one of "
                             f"{list(POSITION_EMBEDDINGS)}")
        learned = self.position_embedding == "learned"
        if learned and self.num_positions <= 0:
            raise ValueError("position_embedding='learned' needs num_positions > 0 (the rows "
                             "of the table, offset included)")
        dtype = self._dtype()
        self.embedder = nn.Embed(
            self.vocab_size, self.width, dtype=dtype, param_dtype=jnp.float32, name="embed",
            embedding_init=layers.partitioned(nn.initializers.normal(self.embed_init_std),
                                              ("vocab", "embed")))
        if learned:
            self.position_embedder = nn.Embed(
                self.num_positions, self.width, dtype=dtype, param_dtype=jnp.float32,
                name="position_embed", embedding_init=layers.partitioned(
                    nn.initializers.normal(self.embed_init_std), (None, "embed")))
            inv_freq = None
        else:
            inv_freq = tuple(float(f) for f in rope.inverse_frequencies(
                self.dims_per_head, self.rope_theta, self.rope_scaling))
        block_kwargs = dict(num_heads=self.num_heads, num_kv_heads=self.kv_heads,
                            head_dim=self.dims_per_head, mlp_dim=self.mlp_dim,
                            activation=self.activation, norm_eps=self.norm_eps,
                            inv_freq=inv_freq, qkv_bias=self.qkv_bias,
                            out_bias=self.out_bias, sliding_window=self.sliding_window,
                            fused_attention=self.fused_attention, norm=self.norm, mlp=self.mlp,
                            mlp_bias=self.mlp_bias, dtype=dtype)
        self.layers = DecoderLayers(self.depth, block_kwargs, self.remat, self.scan_layers,
                                    self._cross_attention_kwargs(dtype))
        self.final_norm = layers.make_norm(self.norm, dtype, self.norm_eps)
        if not self.tie_embeddings:
            self.lm_head = LMHead(self.vocab_size)

    def _cross_attention_kwargs(self, dtype):
        """GatedCrossAttention kwargs: the config's, the LM's widths and kinds by default."""
        if self.cross_attention is None:
            return None
        kwargs = dict(self.cross_attention)
        if int(kwargs.get("every", 0)) < 1:
            raise ValueError(f"cross_attention.every must be >= 1, got {kwargs.get('every')}")
        return {"num_heads": self.num_heads, "head_dim": self.dims_per_head,
                "mlp_dim": self.mlp_dim, "activation": self.activation, "mlp": self.mlp,
                "norm": self.norm, "norm_eps": self.norm_eps, **kwargs, "width": self.width,
                "dtype": dtype}

    # ------------------------------------------------------------------------------- compute
    def embed(self, tokens):
        """Token embeddings [B, L, D] in the compute dtype."""
        # Gather the table's embed dim first (FSDP): see models/text.py.
        table = constrain(self.embedder.embedding, ("act_vocab", None))
        return constrain(jnp.take(table.astype(self._dtype()), tokens, axis=0),
                         layers.RESIDUAL_BLD)

    def add_learned_positions(self, x, positions):
        """x [B, L, D] + the table rows of `positions` int [B, L] shifted by the offset (OPT's
        embed_positions; HF computes the positions from the attention mask, as generate does)."""
        table = constrain(self.position_embedder.embedding, (None, None))
        rows = jnp.take(table.astype(x.dtype), positions + self.position_offset, axis=0)
        return constrain(x + rows, layers.RESIDUAL_BLD)

    def logits(self, hidden):
        """Final-normed hidden [B, L, D] -> float32 logits [B, L, V]."""
        if self.tie_embeddings:
            return project_logits(hidden, self.embedder.embedding.T)
        return self.lm_head(hidden)

    def __call__(self, tokens, *, segment_ids=None, positions=None, embeddings=None,
                 cache=None, return_hidden=False, prefix_mask=None, media=None,
                 media_mask=None):
        """`media` [B, S, E] and `media_mask` bool [B, L, S]: what the cross-attention blocks
        attend to (no media: they are skipped). With a cache, the call that gives `media`
        stores its keys/values and its last token's mask row in the cache; later calls reuse
        them, and their tokens see what that last token saw (unless given a media_mask)."""
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self._dtype())
        batch, length = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("a cached call needs explicit positions (they continue the "
                                 "prompt's, see vlmjax.inference.generate)")
            positions = segment_positions(segment_ids)
        positions = positions.astype(jnp.int32)
        if self.position_embedding == "learned":
            x = self.add_learned_positions(x, positions)
        if cache is None:
            index, k_segments, kv = 0, segment_ids, None
        else:
            index = cache["index"]
            k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids,
                                                      (0, index))
            kv = {"k": cache["k"], "v": cache["v"]}
        prefix = None
        if prefix_mask is not None:
            q_prefix = prefix_mask.astype(bool)
            k_prefix = q_prefix if cache is None else jax.lax.dynamic_update_slice(
                jnp.zeros(k_segments.shape, bool), q_prefix, (0, index))
            prefix = (q_prefix, k_prefix)
        media_in = self._media_inputs(media, media_mask, cache, length)
        out = self.layers(x, positions, segment_ids, k_segments, index, kv, prefix, media_in)
        x, kv = out[:2]
        hidden = self.final_norm(x)
        if return_hidden and not self.tie_embeddings and self.is_initializing():
            self.lm_head(hidden)  # create the head's params at init
        out_value = hidden if return_hidden else self.logits(hidden)
        if cache is None:
            return out_value
        new_cache = {**cache, **kv, "segment_ids": k_segments, "index": index + length}
        if media_in is not None:
            new_cache.update(media_k=tuple(k for k, _ in out[2]),
                             media_v=tuple(v for _, v in out[2]),
                             media_mask=media_in["mask"][:, -1])
        return out_value, new_cache

    def _media_inputs(self, media, media_mask, cache, length):
        """The cross-attention blocks' `media` argument (None: no media anywhere)."""
        if self.cross_attention is None:
            if media is not None:
                raise ValueError("media given to a Decoder without cross_attention")
            return None
        if media is not None:
            if media_mask is None:
                raise ValueError("media needs media_mask [B, L, S] (which tokens see which "
                                 "media tokens)")
            return {"tokens": media, "mask": media_mask.astype(bool)}
        if cache is None or "media_k" not in cache:
            return None
        if media_mask is None:
            last = cache["media_mask"]
            media_mask = jnp.broadcast_to(last[:, None], (last.shape[0], length, last.shape[1]))
        return {"kv": tuple(zip(cache["media_k"], cache["media_v"])),
                "mask": media_mask.astype(bool)}

    # --------------------------------------------------------------------------------- cache
    def init_cache(self, batch: int, max_length: int) -> dict:
        """An empty cache for `batch` rows of up to `max_length` tokens (prompt + new)."""
        shape = (batch, self.kv_heads, max_length, self.dims_per_head)
        if self.scan_layers:
            zeros = jnp.zeros((self.depth, *shape), self._dtype())
        else:
            zeros = tuple(jnp.zeros(shape, self._dtype()) for _ in range(self.depth))
        return {"k": zeros, "v": jax.tree.map(jnp.zeros_like, zeros),
                "segment_ids": jnp.zeros((batch, max_length), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    @staticmethod
    def reorder_cache(cache: dict, rows) -> dict:
        """The cache of batch rows `rows` (int [B']), e.g. the surviving beams."""
        def take(kv):  # a tuple of [B, ...] per layer, or one stacked [depth, B, ...]
            return tuple(x[rows] for x in kv) if isinstance(kv, tuple) else kv[:, rows]
        out = {**cache, "k": take(cache["k"]), "v": take(cache["v"]),
               "segment_ids": cache["segment_ids"][rows]}
        for name in ("media_k", "media_v"):  # cross-attention keys/values: per block [B, ...]
            if name in cache:
                out[name] = take(cache[name])
        if "media_mask" in cache:
            out["media_mask"] = cache["media_mask"][rows]
        return out

    def cache_logical_axes(self) -> dict:
        """Logical axes of each cache array (for "k"/"v": of every layer's array)."""
        kv = CACHE_KV_AXES if self.scan_layers else CACHE_KV_AXES[1:]
        axes = {"k": kv, "v": kv, "segment_ids": ("act_batch", None), "index": ()}
        if self.cross_attention is not None:  # added by the call that gives media
            axes.update(media_k=layers.HEADS_BLHK, media_v=layers.HEADS_BLHK,
                        media_mask=("act_batch", None))
        return axes


def output_kernel(params) -> jax.Array:
    """The unembedding matrix [D, V] of Decoder params (tied: the embedding transposed)."""
    params = nn.meta.unbox(params)
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["embed"]["embedding"].T
