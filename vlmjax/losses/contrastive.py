"""Contrastive losses over a device mesh: CLIP's softmax InfoNCE and SigLIP's pairwise sigmoid.

Inputs are L2-normalised embeddings `zimg`, `ztxt` of shape [B, D] (global batch B). Without a
mesh the losses are computed densely (XLA partitions them if the inputs are sharded). With a
mesh they are `jax.shard_map`s over the mesh axes named in `batch_axes` (axes the mesh lacks are
ignored), and every impl equals the dense loss in value and gradients.

SigLIP impls, with N devices each holding b = B / N rows:
- `dense`: the whole B x B logits matrix (the reference).
- `all_gather`: each device gathers all texts and scores its b images against them (b x B).
- `ppermute`: the chunked loss of the SigLIP paper. Texts rotate around the ring of devices with
  `lax.ppermute`; each step scores one b x b block. The backward pass is a custom VJP that rotates
  the texts again together with their gradient, so neither pass holds more than one block.
  Forward N-1 steps, backward N; per device it sends N-1 + 2N-1 = 3N-2 chunks of b x D (the last
  backward step sends only the gradient: its text chunk would arrive where it already is).
- `ppermute_bidir`: the same ring used in both directions at once. Each step sends one chunk to
  the next device and one to the previous, so a device has seen all N chunks after ceil((N-1)/2)
  steps (for even N the opposite device's chunk, reachable both ways, is sent once). The custom
  VJP rotates images as well as texts the same way, and each device accumulates the gradient of
  its own rows only: no gradients travel, both passes take ceil((N-1)/2) steps and send 3(N-1)
  chunks in all, at the price of a fourth b x b x D matmul per block in the backward (every block's
  logits are recomputed on the image's and on the text's device) against the ring's three.

All reductions run in float32 and the losses return a float32 scalar.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlmjax.sharding import BATCH_AXES

SIGLIP_IMPLS = ("dense", "all_gather", "ppermute", "ppermute_bidir")


# ------------------------------------------------------------------------------- dense references
def _columns(z):
    """`z` as the columns of a dense logits matrix. Under an explicit-sharding mesh a row-sharded
    `z` must be replicated first, or rows and columns would claim the same mesh axes."""
    sharding = jax.typeof(z).sharding
    if any(axis is not None for axis in sharding.spec):
        return jax.sharding.reshard(z, NamedSharding(sharding.mesh, P()))
    return z


def clip_loss_dense(zimg, ztxt, temperature):
    """(CE(image->text) + CE(text->image)) / 2 over the whole B x B logits matrix."""
    logits = temperature * jnp.dot(zimg, _columns(ztxt).T, preferred_element_type=jnp.float32)
    diag = temperature * jnp.sum(zimg * ztxt, axis=-1)  # the matching pairs' logits
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return (i2t + t2i) / 2


def siglip_loss_dense(zimg, ztxt, temperature, bias):
    """-(1/B) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on the diagonal, -1 elsewhere."""
    logits = temperature * jnp.dot(zimg, _columns(ztxt).T,
                                   preferred_element_type=jnp.float32) + bias
    labels = 2.0 * jnp.eye(zimg.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / zimg.shape[0]


def hard_negative_loss(zimg, ztxt, zneg, valid, temperature, bias=None):
    """Each image against K hard-negative captions of its own (NegCLIP): zneg [B, K, D] with
    valid [B, K] (False: no negative, ignored).

    With a bias (SigLIP) every valid negative is one more negative pair of the sigmoid loss,
    sum softplus(t x.n + b) / B, on the same scale as `siglip_loss`. Without (CLIP) it is the
    cross-entropy of the true caption against its negatives, mean over images: a term added to
    `clip_loss` (NegCLIP instead widens the batch softmax; this keeps the mesh impls untouched).
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    zimg, ztxt, zneg = f32(zimg), f32(ztxt), f32(zneg)
    neg = temperature * jnp.einsum("bd,bkd->bk", zimg, zneg)
    if bias is not None:
        return jnp.sum(jnp.where(valid, jax.nn.softplus(neg + bias), 0.0)) / zimg.shape[0]
    pos = temperature * jnp.sum(zimg * ztxt, axis=-1, keepdims=True)
    candidates = jnp.concatenate([pos, jnp.where(valid, neg, -jnp.inf)], axis=1)
    return jnp.mean(jax.nn.logsumexp(candidates, axis=1) - pos[:, 0])


