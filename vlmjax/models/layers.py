"""Transformer building blocks shared by every vlmjax model.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`)
through `nn.with_logical_partitioning`, and activations are constrained by their own names
(`act_batch`, `act_length`, `act_embed`, `act_heads`, `act_mlp`) through `sharding.constrain`, so
how either is sharded is a config rule (see `vlmjax.sharding`), not code. Parameters are
float32; `dtype` is the compute dtype. Masks are boolean, True = attend, shaped
[B, 1 or H, Lq, Lk].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.sharding import constrain

Dtype = Any
# Compute dtypes a config may name (`model.dtype`); parameters are always float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
partitioned = nn.with_logical_partitioning

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,
    "silu": nn.silu,
}


# Logical axes of the activations (see vlmjax.sharding): the residual stream [B, L, D], the
# per-head projections [B, L, H, K] and the MLP's hidden layer [B, L, F].
RESIDUAL_BLD = ("act_batch", "act_length", "act_embed")
HEADS_BLHK = ("act_batch", "act_length", "act_heads", None)
HEADS_BHLK = ("act_batch", "act_heads", "act_length", None)
HIDDEN_BLF = ("act_batch", "act_length", "act_mlp")


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------- masks
def padding_mask(q_valid: jax.Array, kv_valid: jax.Array | None = None) -> jax.Array:
    """[B, Lq] and [B, Lk] validity -> [B, 1, Lq, Lk]: attend only between valid tokens."""
    kv_valid = q_valid if kv_valid is None else kv_valid
    return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, L, L]: position i attends to positions <= i."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


# ----------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale).astype(self.dtype)


def make_norm(kind: str, dtype: Dtype, epsilon: float, name: str | None = None) -> nn.Module:
    """LayerNorm or RMSNorm; statistics are always computed in float32."""
    if kind == "layernorm":
        return nn.LayerNorm(
            epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
            scale_init=partitioned(nn.initializers.ones, ("embed",)),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)), name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm {kind!r} is not one of ['layernorm', 'rmsnorm']")


# ------------------------------------------------------------------------------------- attention
def dot_product_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_rng=None, fused=False,
                          kv_layout="BSHK"):
    """q [B,Lq,H,K], k/v [B,Lk,Hkv,K], mask [B,1|H,Lq,Lk] bool -> [B,Lq,H,K].

    `kv_layout="BHSK"`: k/v are [B,Hkv,Lk,K] (a decoder's KV cache), read without transposing.

    Grouped-query attention when Hkv < H: query head h reads kv head h // (H // Hkv) (HF's
    `repeat_kv` order), without materialising the repeated keys. Softmax runs in float32.
    `fused` uses `jax.nn.dot_product_attention` (cuDNN flash attention on GPU where it applies,
    XLA elsewhere); it has no attention dropout.
    """
    batch, q_len, heads, head_dim = q.shape
    if kv_layout not in ("BSHK", "BHSK"):
        raise ValueError(f"kv_layout {kv_layout!r} is not one of ['BSHK', 'BHSK']")
    if kv_layout == "BHSK" and fused:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        kv_layout = "BSHK"
    kv_heads = k.shape[2] if kv_layout == "BSHK" else k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} key/value heads")
    if fused:
        if dropout_rate > 0.0 and dropout_rng is not None:
            raise ValueError("fused attention has no attention dropout: set attention_dropout=0 "
                             "or fused_attention=False")
        return _fused_attention(q, k, v, mask)
    groups = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scale = 1.0 / np.sqrt(head_dim)
    kv = "bshk" if kv_layout == "BSHK" else "bhsk"
    logits = jnp.einsum(f"bqhgk,{kv}->bhgqs", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:  # [B, 1|H, Lq, Lk] -> [B, 1|Hkv, 1|G, Lq, Lk]
        mask = mask.reshape(mask.shape[0], -1, groups if mask.shape[1] > 1 else 1,
                            *mask.shape[2:]) if mask.shape[1] > 1 else mask[:, :, None]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # rows with no valid key (fully padded queries) give zeros, not NaN
        probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum(f"bhgqs,{kv}->bqhgk", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, heads, head_dim)


def _cudnn_applies(q, k) -> bool:
    """cuDNN flash attention: GPU, half precision, head dim a multiple of 8 up to 128."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and k.dtype == q.dtype and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _fused_attention(q, k, v, mask):
    # jax.nn.dot_product_attention's default (implementation=None) is XLA everywhere, so cuDNN
    # is asked for explicitly; shapes or versions it rejects at trace time fall back to XLA.
    if _cudnn_applies(q, k):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


