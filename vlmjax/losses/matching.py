"""BLIP's image-text matching (ITM) on cross-device hard negatives, and ITC with momentum
distillation (ALBEF / BLIP).

Temperature convention: here, as in BLIP, logits are `sim / temperature` with a temperature of
about 0.07. `contrastive.py` multiplies by a logit scale instead; scale = 1 / temperature.

ITM trains a binary head (class 1 = match) on the true pairs and on hard negatives: for each
image a text, and for each text an image, drawn with probability softmax(sim / temperature) over
the global batch, never one that shows the same image (`image_ids` equal). The pieces:

    neg_txt, neg_img, valid_txt, valid_img = hard_negative_indices(rng, zimg, ztxt, ids, temp,
                                                                   mesh=mesh)
    tokens_neg = gather_rows(tokens, neg_txt, mesh=mesh)          # one text per image row
    image_embeds_neg = gather_rows(image_embeds, neg_img, mesh=mesh)  # one image per text row
    loss, accuracy = itm_loss(logits_pos, logits_neg, jnp.concatenate([valid_txt, valid_img]))

Indices are global rows of the batch. With a mesh, both mining and gathering are `jax.shard_map`s
that all-gather over the batch axes (axes the mesh lacks are ignored) and return outputs sharded
like the inputs. Each row's draw uses `fold_in(stream, global row)`, so the negatives do not
depend on the number of devices: a mesh of 1, 2, 4 or 8 devices picks what `mesh=None` picks.

ITC with momentum distillation scores the current features against the momentum features of the
global batch and of a queue (`enqueue`), with soft targets mixing the momentum model's own
softmax and the id-equality targets; `momentum_update` is the EMA of the momentum model.

Sampling, softmaxes and losses run in float32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from vlmjax.losses.contrastive import _columns, _mesh_batch_axes
from vlmjax.sharding import BATCH_AXES

F32 = jnp.float32
EMPTY_ID = -1  # a queue slot that holds nothing yet


def _f32(x):
    return jnp.asarray(x, F32)


def similarity(a, b):
    """float32 [N, M] similarities of rows `a` and columns `b`, each [*, D] or, for BLIP-2's
    query features, [*, Q, D]: the dot product, maximised over the queries of either side."""
    if a.ndim == 2 and b.ndim == 2:
        return jnp.dot(a, b.T, preferred_element_type=F32)
    if a.ndim == 3 and b.ndim == 2:
        return jnp.max(jnp.einsum("nqd,md->nmq", a, b, preferred_element_type=F32), axis=-1)
    if a.ndim == 2 and b.ndim == 3:
        return jnp.max(jnp.einsum("nd,mqd->nmq", a, b, preferred_element_type=F32), axis=-1)
    raise ValueError(f"similarity: features must be [N, D] or [N, Q, D] with one side [N, D], "
                     f"got {a.shape} and {b.shape}")


def _check_features(image_feat, text_feat, image_ids):
    """image_feat [B, D] or [B, Q, D] (BLIP-2's queries), text_feat [B, D]."""
    if (image_feat.ndim not in (2, 3) or text_feat.ndim != 2
            or image_feat.shape[0] != text_feat.shape[0]
            or image_feat.shape[-1] != text_feat.shape[-1]):
        raise ValueError(f"image_feat must be [B, D] or [B, Q, D] and text_feat [B, D], got "
                         f"{image_feat.shape} and {text_feat.shape}")
    if image_ids.shape != image_feat.shape[:1]:
        raise ValueError(f"image_ids must be [B] = {image_feat.shape[:1]}, got {image_ids.shape}")


# ------------------------------------------------------------------------------ hard negatives
def _sample(stream, rows, queries, keys, row_ids, col_ids, temperature):
    """One column per query row, drawn from softmax(queries @ keys.T / temperature) with every
    column of the row's own image masked; (index, valid). `rows` are the queries' global rows:
    each draws from fold_in(stream, row), whatever device holds it."""
    logits = similarity(queries, keys) / temperature
    candidate = row_ids[:, None] != col_ids[None, :]
    logits = jnp.where(candidate, logits, -jnp.inf)
    draw = jax.vmap(lambda row, logits: jax.random.categorical(
        jax.random.fold_in(stream, row), logits))
    index = draw(rows, logits).astype(jnp.int32)
    # A row that shares its image with the whole batch has no negative (its draw is garbage).
    valid = jnp.any(candidate, axis=1)
    return jnp.where(valid, index, rows), valid


def hard_negative_indices(rng, image_feat, text_feat, image_ids, temperature, *,
                          mesh: Mesh | None = None, batch_axes: Sequence[str] = BATCH_AXES):
    """BLIP's hard negatives: (neg_text_index, neg_image_index, valid_text, valid_image), each [B].

    For image row i, `neg_text_index[i]` is a global text row drawn with probability
    softmax(image_feat[i] . text_feat / temperature) over the texts of other images; for text row
    j, `neg_image_index[j]` likewise from text_feat[j] . image_feat. `valid_*` is False (and the
    index the row itself) where every row of the batch shows the row's image. Unlike BLIP, no
    1e-4 is added to the weights: the draw is exactly the masked softmax, via Gumbel-max in float32.
    """
    _check_features(image_feat, text_feat, image_ids)
    image_feat, text_feat, temperature = _f32(image_feat), _f32(text_feat), _f32(temperature)
    image_ids = jnp.asarray(image_ids, jnp.int32)
    i2t_stream, t2i_stream = jax.random.split(rng)
    batch = image_feat.shape[0]

    def mine(i2t_stream, t2i_stream, rows, zimg, ztxt, ids, zimg_all, ztxt_all, ids_all, t):
        neg_text, valid_text = _sample(i2t_stream, rows, zimg, ztxt_all, ids, ids_all, t)
        neg_image, valid_image = _sample(t2i_stream, rows, ztxt, zimg_all, ids, ids_all, t)
        return neg_text, neg_image, valid_text, valid_image

    if mesh is None:  # the reference; under an explicit-sharding mesh it runs replicated
        rows = jnp.arange(batch, dtype=jnp.int32)
        zimg, ztxt, ids = _columns(image_feat), _columns(text_feat), _columns(image_ids)
        return mine(i2t_stream, t2i_stream, rows, zimg, ztxt, ids, zimg, ztxt, ids, temperature)
    axes, _ = _mesh_batch_axes(mesh, batch_axes, batch)

    def local(i2t_stream, t2i_stream, zimg, ztxt, ids, t):
        rows = lax.axis_index(axes) * zimg.shape[0] + jnp.arange(zimg.shape[0], dtype=jnp.int32)
        gather = lambda x: lax.all_gather(x, axes, tiled=True)  # noqa: E731
        return mine(i2t_stream, t2i_stream, rows.astype(jnp.int32), zimg, ztxt, ids,
                    gather(zimg), gather(ztxt), gather(ids), t)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes), P(axes), P()),
                         out_specs=(P(axes),) * 4)(
        i2t_stream, t2i_stream, image_feat, text_feat, image_ids, temperature)