# ------------------------------------------------------------------------------------ mesh plumbing
def _mesh_batch_axes(mesh: Mesh, batch_axes: Sequence[str], batch: int) -> tuple[tuple[str, ...], int]:
    """The batch axes present in the mesh and the number of batch shards they make."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"none of batch_axes {tuple(batch_axes)} is an axis of the mesh "
                         f"{tuple(mesh.axis_names)}")
    shards = math.prod(mesh.shape[a] for a in axes)
    if batch % shards:
        raise ValueError(f"global batch {batch} is not divisible by the {shards} batch shards of "
                         f"mesh axes {axes}; use a batch that is a multiple of {shards}")
    return axes, shards


def _prepare(zimg, ztxt, *scalars):
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f"zimg and ztxt must both be [B, D], got {zimg.shape} and {ztxt.shape}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return (f32(zimg), f32(ztxt), *map(f32, scalars))


def _varying(x, axes):
    """Mark a value computed identically on every device as per-device (a loop carry that will
    accumulate per-device terms must start out typed as varying)."""
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axes, to="varying")
    return lax.pvary(x, axes)  # jax < 0.8


def _ring(n: int, step: int = 1):
    """ppermute pairs sending each device's chunk `step` devices on around the ring (-1: back)."""
    return [(i, (i + step) % n) for i in range(n)]


# ------------------------------------------------------------------------------------------ CLIP
def clip_loss(zimg, ztxt, temperature, *, mesh: Mesh | None = None,
              batch_axes: Sequence[str] = BATCH_AXES):
    """CLIP's symmetric InfoNCE. With a mesh each device scores its b rows against all-gathered
    columns (b x B logits per direction); value and gradients equal `clip_loss_dense`."""
    zimg, ztxt, temperature = _prepare(zimg, ztxt, temperature)
    if mesh is None:
        return clip_loss_dense(zimg, ztxt, temperature)
    batch = zimg.shape[0]
    axes, _ = _mesh_batch_axes(mesh, batch_axes, batch)

    def local(zimg, ztxt, t):
        # A device's rows are matched by its own rows of the other modality.
        positives = t * jnp.sum(zimg * ztxt, axis=-1)

        def logsumexp_sum(queries, keys):
            logits = t * jnp.dot(queries, lax.all_gather(keys, axes, tiled=True).T)
            return jnp.sum(jax.nn.logsumexp(logits, axis=1))

        total = logsumexp_sum(zimg, ztxt) + logsumexp_sum(ztxt, zimg) - 2 * jnp.sum(positives)
        return lax.psum(total, axes) / (2 * batch)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())(
        zimg, ztxt, temperature)


# ---------------------------------------------------------------------------------------- SigLIP
def siglip_loss(zimg, ztxt, temperature, bias=None, *, mesh: Mesh | None = None,
                batch_axes: Sequence[str] = BATCH_AXES, impl: str = "ppermute"):
    """SigLIP's pairwise sigmoid loss (see the module docstring for `impl`). `bias` None = 0."""
    if impl not in SIGLIP_IMPLS:
        raise ValueError(f"siglip impl {impl!r} is not one of {SIGLIP_IMPLS}")
    zimg, ztxt, temperature, bias = _prepare(zimg, ztxt, temperature,
                                             0.0 if bias is None else bias)
    if mesh is None or impl == "dense":
        return siglip_loss_dense(zimg, ztxt, temperature, bias)
    batch = zimg.shape[0]
    axes, shards = _mesh_batch_axes(mesh, batch_axes, batch)
    if impl == "all_gather":
        return _siglip_all_gather(zimg, ztxt, temperature, bias, mesh, axes)
    if impl == "ppermute_bidir":
        return _siglip_ppermute_bidir(mesh, axes, shards)(zimg, ztxt, temperature, bias)
    return _siglip_ppermute(mesh, axes, shards)(zimg, ztxt, temperature, bias)


def _siglip_all_gather(zimg, ztxt, temperature, bias, mesh, axes):
    batch = zimg.shape[0]

    def local(zimg, ztxt, t, b):
        rows = jnp.arange(zimg.shape[0])
        cols = lax.axis_index(axes) * zimg.shape[0] + rows  # this device's positives
        logits = t * jnp.dot(zimg, lax.all_gather(ztxt, axes, tiled=True).T) + b
        labels = jnp.where(jnp.arange(batch)[None, :] == cols[:, None], 1.0, -1.0)
        return lax.psum(-jnp.sum(jax.nn.log_sigmoid(labels * logits)), axes) / batch

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=P())(zimg, ztxt, temperature, bias)