class _ProjectionParams(nn.Module):
    """The parameters of one of MultiHeadAttention's `nn.DenseGeneral`s (the same names, shapes,
    initialisers and logical axes, so checkpoints and converters see no difference), returned
    instead of applied: the BHLK path chooses its own matmul layout with them."""
    kernel_shape: tuple[int, ...]
    fan_in_dims: int          # leading kernel dims contracted with the input
    kernel_axes: tuple
    bias_axes: tuple
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        def flat_init(rng, shape, dtype=jnp.float32):  # DenseGeneral's fan-in/fan-out view
            fan_in = int(np.prod(shape[:self.fan_in_dims]))
            flat = nn.initializers.xavier_uniform()(rng, (fan_in, int(np.prod(shape)) // fan_in),
                                                    dtype)
            return flat.reshape(shape)

        kernel = self.param("kernel", partitioned(flat_init, self.kernel_axes), self.kernel_shape,
                            jnp.float32)
        bias = (self.param("bias", partitioned(nn.initializers.zeros, self.bias_axes),
                           self.kernel_shape[self.fan_in_dims:], jnp.float32)
                if self.use_bias else None)
        return kernel, bias


ATTENTION_LAYOUTS = ("BHLK", "BLHK")


class MultiHeadAttention(nn.Module):
    """Self-attention (`kv=None`) or cross-attention from `x` to `kv`.

    `layout="BLHK"` (default): DenseGeneral projections to [B, L, H, K] under the logical-axis
    activation constraints (HEADS_BLHK: batch over data/fsdp, heads over tensor) and
    `dot_product_attention`. `"BHLK"` projects straight into [B, H, L, K] (self-attention: one
    matmul for Q, K and V together), so both attention einsums are plain batched matmuls with
    no transposes; it sets no activation constraints yet, so it is a single-host CPU option
    (1.14-1.24x on the attention block, a wash on a whole step: benchmarks/README.md). Same
    parameters and the same function either way; `fused=True` always takes the BLHK path.
    """
    num_heads: int
    head_dim: int | None = None  # default: width // num_heads
    out_dim: int | None = None   # default: width of x
    use_bias: bool = True
    dropout: float = 0.0
    fused: bool = False
    layout: str = "BLHK"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, kv=None, mask=None, *, train: bool = False):
        width = x.shape[-1]
        if width % self.num_heads and self.head_dim is None:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        if self.layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout {self.layout!r} is not one of "
                             f"{list(ATTENTION_LAYOUTS)}")
        head_dim = self.head_dim or width // self.num_heads
        rng = self.make_rng("dropout") if train and self.dropout > 0 else None
        dropout_rate = self.dropout if train else 0.0
        if self.layout == "BHLK" and not self.fused:
            return self._bhlk(x, kv, mask, head_dim, dropout_rate, rng)
        kv = x if kv is None else kv

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, head_dim), use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=jnp.float32, name=name,
                kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                        ("embed", "heads", "head_dim")),
                bias_init=partitioned(nn.initializers.zeros, ("heads", "head_dim")))

        q, k, v = (constrain(proj(name)(inputs), HEADS_BLHK)
                   for name, inputs in (("query", x), ("key", kv), ("value", kv)))
        out = dot_product_attention(q, k, v, mask, dropout_rate=dropout_rate,
                                    dropout_rng=rng, fused=self.fused)
        out = constrain(out, HEADS_BLHK)
        return nn.DenseGeneral(
            self.out_dim or width, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=jnp.float32, name="out",
            kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                    ("heads", "head_dim", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)))(out)

    def _bhlk(self, x, kv, mask, head_dim, dropout_rate, rng):
        width, heads = x.shape[-1], self.num_heads
        kv_width = width if kv is None else kv.shape[-1]
        params = {name: _ProjectionParams((dim, heads, head_dim), 1, ("embed", "heads", "head_dim"),
                                          ("heads", "head_dim"), self.use_bias, name=name)()
                  for name, dim in (("query", width), ("key", kv_width), ("value", kv_width))}
        out_kernel, out_bias = _ProjectionParams(
            (heads, head_dim, self.out_dim or width), 2, ("heads", "head_dim", "embed"),
            ("embed",), self.use_bias, name="out")()
        # The softmax scale goes into the query weights ([D, H, K]), not the [B, H, Lq, Lk] logits.
        scale = 1.0 / np.sqrt(head_dim)
        kernels = [params["query"][0] * scale, params["key"][0], params["value"][0]]
        biases = ([params["query"][1] * scale, params["key"][1], params["value"][1]]
                  if self.use_bias else [None] * 3)
        kernels = [w.astype(self.dtype) for w in kernels]
        biases = [None if b is None else b.astype(self.dtype) for b in biases]
        x = x.astype(self.dtype)

        def project(inputs, kernel, bias):  # [B, L, D] -> [B, H, L, K]
            y = jnp.einsum("bld,dhk->bhlk", inputs, kernel)
            return y if bias is None else y + bias[:, None, :]

        if kv is None:  # one [D, 3HK] matmul, then a single transpose to [3, B, H, L, K]
            batch, length, _ = x.shape
            w = jnp.concatenate([k.reshape(width, -1) for k in kernels], axis=1)
            qkv = x @ w
            if self.use_bias:
                qkv = qkv + jnp.concatenate([b.reshape(-1) for b in biases])
            qkv = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            kv = kv.astype(self.dtype)
            q = project(x, kernels[0], biases[0])
            k, v = (project(kv, w, b) for w, b in zip(kernels[1:], biases[1:]))
        q, k, v = (constrain(t, HEADS_BHLK) for t in (q, k, v))
        logits = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
        if mask is not None:  # [B, 1|H, Lq, Lk] broadcasts onto the logits as they are
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if mask is not None:  # rows with no valid key (fully padded queries) give zeros, not NaN
            probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
        if dropout_rate > 0.0 and rng is not None:
            keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
        out = jnp.einsum("bhqs,bhsk->bqhk", probs.astype(v.dtype), v)
        out = constrain(out, HEADS_BLHK)
        y = jnp.einsum("bqhk,hkd->bqd", out, out_kernel.astype(self.dtype))
        return y if out_bias is None else y + out_bias.astype(self.dtype)


