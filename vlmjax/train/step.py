"""Train state and the jitted train step (task loss, frozen params, extra state, optax update).

Frozen parameters: `trainable` (a regex of '/'-joined parameter paths, a boolean mask pytree, or
None = all) splits the params before `jax.value_and_grad`. Only the trainable part is
differentiated and updated; the frozen part is closed over, so XLA computes no gradient for it,
the optimiser state has no leaves for it (`optax.MaskedNode` in its place) and it is not in
`grad_norm`.

Extra state (`TrainState.extra`): task state beside the params that gradients do not train
(momentum encoders, feature queues), updated inside the step by the task's
`update_extra(extra, params, batch_out)` (`batch_out`: the loss function's aux dict). The EMA of
the trainable params (`optim.ema_decay`) lives there too, as `extra["ema"]`; the task's part is
`extra["task"]`. Both are part of the state, so checkpoints save and restore them.

Gradient accumulation (`optim.accum_steps` = A > 1) splits the global batch into A micro-batches,
so that activations are held for B / A examples at a time. `optim.accum` says how they combine:
- `naive` averages the micro-batches' gradients (and aux outputs). For a per-example loss that
  is the full-batch gradient; for a contrastive loss each micro-batch only sees its own B / A
  negatives, which is another loss.
- `exact` (GradCache, Gao et al. 2021; open_clip's accumulation) computes the full-batch loss for
  a task with the `ExactAccumTask` hooks (tasks/base.py: `embed`, `loss_from_embeddings`):
  (1) embed every micro-batch without gradients, (2) the loss of the full batch of embeddings
  and its gradient w.r.t. them and w.r.t. the loss's own params (temperature, bias), (3) per
  micro-batch, the towers' VJP with the cached embedding gradients, summed. Costs one more
  forward pass of the towers; loss, aux and gradients equal the full-batch step's.
- `auto` (the default) is `exact` where the task has the hooks, else `naive`.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.train.optim import path_str
from vlmjax.train.tasks.base import ExactAccumTask

NONFINITE_POLICIES = ("skip", "stop")
FROZEN = optax.MaskedNode()  # stands for a leaf of the other part in a split tree


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: updates applied (and batches consumed)
    params: Any
    opt_state: Any           # of the trainable params only
    rng: jax.Array           # uint32[2] raw key: the step's rng is fold_in(rng, step)
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss/gradient
    extra: Any = flax.struct.field(default_factory=dict)  # {"task": ..., "ema": ...}


def trainable_mask(params, trainable=None, freeze: str = ""):
    """Boolean pytree over `params` (arrays or shapes): True = trained. `trainable` is the
    task's choice (None = all, a regex searched in each '/'-joined path, or a bool pytree);
    `freeze` (optim.freeze) is a regex of paths frozen on top of it."""
    if trainable is None:
        mask = jax.tree.map(lambda _: True, params)
    elif isinstance(trainable, str):
        pattern = re.compile(trainable)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, _: bool(pattern.search(path_str(path))), params)
    else:
        if jax.tree.structure(trainable) != jax.tree.structure(params):
            raise ValueError("a trainable mask must have the params' tree structure, got "
                             f"{jax.tree.structure(trainable)}")
        mask = jax.tree.map(bool, trainable)
    if freeze:
        frozen = re.compile(freeze)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, m: m and not frozen.search(path_str(path)), mask)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(f"no parameter is trainable (task trainable {trainable!r}, "
                          f"optim.freeze {freeze!r}): at least one must be")
    return mask


def split_params(params, mask):
    """(trainable, frozen): two trees shaped like `params`, each with FROZEN where the other
    part's leaves are (FROZEN has no leaves: optax and orbax skip it)."""
    trainable = jax.tree.map(lambda m, p: p if m else FROZEN, mask, params)
    frozen = jax.tree.map(lambda m, p: FROZEN if m else p, mask, params)
    return trainable, frozen


