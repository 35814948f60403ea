"""python -m vlmjax.eval --workdir DIR [--step N] [--model SRC] [--config FILE[:PRESETS]]
                       [--config.KEY=VALUE ...]

Runs the evaluators of a config on one set of params, prints the metric table and appends the
metrics to DIR/metrics.jsonl (and DIR/tensorboard) at the step:
  params   DIR's checkpoint at --step (default: the latest), or with --model SRC a pretrained
           source read by vlmjax.convert.load_pretrained (HF directory, converted directory,
           big_vision .npz, another trainer workdir); its step is --step (default 0)
  config   DIR/config.json (what the run was trained with), or --config FILE[:PRESETS]
           (e.g. configs/siglip/finetune_from_hf.py:src=SRC for an HF model)
  --config.KEY=VALUE overrides, e.g. --config.evals.test.batch_size=64 or
           --config.evals.imagenet.data.data_dir=/tfds
Every evaluator runs, whatever its `every`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_config(workdir: str, config_spec: str | None, overrides: list[str]):
    import ml_collections

    from vlmjax import config as config_lib, gfile
    if config_spec:
        config = config_lib.load_config(config_spec)
    else:
        path = gfile.join(workdir, "config.json")
        if not gfile.exists(path):
            raise config_lib.ConfigError(f"{path} does not exist: pass --config FILE for a "
                                         "directory that is not a trainer workdir")
        config = ml_collections.ConfigDict(json.loads(gfile.read_text(path)))
    return config_lib.apply_overrides(config, overrides)


def latest_step(workdir: str) -> int:
    from vlmjax import gfile
    directory = gfile.join(workdir, "checkpoints")
    steps = ([int(name) for name in _listdir(directory) if name.isdigit()]
             if gfile.exists(directory) else [])
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}; evaluate a pretrained source "
                                "with --model SRC")
    return max(steps)


def _listdir(directory: str) -> list[str]:
    from vlmjax.data.tf_cpu import tf  # gs:// and local alike
    return [name.rstrip("/") for name in tf.io.gfile.listdir(directory)]


def evaluate(workdir: str, step: int | None = None, model: str | None = None,
             config_spec: str | None = None, overrides: list[str] = ()) -> tuple[int, dict]:
    """(step, metrics) of the evaluators of the config on the params (see the module docstring);
    the metrics are appended to workdir/metrics.jsonl."""
    config = load_config(workdir, config_spec, list(overrides))  # before the slow imports
    import jax

    from vlmjax import gfile, sharding
    from vlmjax.evals.schedule import Schedule
    from vlmjax.train import checkpoint, metrics as metrics_lib
    from vlmjax.train.tasks import get_task

    mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
    task = get_task(config.task)(config, mesh)
    with jax.set_mesh(mesh):
        if model:
            abstract, shardings = checkpoint.task_param_shardings(task, config, mesh)
            params, step = task.pretrained_params(model, abstract, shardings), step or 0
        else:
            step = latest_step(workdir) if step is None else int(step)
            params = checkpoint.restore_task_params(task, config, mesh, workdir, step)
        schedule = Schedule(task.evaluators(config.get("evals", {})))
        if not schedule.evaluators:
            raise ValueError("the config has no evaluators (config.evals); add one with "
                             "--config FILE")
        results = schedule.run(params, step, last=True)
    gfile.makedirs(workdir)
    writer = metrics_lib.MetricsWriter(workdir)
    writer.write(step, results)
    writer.close()
    return step, results


def format_table(step: int, results: dict) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'metric':{width}s}  value (step {step})"]
    lines += [f"{key:{width}s}  {value:.4f}" for key, value in sorted(results.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.eval",
                                     description=__doc__.split("\n\n")[1].splitlines()[0])
    parser.add_argument("--workdir", required=True,
                        help="trainer workdir (params, config) and where metrics are written")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--model", default=None, help="a pretrained source instead of DIR's "
                                                      "checkpoint (vlmjax.convert.load_pretrained)")
    parser.add_argument("--config", default=None, help="config file[:presets] instead of "
                                                       "DIR/config.json")
    args, rest = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    from vlmjax.config import ConfigError
    try:
        step, results = evaluate(args.workdir, args.step, args.model, args.config, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(step, results), flush=True)
    return 0