def gather_rows(x, index, *, mesh: Mesh | None = None, batch_axes: Sequence[str] = BATCH_AXES):
    """x[index]: rows `index` ([B] global rows, sharded like x's batch) of x [B, ...]. With a mesh
    each device all-gathers x and takes its own rows; the gradient (all_gather's transpose, a
    reduce-scatter) flows back to the devices that hold the chosen rows."""
    if index.ndim != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"index must be [B] = {x.shape[:1]} for x {x.shape}, got {index.shape}")
    if mesh is None:
        return _columns(x)[index]
    axes, _ = _mesh_batch_axes(mesh, batch_axes, x.shape[0])

    def local(x, index):
        return lax.all_gather(x, axes, tiled=True)[index]

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes))(
        x, index)


# ----------------------------------------------------------------------------------------- ITM
def itm_loss(logits_pos, logits_neg, valid_neg, *, valid_pos=None):
    """(loss, accuracy) of the ITM head: mean cross-entropy over the counted pairs, positives
    [..., 2] labelled 1 (match), negatives [..., 2] labelled 0, counted where `valid_neg`
    (and `valid_pos`, default all: e.g. batch padding) is True. Both float32; 0 when none count."""
    logits_pos = _f32(logits_pos).reshape(-1, 2)
    logits_neg = _f32(logits_neg).reshape(-1, 2)
    valid_neg = jnp.asarray(valid_neg, bool).reshape(-1)
    if valid_neg.shape[0] != logits_neg.shape[0]:
        raise ValueError(f"valid_neg has {valid_neg.shape[0]} entries for "
                         f"{logits_neg.shape[0]} negative pairs")
    if valid_pos is None:
        valid_pos = jnp.ones(logits_pos.shape[:1], bool)
    valid_pos = jnp.asarray(valid_pos, bool).reshape(-1)
    logits = jnp.concatenate([logits_pos, logits_neg])
    labels = jnp.concatenate([jnp.ones(logits_pos.shape[:1], jnp.int32),
                              jnp.zeros(logits_neg.shape[:1], jnp.int32)])
    counted = jnp.concatenate([valid_pos, valid_neg])
    # Zero an uncounted pair's logits first: a non-finite one (e.g. a padding row's) would turn
    # the sum, and through logsumexp's VJP the gradient, into NaN even when masked afterwards.
    logits = jnp.where(counted[:, None], logits, 0.0)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, labels[:, None], axis=-1)[:, 0]
    count = jnp.maximum(jnp.sum(counted), 1).astype(F32)
    loss = jnp.sum(jnp.where(counted, nll, 0.0)) / count
    correct = (jnp.argmax(logits, axis=-1) == labels) & counted
    return loss, jnp.sum(correct).astype(F32) / count