def merge_params(mask, trainable, frozen):
    return jax.tree.map(lambda m, t, f: t if m else f, mask, trainable, frozen,
                        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def init_state(params, tx: optax.GradientTransformation, rng, *, trainable=None,
               task_extra=None, ema: bool = False) -> TrainState:
    """`trainable`: a mask from `trainable_mask` (None = all). `ema`: keep an EMA of the
    trainable params in extra["ema"], starting at the params."""
    mask = trainable_mask(params, trainable) if not _is_mask(trainable) else trainable
    train, _ = split_params(params, mask)
    extra = {"task": {} if task_extra is None else task_extra}
    if ema:
        extra["ema"] = train
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(train),
                      rng=rng, nonfinite_steps=jnp.zeros([], jnp.int32), extra=extra)


def _is_mask(trainable) -> bool:
    return trainable is not None and not isinstance(trainable, str)


def ema_params(state: TrainState, mask):
    """The params with the trainable part replaced by its EMA (frozen params have none)."""
    _, frozen = split_params(state.params, mask)
    return merge_params(mask, state.extra["ema"], frozen)


def _constrain_batch(x, mesh, batch_dim: int):
    """Shard dim `batch_dim` of `x` over the batch axes (nothing to do without a mesh)."""
    if mesh is None:
        return x
    spec = P(*(None,) * batch_dim, sharding.BATCH_AXES, *(None,) * (x.ndim - batch_dim - 1))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _micro_batches(batch, accum: int, mesh):
    """[B, ...] -> [A, B/A, ...] with micro-batch k = rows k, k+A, k+2A, ...: every micro-batch
    then spreads evenly over the devices holding the batch. `batch`: any pytree of arrays."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch {x.shape[0]} is not divisible by optim.accum_steps {accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return _constrain_batch(x, mesh, batch_dim=1)
    return jax.tree.map(split, batch)


def _full_batch(micro, mesh):
    """The inverse of `_micro_batches`: [A, B/A, ...] -> [B, ...] in the batch's row order."""
    def join(x):
        x = x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        return _constrain_batch(x, mesh, batch_dim=0)
    return jax.tree.map(join, micro)


def resolve_accum(accum: str, task=None) -> str:
    """optim.accum ('auto' | 'exact' | 'naive') for `task` -> 'exact' | 'naive'. 'exact' needs
    a task with the ExactAccumTask hooks (a ConfigError otherwise); 'auto' takes it if there."""
    supports_exact = isinstance(task, ExactAccumTask)
    if accum == "auto":
        return "exact" if supports_exact else "naive"
    if accum == "exact" and not supports_exact:
        name = "this loss" if task is None else f"task {type(task).__name__}"
        raise ConfigError(
            f"optim.accum='exact' needs a task with the exact-accumulation hooks `embed` and "
            f"`loss_from_embeddings` (ExactAccumTask in vlmjax/train/tasks/base.py; the "
            f"contrastive task has them), and {name} has none: use optim.accum='naive' (or "
            f"'auto')")
    if accum not in ("exact", "naive"):
        raise ConfigError(f"optim.accum {accum!r} is not one of ('auto', 'exact', 'naive')")
    return accum


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, *,
                    accum_steps: int = 1, accum: str = "auto", task=None, mesh=None,
                    trainable=None, update_extra: Callable | None = None,
                    ema_decay: float = 0.0) -> Callable:
    """`loss_fn(params, extra, batch, rng) -> (loss, aux)` with `extra` the task's extra state
    ({} if none) and `aux` a dict: its scalars are logged, all of it is `batch_out` for
    `update_extra(extra, params, batch_out) -> extra` (called with the updated params).
    `trainable`: None (all), a regex of paths or a bool mask over the params (see
    `trainable_mask`); `tx` must be built for the trainable part (`split_params`).
    `ema_decay` > 0: state.extra["ema"] follows the trainable params (init_state(ema=True)).
    `accum` (optim.accum) with `task`: how `accum_steps` micro-batches combine (module
    docstring); 'exact' uses `task.embed` and `task.loss_from_embeddings` in place of `loss_fn`.

    Returns `step(state, batch) -> (state, metrics)`; a non-finite loss or gradient leaves
    params, optimiser and extra state unchanged and counts the step in `nonfinite_steps` (the
    trainer's policy decides whether to stop)."""
    exact = resolve_accum(accum, task) == "exact" and accum_steps > 1

    def step(state: TrainState, batch: dict):
        mask = trainable if _is_mask(trainable) else trainable_mask(state.params, trainable)
        train, frozen = split_params(state.params, mask)
        task_extra = state.extra.get("task", {})

        def loss_of_trainable(train_params, micro_batch, rng):
            return loss_fn(merge_params(mask, train_params, frozen), task_extra, micro_batch, rng)

        rng = jax.random.fold_in(state.rng, state.step)
        if exact:
            (loss, aux), grads = _exact_accum_grads(
                lambda train_params, micro_batch, rng: task.embed(
                    merge_params(mask, train_params, frozen), task_extra, micro_batch, rng),
                lambda train_params, embeddings, rng: task.loss_from_embeddings(
                    merge_params(mask, train_params, frozen), task_extra, embeddings, batch,
                    rng),
                train, batch, rng, accum_steps, mesh)
        else:
            (loss, aux), grads = _compute_grads(
                jax.value_and_grad(loss_of_trainable, has_aux=True), train, batch, rng,
                accum_steps, mesh)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        new_train = optax.apply_updates(train, updates)
        params = merge_params(mask, new_train, frozen)
        extra = dict(state.extra)
        if update_extra is not None:
            extra["task"] = update_extra(task_extra, params, aux)
        if ema_decay:
            extra["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                        state.extra["ema"], new_train)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state), extra=keep(extra, state.extra),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
        scalars = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
        metrics = {**scalars, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step),
                   "nonfinite_steps": new_state.nonfinite_steps}
        return new_state, metrics

    return step


