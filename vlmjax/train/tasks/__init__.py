"""Tasks: what a learning strategy adds to the shared trainer.

A task class is built as `Task(config, mesh)` and provides:
  init_params(rng) -> boxed params (nn.LogicallyPartitioned leaves)
  loss_fn(params, batch, rng) -> (loss, metrics)     (pure; jitted by the trainer)
  train_input(data_state, shard, num_shards) -> iterator of numpy batches of data shard `shard`
                                         of `num_shards`, with .get_state() and .skip_counts
                                         (see vlmjax/train/input_shards.py)
  evaluators() -> vlmjax.train.evaluation.Schedule
  flops_per_example(batch_size) -> float
"""
from __future__ import annotations

import importlib

from vlmjax.config import ConfigError

TASKS = {"contrastive": "vlmjax.train.tasks.contrastive:ContrastiveTask"}


def get_task(name: str):
    if name not in TASKS:
        raise ConfigError(f"config.task {name!r} is not one of {sorted(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