# ------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Dense -> activation -> Dense."""
    mlp_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        width = x.shape[-1]

        def dense(features, axes, name):
            return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=jnp.float32, name=name,
                            kernel_init=partitioned(nn.initializers.xavier_uniform(), axes),
                            bias_init=partitioned(nn.initializers.normal(1e-6), axes[1:]))

        h = get_activation(self.activation)(dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x))
        if h.ndim == 3:
            h = constrain(h, HIDDEN_BLF)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(width, ("mlp", "embed"), "fc2")(h)


# --------------------------------------------------------------------------- transformer encoder
class BlockSettings(nn.Module):
    """The fields that define a pre-norm transformer block: EncoderBlock computes with them, and
    every tower (EncoderTower) declares them for its blocks and MAP head."""
    num_heads: int = 12
    mlp_dim: int | None = None   # default 4 * width
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attention_dropout: float = 0.0
    fused_attention: bool = False
    attention_layout: str = "BLHK"  # MultiHeadAttention.layout (BHLK: no activation constraints)
    dtype: Dtype = jnp.float32


BLOCK_FIELDS = tuple(f.name for f in dataclasses.fields(BlockSettings)
                     if f.name not in ("parent", "name"))


class EncoderBlock(BlockSettings):
    """Pre-norm transformer block: x + Attn(Norm(x)); x + MLP(Norm(x))."""

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):  # train positional: remat's static arg
        h = make_norm(self.norm, self.dtype, self.norm_eps, name="norm1")(x)
        h = MultiHeadAttention(self.num_heads, dropout=self.attention_dropout,
                               fused=self.fused_attention, layout=self.attention_layout,
                               dtype=self.dtype, name="attn")(
            h, mask=mask, train=train)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        h = make_norm(self.norm, self.dtype, self.norm_eps, name="norm2")(x)
        h = MLP(self.mlp_dim or 4 * x.shape[-1], self.activation, dropout=self.dropout,
                dtype=self.dtype, name="mlp")(h, train=train)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        return constrain(x, RESIDUAL_BLD)


class EncoderTower(BlockSettings):
    """The fields every transformer tower (ViT, TextTransformer) has: its blocks' settings, its
    width and depth, and the efficiency switches; `encoder` and `map_head` read them."""
    width: int = 768
    depth: int = 12
    remat: str = "none"          # none | full | save-dots (REMAT_POLICIES)
    scan_layers: bool = False    # nn.scan over the blocks (Encoder)


def block_kwargs(tower) -> dict:
    """EncoderBlock arguments from the fields a tower (ViT, TextTransformer) declares."""
    return {field: getattr(tower, field) for field in BLOCK_FIELDS}


