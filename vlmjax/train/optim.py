"""Optimisers and learning-rate schedules from `config.optim`.

Keys (defaults in `DEFAULTS`):
  name           adamw | adafactor | sgd (SGD with momentum)
  lr             peak learning rate
  schedule       cosine | linear | rsqrt | constant | step (after linear warmup from 0)
  warmup_steps   linear warmup length
  end_lr         learning rate at the end of cosine / linear decay; step's floor
  decay_every, decay_rate  step decay: lr * decay_rate ** floor(step / decay_every), counted
                 from step 0 (warmup included) and floored at end_lr; BLIP's per-epoch decay is
                 decay_every = steps per epoch
  rsqrt_timescale  rsqrt decay: lr / sqrt(1 + (step - warmup) / timescale)
  weight_decay   decoupled weight decay (AdamW-style: lr * wd * param)
  no_decay       regex of parameter paths without weight decay; parameters with fewer than 2
                 dims (norms, biases, temperature, logit bias) never decay
  b1, b2, eps    Adam moments (b1 is also Adafactor's momentum, 0 = none; SGD's momentum)
  clip_norm      global gradient-norm clipping (0 = off)
  freeze         regex of parameter paths that are not trained (e.g. '^image_tower/' for LiT),
                 on top of the task's `trainable`: frozen params get no gradient and no
                 optimiser state (train/step.py)
  ema_decay      keep an exponential moving average of the trainable params with this decay
                 (0 = off; e.g. 0.999), evaluated beside the raw params when evals.use_ema
  accum_steps    gradient accumulation over this many micro-batches (see train/step.py)
  accum          how micro-batches combine: exact (GradCache: the loss of the full batch, for
                 tasks with the ExactAccumTask hooks, i.e. contrastive ones) | naive (average
                 of the micro-batches' losses: for a contrastive loss each one sees only its own
                 negatives) | auto (exact where the task supports it, else naive)
Parameter paths are '/'-joined, e.g. 'text_tower/encoder/block0/mlp/fc1/kernel'.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from vlmjax.config import ConfigError, check_keys

DEFAULTS = dict(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=0, end_lr=0.0,
                rsqrt_timescale=10_000, decay_every=0, decay_rate=1.0, weight_decay=1e-4, no_decay="", b1=0.9, b2=0.999,
                eps=1e-8, clip_norm=1.0, freeze="", accum_steps=1, accum="auto",
                ema_decay=0.0)
SCHEDULES = ("cosine", "linear", "rsqrt", "constant", "step")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
ACCUM_MODES = ("auto", "exact", "naive")


def settings(optim_config) -> dict:
    check_keys(optim_config, DEFAULTS, "optim")
    out = {**DEFAULTS, **dict(optim_config)}
    if out["name"] not in OPTIMIZERS:
        raise ConfigError(f"optim.name {out['name']!r} is not one of {OPTIMIZERS}")
    if out["schedule"] not in SCHEDULES:
        raise ConfigError(f"optim.schedule {out['schedule']!r} is not one of {SCHEDULES}")
    if out["schedule"] == "step" and (int(out["decay_every"]) < 1
                                      or not 0.0 < float(out["decay_rate"]) <= 1.0):
        raise ConfigError(f"optim.schedule 'step' needs decay_every >= 1 (steps) and decay_rate "
                          f"in (0, 1], got {out['decay_every']} and {out['decay_rate']}")
    if int(out["accum_steps"]) < 1:
        raise ConfigError(f"optim.accum_steps must be >= 1, got {out['accum_steps']}")
    if out["accum"] not in ACCUM_MODES:
        raise ConfigError(f"optim.accum {out['accum']!r} is not one of {ACCUM_MODES}")
    if not 0.0 <= float(out["ema_decay"]) < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 = no EMA), got "
                          f"{out['ema_decay']}")
    return out


def make_schedule(cfg: dict, total_steps: int) -> optax.Schedule:
    lr, warmup = float(cfg["lr"]), int(cfg["warmup_steps"])
    decay_steps = max(total_steps - warmup, 1)
    if cfg["schedule"] == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg["end_lr"] / lr if lr else 0)
    elif cfg["schedule"] == "linear":
        decay = optax.linear_schedule(lr, cfg["end_lr"], decay_steps)
    elif cfg["schedule"] == "rsqrt":
        timescale = float(cfg["rsqrt_timescale"])
        decay = lambda step: lr / jnp.sqrt(1.0 + step / timescale)  # noqa: E731
    elif cfg["schedule"] == "step":
        every, rate, floor = int(cfg["decay_every"]), float(cfg["decay_rate"]), cfg["end_lr"]
        # join_schedules hands the decay (step - warmup); BLIP counts epochs from step 0.
        decay = lambda step: jnp.maximum(  # noqa: E731
            floor, lr * rate ** jnp.floor((step + warmup) / every))
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _path_labels(params, fn):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_str(path), leaf), params)


def make_optimizer(optim_config, total_steps: int, params) -> tuple[optax.GradientTransformation,
                                                                     optax.Schedule]:
    """The optax transformation for `params` (a pytree of arrays or shapes: the trainable part,
    see step.split_params; `optim.freeze` is applied there, not here) and its schedule."""
    cfg = settings(optim_config)
    schedule = make_schedule(cfg, total_steps)
    no_decay = re.compile(cfg["no_decay"]) if cfg["no_decay"] else None
    decay_mask = _path_labels(params, lambda path, leaf: len(leaf.shape) >= 2 and not (
        no_decay and no_decay.search(path)))

    if cfg["name"] == "adamw":
        tx = optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                         weight_decay=cfg["weight_decay"], mask=decay_mask)
    elif cfg["name"] == "adafactor":
        tx = optax.chain(
            optax.adafactor(schedule, momentum=cfg["b1"] or None,
                            multiply_by_parameter_scale=False),
            optax.masked(_decoupled_decay(schedule, cfg["weight_decay"]), decay_mask))
    else:  # SGD: weight decay as an L2 term added to the gradient, before momentum
        tx = optax.chain(optax.add_decayed_weights(cfg["weight_decay"], decay_mask),
                         optax.sgd(schedule, momentum=cfg["b1"] or None))
    if cfg["clip_norm"]:
        tx = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), tx)
    return tx, schedule


def _decoupled_decay(schedule, weight_decay: float) -> optax.GradientTransformation:
    """update -= lr(step) * wd * param, applied after the optimiser (as in AdamW)."""
    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        lr = schedule(state.count)
        updates = jax.tree.map(lambda u, p: u - lr * weight_decay * p, updates, params)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
