"""Train state and the jitted train step (task loss, gradient accumulation, optax update).

Gradient accumulation (`optim.accum_steps` = A > 1) splits the global batch into A micro-batches
and averages their gradients. For contrastive losses this means each micro-batch's loss sees
only its own B / A negatives (like training at batch B / A with A-times-larger steps' worth of
data per update); it is *not* the full-batch loss that open_clip reconstructs by caching and
recomputing features. Use it to fit a model, not to emulate a larger contrastive batch.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

NONFINITE_POLICIES = ("skip", "stop")


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: updates applied (and batches consumed)
    params: Any
    opt_state: Any
    rng: jax.Array           # uint32[2] raw key: the step's rng is fold_in(rng, step)
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss/gradient


def init_state(params, tx: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng, nonfinite_steps=jnp.zeros([], jnp.int32))


def _micro_batches(batch: dict, accum: int, mesh) -> dict:
    """[B, ...] -> [A, B/A, ...] with micro-batch k = rows k, k+A, k+2A, ...: every micro-batch
    then spreads evenly over the devices holding the batch."""
    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"batch {x.shape[0]} is not divisible by optim.accum_steps {accum}")
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        spec = P(None, ("data", "fsdp"), *(None,) * (x.ndim - 2))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return {k: split(v) for k, v in batch.items()}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, *,
                    accum_steps: int = 1, mesh=None) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, metrics)`. Returns `step(state, batch) ->
    (state, metrics)`; a non-finite loss or gradient leaves params and optimiser state unchanged
    and counts the step in `nonfinite_steps` (the trainer's policy decides whether to stop)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, batch, rng):
        if accum_steps == 1:
            return grad_fn(params, batch, rng)

        def body(carry, micro):
            index, micro_batch = micro
            (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
            acc = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, rng))
        # Shapes of the per-micro-batch outputs equal those of the full-batch call.
        micro = _micro_batches(batch, accum_steps, mesh)
        (loss, metrics, grads), _ = jax.lax.scan(
            body, (zeros[0][0], zeros[0][1], zeros[1]), (jnp.arange(accum_steps), micro))
        return jax.tree.map(lambda x: x / accum_steps, ((loss, metrics), grads))

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = compute_grads(state.params, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step),
                   "nonfinite_steps": new_state.nonfinite_steps}
        return new_state, metrics

    return step
