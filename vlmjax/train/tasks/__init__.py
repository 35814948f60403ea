"""Tasks: what a learning strategy adds to the shared trainer.

A task is a class built as `Task(config, mesh)` that satisfies the `Task` protocol of
`vlmjax/train/tasks/base.py` (config_keys, init_params, pretrained_params, trainable,
extra_state / update_extra, loss_fn, example_transform, train_input, evaluators,
summary_metrics, flops_per_example, compute_dtype); subclassing `base.TaskDefaults` supplies the
optional members. Registering a task is one line in `TASKS`: name -> "module:Class", imported
only when a config names it.
"""
from __future__ import annotations

import importlib

from vlmjax.config import ConfigError

TASKS = {
    "contrastive": "vlmjax.train.tasks.contrastive:ContrastiveTask",
    "lm": "vlmjax.train.tasks.lm:LMTask",
    "llava": "vlmjax.train.tasks.llava:LlavaTask",
    "blip": "vlmjax.train.tasks.blip:BlipTask",
    "blip2": "vlmjax.train.tasks.blip2:Blip2Task",
    "fusion": "vlmjax.train.tasks.fusion:FusionTask",
}


def get_task(name: str):
    if name not in TASKS:
        raise ConfigError(f"config.task {name!r} is not one of {sorted(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