# The ring loss uses -log sigmoid(l) = softplus(-l) = softplus(l) - l: every pair is scored as a
# negative, softplus(l_ij), and the positives are corrected by subtracting their logits l_ii, which
# each device computes from its own rows. So the rotating blocks carry no label bookkeeping.
def _positive_logit_sum(zimg, ztxt, t, b):
    sims = jnp.sum(zimg * ztxt, axis=-1)
    return jnp.sum(t * sims + b), jnp.sum(sims)


def _siglip_ppermute(mesh: Mesh, axes: tuple[str, ...], shards: int):
    ring = _ring(shards)
    specs = (P(axes), P(axes), P(), P())

    def forward_local(zimg, ztxt, t, b):
        def block(txt):  # sum of softplus over one b x b block of (all-negative) logits
            return jnp.sum(jax.nn.softplus(t * jnp.dot(zimg, txt.T) + b))

        def step(_, carry):
            txt, total = carry
            # The next chunk is sent while this block is scored: no data dependence between them.
            return lax.ppermute(txt, axes, ring), total + block(txt)

        total = -_positive_logit_sum(zimg, ztxt, t, b)[0]
        txt, total = lax.fori_loop(0, shards - 1, step, (ztxt, total))
        return lax.psum(total + block(txt), axes) / (zimg.shape[0] * shards)

    def backward_local(zimg, ztxt, t, b, g):
        scale = g / (zimg.shape[0] * shards)  # d loss / d (per-pair term)

        def accumulate(txt, dtxt, dimg, dt, db):  # gradients of the block of the visiting texts
            sims = jnp.dot(zimg, txt.T)
            dlogits = scale * jax.nn.sigmoid(t * sims + b)  # d softplus(l) / dl = sigmoid(l)
            return (txt, dtxt + t * jnp.dot(dlogits.T, zimg), dimg + t * jnp.dot(dlogits, txt),
                    dt + jnp.sum(dlogits * sims), db + jnp.sum(dlogits))

        def step(_, carry):
            txt, dtxt, *rest = accumulate(*carry)
            # The text chunk travels on with its accumulated gradient.
            return (lax.ppermute(txt, axes, ring), lax.ppermute(dtxt, axes, ring), *rest)

        _, sims_sum = _positive_logit_sum(zimg, ztxt, t, b)
        init = (ztxt, -scale * t * zimg, -scale * t * ztxt, -scale * sims_sum,
                _varying(-scale * zimg.shape[0], axes))
        carry = lax.fori_loop(0, shards - 1, step, init)
        # The last block: only the now complete gradient goes home; the text chunk it belongs to
        # is the one the owning device already holds.
        _, dtxt, dimg, dt, db = accumulate(*carry)
        dtxt = lax.ppermute(dtxt, axes, ring)
        return dimg, dtxt, lax.psum(dt, axes), lax.psum(db, axes)

    return _custom_vjp_loss(mesh, specs, forward_local, backward_local)