# ------------------------------------------------------------------- ITC with momentum distillation
def _distill_sum(img, txt, img_m, txt_m, ids, cols_img_m, cols_txt_m, col_ids, t, alpha):
    """Sum over the given rows of the i2t and t2i soft-target cross-entropies (not yet halved or
    averaged). Columns: the momentum features of the global batch then the queue; a column with
    id EMPTY_ID is out of every softmax."""
    col_valid = col_ids != EMPTY_ID
    positive = (ids[:, None] == col_ids[None, :]) & col_valid[None, :]
    hard = positive.astype(F32)
    hard = hard / jnp.maximum(jnp.sum(hard, axis=1, keepdims=True), 1.0)

    def log_softmax(logits):
        logits = jnp.where(col_valid[None, :], logits, -jnp.inf)
        return jnp.where(col_valid[None, :], jax.nn.log_softmax(logits, axis=1), 0.0)

    def direction(queries, queries_m, keys_m):
        logp = log_softmax(similarity(queries, keys_m) / t)
        # The momentum model's own distribution is a target: no gradient (nor through t).
        soft = jnp.exp(log_softmax(similarity(queries_m, keys_m) / t))
        targets = lax.stop_gradient(alpha * soft + (1.0 - alpha) * hard)
        return -jnp.sum(logp * targets)

    return direction(img, img_m, cols_txt_m) + direction(txt, txt_m, cols_img_m)


