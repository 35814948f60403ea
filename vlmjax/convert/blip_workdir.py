"""`blip` (and `blip2`) trainer workdirs as a pretrained source: the run's task (model, tokenizer,
token ids, image size) and the params of a checkpoint; what CapFilt, the HF export and BLIP-2's
stage 2 (its stage-1 run) read.

    run = load_blip_workdir(WORKDIR)        # or WORKDIR/checkpoints/<step> (default: latest)
    run = load_blip_workdir(WORKDIR, task="blip2")
    run.task.model, run.params, run.task.tokenizer, run.task.token_ids, run.config, run.step
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from vlmjax import sharding
from vlmjax.convert import hf_io
from vlmjax.convert.workdir import VALUE_OP_NORMALISATION, trainer_checkpoint

TASK = "blip"


@dataclasses.dataclass
class BlipRun:
    task: Any            # the run's task (vlmjax.train.tasks.blip.BlipTask, ...)
    params: Any          # float32, placed on `mesh`
    config: ml_collections.ConfigDict
    mesh: Any
    workdir: str
    step: int


def is_blip_workdir(src: str) -> bool:
    found = trainer_checkpoint(src)
    return found is not None and hf_io.read_json(
        os.path.join(found[0], "config.json")).get("task") == TASK


def _check_tokenizer(config, where: str) -> None:
    """A vlm_shapes tokenizer lives beside the run's training data: say so if it is gone rather
    than building the dataset again."""
    from vlmjax.data import shapes
    if config.input.tokenizer != "vlm_shapes" or config.data.get("source") != "vlm_shapes":
        return
    data = config.data
    builder = shapes.make_builder(data.get("config") or "64px", data.get("data_dir"),
                                  train_size=data.get("train_size"),
                                  eval_size=data.get("eval_size"),
                                  novel_size=data.get("novel_size"),
                                  noise_fraction=data.get("noise_fraction"))
    path = shapes.tokenizer_path(builder)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: the run's tokenizer {path} does not exist (it is built "
                                "with its vlm_shapes data: data.data_dir in config.json)")


def load_blip_workdir(path: str, task: str = TASK) -> BlipRun:
    """The `task` run at `path` (a workdir or WORKDIR/checkpoints/<step>); errors name `path`."""
    from vlmjax.evals.cli import latest_step
    from vlmjax.train import checkpoint
    from vlmjax.train.tasks import get_task
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    found = trainer_checkpoint(path)
    if found is None:
        raise ValueError(f"{path} is not a trainer workdir (config.json with a task + "
                         "checkpoints/) or a checkpoint directory WORKDIR/checkpoints/<step>")
    workdir, step = found
    with open(os.path.join(workdir, "config.json")) as file:
        config = ml_collections.ConfigDict(json.load(file))
    if config.task != task:
        raise ValueError(f"{path} is a {config.task!r} run, not a {task!r} one (e.g. "
                         f"configs/{task}/tiny.py)")
    _check_tokenizer(config, path)
    mesh = sharding.make_mesh({"data": -1})
    task = get_task(config.task)(config, mesh)
    step = latest_step(workdir) if step is None else step
    with jax.set_mesh(mesh):
        params = checkpoint.restore_task_params(task, config, mesh, workdir, step)
    return BlipRun(task, params, config, mesh, workdir, step)


def hf_token_ids(token_ids: dict) -> dict:
    """The task's token ids as HF BLIP's text config ids: bos [DEC] (a caption's first token),
    sep and eos [SEP] (where captions stop), pad."""
    return {"bos_id": token_ids["dec"], "sep_id": token_ids["eos"], "eos_id": token_ids["eos"],
            "pad_id": token_ids["pad"]}


def model_config(run: BlipRun) -> dict:
    """The run's Blip arguments plus image_size / image_mean / image_std (from the value op of
    input.preprocess; None where it has no mean and std), as the HF export takes them."""
    from vlmjax.convert.hf_blip_export import model_config_of
    value_op = run.config.input.preprocess.split("|")[-1].strip()
    mean, std = VALUE_OP_NORMALISATION.get(value_op, (None, None))
    size = run.task.image_size
    return {**model_config_of(run.task.model), "image_size": [size, size], "image_mean": mean,
            "image_std": std}