def _custom_vjp_loss(mesh: Mesh, specs, forward_local, backward_local):
    """The loss of shard_mapped `forward_local`, differentiated by shard_mapped `backward_local`
    (which recomputes what it needs from the inputs: the residuals are the inputs only)."""
    forward = jax.shard_map(forward_local, mesh=mesh, in_specs=specs, out_specs=P())
    backward = jax.shard_map(backward_local, mesh=mesh, in_specs=(*specs, P()),
                             out_specs=specs)

    @jax.custom_vjp
    def loss(zimg, ztxt, t, b):
        return forward(zimg, ztxt, t, b)

    def loss_fwd(zimg, ztxt, t, b):
        value = forward(zimg, ztxt, t, b)
        return value, (value, zimg, ztxt, t, b)

    def loss_bwd(residuals, g):
        value, *inputs = residuals
        # g + 0 x the loss: the backward's blocks wait for the forward's (the two passes are
        # otherwise independent, and XLA would keep both passes' b x b blocks alive at once).
        return backward(*inputs, g + 0 * value)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def _visit_bidirectional_ring(visit, acc, own_chunk, axes: tuple[str, ...], shards: int):
    """`acc = visit(acc, chunk)` for every device's `chunk` (a pytree), this device's own first.

    Chunks travel both ways around the ring: step s brings the chunks of the devices s before and
    s after this one, so all are seen after ceil((shards-1)/2) steps. For an even count the last
    step's chunk (the opposite device's) would arrive from both sides: it is sent one way only.
    As in the one-way ring, the next step's chunks are sent while the current ones are visited,
    so the last step's visits come after the loop (2 or 3 of them, a constant).
    """
    def send_forward(chunk):  # to the next device: a chunk comes from the previous one
        return lax.ppermute(chunk, axes, _ring(shards, 1))

    def send_backward(chunk):
        return lax.ppermute(chunk, axes, _ring(shards, -1))

    def visit_in_turn(acc, chunk):
        # A visit's b x b blocks do not depend on the earlier visits, so XLA's scheduler may
        # compute several at once and keep them all alive (memory growing with N). Adding 0 x
        # a scalar of `acc` to the chunk makes the visit wait for the previous one (XLA keeps a
        # float x 0, which is NaN for an infinite x); an optimization barrier would say it
        # better, but XLA:CPU removes barriers before scheduling.
        tie = 0 * sum(jnp.ravel(leaf)[0] for leaf in jax.tree.leaves(acc))
        return visit(acc, jax.tree.map(lambda x: x + tie.astype(x.dtype), chunk))

    two_way_steps = (shards - 1) // 2  # steps that bring two distinct chunks
    has_opposite = shards % 2 == 0     # then one more step brings the opposite device's chunk
    acc = visit_in_turn(acc, own_chunk)
    if two_way_steps == 0:  # 1 or 2 devices
        return visit_in_turn(acc, send_forward(own_chunk)) if has_opposite else acc

    def step(_, carry):
        from_previous, from_next, acc = carry  # chunks of the devices s before and s after
        acc = visit_in_turn(visit_in_turn(acc, from_previous), from_next)
        return send_forward(from_previous), send_backward(from_next), acc

    from_previous, from_next = send_forward(own_chunk), send_backward(own_chunk)
    from_previous, from_next, acc = lax.fori_loop(0, two_way_steps - 1, step,
                                                  (from_previous, from_next, acc))
    opposite = send_forward(from_previous) if has_opposite else None
    acc = visit_in_turn(visit_in_turn(acc, from_previous), from_next)
    return visit_in_turn(acc, opposite) if has_opposite else acc


def _siglip_ppermute_bidir(mesh: Mesh, axes: tuple[str, ...], shards: int):
    specs = (P(axes), P(axes), P(), P())

    def forward_local(zimg, ztxt, t, b):
        def add_block(total, txt):  # softplus summed over one b x b block of negative logits
            return total + jnp.sum(jax.nn.softplus(t * jnp.dot(zimg, txt.T) + b))

        total = _visit_bidirectional_ring(add_block, -_positive_logit_sum(zimg, ztxt, t, b)[0],
                                          ztxt, axes, shards)
        return lax.psum(total, axes) / (zimg.shape[0] * shards)

    def backward_local(zimg, ztxt, t, b, g):
        scale = g / (zimg.shape[0] * shards)  # d loss / d (per-pair term)

        def dlogits(img, txt):  # d softplus(l) / dl = sigmoid(l)
            sims = jnp.dot(img, txt.T)
            return sims, scale * jax.nn.sigmoid(t * sims + b)

        def add_block_grads(grads, chunk):
            dimg, dtxt, dt, db = grads
            txt, img = chunk
            # This device's images against the visiting texts: the images' gradient, and t's and
            # b's (each block is counted once, on its image's device).
            sims, d = dlogits(zimg, txt)
            dimg, dt, db = dimg + t * jnp.dot(d, txt), dt + jnp.sum(d * sims), db + jnp.sum(d)
            # The visiting images against this device's texts: the texts' gradient.
            _, d = dlogits(img, ztxt)
            return dimg, dtxt + t * jnp.dot(d.T, img), dt, db

        _, sims_sum = _positive_logit_sum(zimg, ztxt, t, b)
        init = (-scale * t * ztxt, -scale * t * zimg, -scale * sims_sum,
                _varying(-scale * zimg.shape[0], axes))
        dimg, dtxt, dt, db = _visit_bidirectional_ring(add_block_grads, init, (ztxt, zimg), axes,
                                                       shards)
        return dimg, dtxt, lax.psum(dt, axes), lax.psum(db, axes)

    return _custom_vjp_loss(mesh, specs, forward_local, backward_local)