def itc_distill_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_ids, temperature,
                     *, image_queue=None, text_queue=None, id_queue=None, alpha=0.4,
                     mesh: Mesh | None = None, batch_axes: Sequence[str] = BATCH_AXES):
    """BLIP's ITC: (mean_i CE(i2t) + mean_j CE(t2i)) / 2, float32 scalar.

    Rows are the current L2-normalised features [B, D]; columns the momentum features of the global
    batch followed by the queue ([Q, D] features, [Q] ids, EMPTY_ID = empty). Targets are
    alpha * softmax(momentum sims) + (1 - alpha) * (ids equal, normalised per row). The momentum
    features and queues get no gradient (they come from the EMA model). Batch ids must be >= 0
    (EMPTY_ID marks only queue slots). With a mesh, each device
    scores its rows against all-gathered momentum columns; value and gradients equal mesh=None.
    """
    _check_features(image_feat, text_feat, image_ids)
    if image_feat_m.shape != image_feat.shape or text_feat_m.shape != text_feat.shape:
        raise ValueError(f"momentum features must be [B, D] = {image_feat.shape}, got "
                         f"{image_feat_m.shape} and {text_feat_m.shape}")
    queues = (image_queue, text_queue, id_queue)
    if any(q is None for q in queues) != all(q is None for q in queues):
        raise ValueError("give all of image_queue, text_queue, id_queue, or none of them")
    if image_queue is not None and (image_queue.shape != text_queue.shape
                                    or image_queue.shape[1:] != image_feat.shape[1:]
                                    or id_queue.shape != image_queue.shape[:1]):
        raise ValueError(f"queues must be [Q, D] with D = {image_feat.shape[1]} and ids [Q], got "
                         f"{image_queue.shape}, {text_queue.shape}, {id_queue.shape}")
    image_feat, text_feat, temperature, alpha = map(_f32, (image_feat, text_feat, temperature,
                                                           alpha))
    image_feat_m, text_feat_m = (lax.stop_gradient(_f32(z)) for z in (image_feat_m, text_feat_m))
    image_ids = jnp.asarray(image_ids, jnp.int32)
    queue = () if image_queue is None else (
        lax.stop_gradient(_f32(image_queue)), lax.stop_gradient(_f32(text_queue)),
        jnp.asarray(id_queue, jnp.int32))
    batch = image_feat.shape[0]

    def columns(img_m_all, txt_m_all, ids_all, *queue):
        if not queue:
            return img_m_all, txt_m_all, ids_all
        return tuple(jnp.concatenate([a, q]) for a, q in zip((img_m_all, txt_m_all, ids_all),
                                                             queue))

    if mesh is None:
        cols = columns(_columns(image_feat_m), _columns(text_feat_m), _columns(image_ids), *queue)
        total = _distill_sum(image_feat, text_feat, image_feat_m, text_feat_m, image_ids, *cols,
                             temperature, alpha)
        return total / (2 * batch)
    axes, _ = _mesh_batch_axes(mesh, batch_axes, batch)

    def local(img, txt, img_m, txt_m, ids, t, alpha, *queue):
        gather = lambda x: lax.all_gather(x, axes, tiled=True)  # noqa: E731
        cols = columns(gather(img_m), gather(txt_m), gather(ids), *queue)
        return lax.psum(_distill_sum(img, txt, img_m, txt_m, ids, *cols, t, alpha),
                        axes) / (2 * batch)

    specs = (P(axes),) * 5 + (P(),) * (2 + len(queue))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(
        image_feat, text_feat, image_feat_m, text_feat_m, image_ids, temperature, alpha, *queue)


def enqueue(queue_feats, queue_ids, ptr, feats, ids):
    """Ring buffer write: the global batch's momentum features [B, D] and ids [B] go to slots
    ptr, ptr + 1, ... (mod Q); returns (queue_feats, queue_ids, new ptr). BLIP requires Q to be a
    multiple of B; wrapping lifts that, but B > Q would overwrite its own rows and is an error."""
    size, batch = queue_feats.shape[0], feats.shape[0]
    if batch > size:
        raise ValueError(f"batch {batch} is larger than the queue ({size} slots)")
    if feats.shape[1:] != queue_feats.shape[1:] or ids.shape != (batch,) or (
            queue_ids.shape != (size,)):
        raise ValueError(f"feats {feats.shape} / ids {ids.shape} do not fit queue "
                         f"{queue_feats.shape} / ids {queue_ids.shape}")
    ptr = jnp.asarray(ptr, jnp.int32)
    slots = (ptr + jnp.arange(batch, dtype=jnp.int32)) % size
    # The queue is replicated (every device scores against all of it): so is what goes in.
    feats = _columns(lax.stop_gradient(feats)).astype(queue_feats.dtype)
    queue_feats = queue_feats.at[slots].set(feats, unique_indices=True)
    queue_ids = queue_ids.at[slots].set(_columns(ids).astype(queue_ids.dtype), unique_indices=True)
    return queue_feats, queue_ids, (ptr + batch) % size


def momentum_update(params_m, params, momentum=0.995):
    """EMA of the online model: params_m <- momentum * params_m + (1 - momentum) * params."""
    return jax.tree.map(
        lambda m, p: (momentum * m + (1.0 - momentum) * p).astype(m.dtype), params_m, params)


def itc_loss(image_feat, text_feat, image_ids, temperature, *, mesh: Mesh | None = None,
             batch_axes: Sequence[str] = BATCH_AXES):
    """ITC without momentum distillation (BLIP-2's): `itc_distill_loss` with alpha 0, so the
    targets are the id-equality ones (rows of one image are each other's positives)."""
    return itc_distill_loss(image_feat, text_feat, image_feat, text_feat, image_ids, temperature,
                            alpha=0.0, mesh=mesh, batch_axes=batch_axes)