def encoder(tower, depth: int | None = None, name: str = "encoder") -> "Encoder":
    """The tower's Encoder with its block arguments and efficiency switches (remat, scan)."""
    return Encoder(tower.depth if depth is None else depth, block_kwargs(tower),
                   remat=tower.remat, scan_layers=tower.scan_layers, name=name)


def map_head(tower, name: str = "map_head") -> "MAPHead":
    return MAPHead(tower.num_heads, tower.mlp_dim or 4 * tower.width, tower.activation,
                   tower.norm_eps, tower.fused_attention, tower.dtype,
                   attention_layout=tower.attention_layout, name=name)


REMAT_POLICIES = ("none", "full", "save-dots")


def remat_policy(name: str):
    """`jax.checkpoint` policy of a remat setting: what the backward pass may keep from the
    forward pass of a block instead of recomputing it."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {name!r} is not one of {REMAT_POLICIES}")
    if name == "save-dots":
        # Keep the weight matmuls' outputs (projections, MLP); recompute the attention scores
        # (dots with batch dims: [B, H, L, L], the largest activations), norms and activations.
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.nothing_saveable  # "full": keep only the block's input


def scan_over_layers(body, depth: int, rngs: tuple[str, ...] = ("params", "dropout")):
    """`nn.scan` of `body(layer, carry, xs)` over `depth` copies of one layer: every parameter
    gains a leading [depth] axis (unsharded), and each layer draws its own `rngs`."""
    return nn.scan(body, variable_axes={"params": 0}, length=depth,
                   split_rngs={name: True for name in rngs},
                   metadata_params={nn.PARTITION_NAME: None})  # layer axis: unsharded


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks.

    Unrolled (default), the blocks are named block0..block{depth-1}, the layout the converters
    use. `scan_layers=True` runs one block under `nn.scan` (name `blocks`, every parameter with a
    leading [depth] axis): compile time stays flat in depth; `vlmjax.models.scan_layout`
    converts between the two layouts. `remat` (none | full | save-dots) wraps each block in
    `jax.checkpoint` with that policy. Returns the output of the last block; with
    `return_states=True`, (that output, every block's output: a sequence indexable by block,
    under scan one [depth, ...] array).
    """
    depth: int
    block_kwargs: dict
    remat: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False, return_states: bool = False):
        block_cls = EncoderBlock
        if self.remat != "none":
            # Under scan, the loop already keeps XLA from merging recomputation into the forward
            # pass, so CSE prevention would only cost (jax.checkpoint docs).
            block_cls = nn.remat(EncoderBlock, policy=remat_policy(self.remat),
                                 prevent_cse=not self.scan_layers, static_argnums=(3,))
        if not self.scan_layers:
            states = []
            for i in range(self.depth):
                x = block_cls(**self.block_kwargs, name=f"block{i}")(x, mask, train)
                states.append(x)
            return (x, tuple(states)) if return_states else x

        def body(block, carry, _):
            carry = block(carry, mask, train)
            return carry, carry if return_states else None

        scanned = scan_over_layers(body, self.depth)
        x, states = scanned(block_cls(**self.block_kwargs, name="blocks"), x, None)
        return (x, states) if return_states else x


# -------------------------------------------------------------------------- position embeddings
def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [height*width, dim] (MoCo v3 / big_vision layout:
    a quarter of the channels each for sin(y), cos(y), sin(x), cos(x))."""
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {dim}")
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class LearnedPosEmb(nn.Module):
    """Adds a learned [1, L, D] position embedding (param `pos_embedding`)."""
    std: float = 0.02

    @nn.compact
    def __call__(self, x):
        pe = self.param("pos_embedding", partitioned(nn.initializers.normal(self.std),
                                                     (None, None, "embed")), (1, *x.shape[1:]))
        return x + pe.astype(x.dtype)


# ------------------------------------------------------------------------------------- MAP head
class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a residual
    MLP (as in SigLIP's image tower). [B, L, D] -> [B, D]."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-6
    fused_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_layout: str = "BLHK"

    @nn.compact
    def __call__(self, x, mask=None):
        width = x.shape[-1]
        probe = self.param("probe", partitioned(nn.initializers.xavier_uniform(),
                                                (None, None, "embed")), (1, 1, width))
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, width)).astype(self.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = MultiHeadAttention(self.num_heads, fused=self.fused_attention,
                               layout=self.attention_layout, dtype=self.dtype,
                               name="attn")(probe, x, attn_mask)
        h = make_norm("layernorm", self.dtype, self.norm_eps, name="norm")(y)
        y = y + MLP(self.mlp_dim, self.activation, dtype=self.dtype, name="mlp")(h)
        return y[:, 0]
