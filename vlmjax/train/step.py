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

Gradient accumulation (`optim.accum_steps` = A > 1) splits the global batch into A micro-batches
and averages their gradients (and the aux outputs). For contrastive losses this means each
micro-batch's loss sees only its own B / A negatives (like training at batch B / A with
A-times-larger steps' worth of data per update); it is *not* the full-batch loss that open_clip
reconstructs by caching and recomputing features. Use it to fit a model, not to emulate a larger
contrastive batch.
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


def _micro_batches(batch: dict, accum: int, mesh) -> dict:
    """[B, ...] -> [A, B/A, ...] with micro-batch k = rows k, k+A, k+2A, ...: every micro-batch
    then spreads evenly over the devices holding the batch."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch {x.shape[0]} is not divisible by optim.accum_steps {accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = P(None, sharding.BATCH_AXES, *(None,) * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return {k: split(v) for k, v in batch.items()}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, *,
                    accum_steps: int = 1, mesh=None, trainable=None,
                    update_extra: Callable | None = None, ema_decay: float = 0.0) -> Callable:
    """`loss_fn(params, extra, batch, rng) -> (loss, aux)` with `extra` the task's extra state
    ({} if none) and `aux` a dict: its scalars are logged, all of it is `batch_out` for
    `update_extra(extra, params, batch_out) -> extra` (called with the updated params).
    `trainable`: None (all), a regex of paths or a bool mask over the params (see
    `trainable_mask`); `tx` must be built for the trainable part (`split_params`).
    `ema_decay` > 0: state.extra["ema"] follows the trainable params (init_state(ema=True)).

    Returns `step(state, batch) -> (state, metrics)`; a non-finite loss or gradient leaves
    params, optimiser and extra state unchanged and counts the step in `nonfinite_steps` (the
    trainer's policy decides whether to stop)."""
    def step(state: TrainState, batch: dict):
        mask = trainable if _is_mask(trainable) else trainable_mask(state.params, trainable)
        train, frozen = split_params(state.params, mask)
        task_extra = state.extra.get("task", {})

        def loss_of_trainable(train_params, micro_batch, rng):
            return loss_fn(merge_params(mask, train_params, frozen), task_extra, micro_batch, rng)

        rng = jax.random.fold_in(state.rng, state.step)
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