def _compute_grads(grad_fn, params, batch, rng, accum_steps: int, mesh):
    if accum_steps == 1:
        return grad_fn(params, batch, rng)

    def body(carry, micro):
        index, micro_batch = micro
        out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

    # Shapes of the per-micro-batch outputs equal those of the full-batch call.
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, rng))
    micro = _micro_batches(batch, accum_steps, mesh)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda x: x / accum_steps, total)


def _exact_accum_grads(embed, loss_from_embeddings, params, batch, rng, accum_steps: int, mesh):
    """((loss, aux), grads) of the full batch, holding activations for one micro-batch at a
    time (GradCache). `embed(params, micro_batch, rng)`, `loss_from_embeddings(params,
    embeddings, rng)`; micro-batch k embeds with fold_in(rng, k) in both passes, so dropout
    masks match between the no-grad pass and the recomputation."""
    micro = _micro_batches(batch, accum_steps, mesh)
    indices = jnp.arange(accum_steps)

    # (1) Every micro-batch's embeddings, no gradients: only the [B, D] outputs are kept.
    def embed_micro(_, xs):
        index, micro_batch = xs
        return None, jax.lax.stop_gradient(
            embed(params, micro_batch, jax.random.fold_in(rng, index)))

    _, micro_embeddings = jax.lax.scan(embed_micro, None, (indices, micro))
    embeddings = _full_batch(micro_embeddings, mesh)

    # (2) The full-batch loss; its gradient w.r.t. the params is the loss's own params' part
    # (the towers are not in it), the one w.r.t. the embeddings is cached for (3).
    (loss, aux), (grads, embedding_grads) = jax.value_and_grad(
        loss_from_embeddings, argnums=(0, 1), has_aux=True)(params, embeddings, rng)

    # (3) Per micro-batch: re-run the towers and pull the cached gradients back through them.
    def backprop_micro(grads, xs):
        index, micro_batch, micro_embedding_grads = xs
        _, embed_vjp = jax.vjp(
            lambda p: embed(p, micro_batch, jax.random.fold_in(rng, index)), params)
        (micro_grads,) = embed_vjp(micro_embedding_grads)
        return jax.tree.map(jnp.add, grads, micro_grads), None

    grads, _ = jax.lax.scan(
        backprop_micro, grads,
        (indices, micro, _micro_batches(embedding_grads, accum_steps, mesh)))
    return (loss, aux), grads
