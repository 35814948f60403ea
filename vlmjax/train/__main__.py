"""python -m vlmjax.train --config configs/siglip/tiny.py[:PRESETS] --workdir DIR [--config.KEY=VALUE ...]

Trains (or resumes) the config in DIR: progress lines on stdout, metrics.jsonl, TensorBoard
events, config.json and orbax checkpoints in DIR (a local or gs:// path). SIGTERM saves a
checkpoint and exits 0.

Multi-process runs (see vlmjax/distributed.py): on Cloud TPU, under SLURM (srun) and Open MPI
(mpirun) every process runs this same command and finds the others itself; elsewhere pass
--coordinator_address HOST:PORT --num_processes N --process_id I (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables; launch/local.sh does this). A plain
single-host run starts no coordinator.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlmjax import config as config_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:presets]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints and logs")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "resume a workdir whose saved config differs from this one")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0's coordinator (multi-process runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..N-1")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "multi-process: seconds without a heartbeat from a process after "
    "which every process stops with an error")
flags.mark_flags_as_required(["config", "workdir"])


def validate_overrides(argv: list[str]):
    """Fail early, with the nearest valid key, on a mistyped --config.KEY override."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[argv.index("--config") + 1]
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    if spec is None or not overrides:
        return
    config = config_lib.load_config(spec)
    valid = config_lib.flat_keys(config)
    for override in overrides:
        key = override.split("=", 1)[0]
        if key not in valid:
            raise config_lib.ConfigError(f"unknown config key {key!r}"
                                         f"{config_lib._suggest(key, valid)}")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax and tfds INFO/WARNING lines drown the progress
    from vlmjax import distributed  # before anything starts a jax backend
    try:
        cluster = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                         _PROCESS_ID.value,
                                         heartbeat_timeout_s=_HEARTBEAT.value)
    except ValueError as error:
        sys.exit(f"error: {error}")
    import jax
    if cluster is not None:
        print(f"process {jax.process_index()} of {jax.process_count()} ({cluster.kind}): "
              f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    from vlmjax.train import trainer  # after flag parsing: jax/TensorFlow import is slow
    try:
        result = trainer.train(_CONFIG.value, _WORKDIR.value,
                               allow_config_change=_ALLOW_CHANGE.value)
    except jax.errors.JaxRuntimeError as error:
        if cluster is None:
            raise
        sys.exit(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
                 f"{str(error).splitlines()[0]}\nAnother process has probably died (see its "
                 "log); rerun the same command on all processes to resume from the last "
                 "complete checkpoint.")
    if cluster is None or jax.process_index() == 0:
        print_final_table(result)


def print_final_table(result):
    """The last evaluation (fractions as percentages) and the task's summary metrics."""
    from vlmjax.train.metrics import summary_labels
    rows = [(k, v) for k, v in sorted(result.metrics.items())
            if not k.endswith("eval/seconds")]
    rows += [(f"train/{name}", result.train_metrics[name])
             for name, _ in summary_labels(result.summary_metrics)
             if name in result.train_metrics]
    if rows:
        print("final evaluation:" if result.metrics else "final metrics:")
    for key, value in rows:
        shown = f"{value:7.2%}" if key.split("/")[0] != "train" and 0 <= value <= 1 else (
            f"{value:7.4g}")
        print(f"  {key:32s} {shown}")

if __name__ == "__main__":
    try:
        validate_overrides(sys.argv[1:])
    except config_lib.ConfigError as error:
        sys.exit(f"error: {error}")
    app.run(main)
