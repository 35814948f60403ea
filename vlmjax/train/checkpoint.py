"""Orbax checkpoints of the train state (step, params, optimiser, extra state: the task's and
the EMA, rng) and the data-iterator positions.

Layout: WORKDIR/checkpoints/<step>/{state, data}. `state` is written by all processes together
(each its shards of the arrays); `data/process_<i>.json` by process i alone: the positions of the
data shards it reads. Saves are asynchronous; `every` steps and at the end; the last `keep` are
kept, plus every step that is a multiple of `keep_period` (if > 0). Restoring takes abstract
arrays carrying the *target* shardings, so a checkpoint written on one mesh, or by another number
of processes, restores into another. WORKDIR may be a gs:// path.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args

from vlmjax import gfile


class ProcessJsonHandler(ocp.handlers.CheckpointHandler):
    """Every process writes its own JSON file; restore returns all of them by process index."""

    def save(self, directory, args: "ProcessJsonSave"):
        path = directory / f"process_{jax.process_index()}.json"
        path.write_text(json.dumps(args.item))

    def restore(self, directory, args: "ProcessJsonRestore | None" = None) -> dict[int, Any]:
        found = {}
        for path in directory.iterdir():
            match = re.fullmatch(r"process_(\d+)\.json", path.name)
            if match:
                found[int(match.group(1))] = json.loads(path.read_text())
        return found


@checkpoint_args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@checkpoint_args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int = 3, keep_period: int = 0,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=max(int(keep), 1),
            keep_period=int(keep_period) or None, enable_async_checkpointing=async_save,
            create=True)
        self.every = max(int(every), 1)
        self.directory = gfile.join(gfile.absolute(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> bool:
        """Saves now (the trainer decides when: every `every` steps, at the end, on SIGTERM).
        `data_state`: this process's JSON-able input position."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ProcessJsonSave(data_state))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict[int, Any]]:
        """(state, {process index: the data state it saved})."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ProcessJsonRestore()))
        return restored["state"], dict(restored["data"])

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Only the params of a trainer checkpoint (for evaluation, export or model_init)."""
    directory = gfile.join(gfile.absolute(workdir), "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {"params": abstract_params},
                restore_args=ocp.checkpoint_utils.construct_restore_args(
                    {"params": abstract_params}), partial_restore=True)))
    return restored["state"]["params"]


def task_param_shardings(task, config, mesh):
    """(abstract params, their shardings) of `task`'s model on `mesh`, as the trainer lays them
    out (config.sharding_rules)."""
    import flax.linen as nn

    from vlmjax import sharding
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    shardings = sharding.param_shardings(boxed, mesh,
                                         sharding.logical_rules(config.get("sharding_rules")))
    return nn.meta.unbox(boxed), shardings


def restore_task_params(task, config, mesh, workdir: str, step: int | None = None):
    """`task`'s params of a trainer checkpoint (default: the latest), placed on `mesh` as
    training places them; call under `jax.set_mesh(mesh)`."""
    abstract, shardings = task_param_shardings(task, config, mesh)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return restore_params(workdir, placed, step)
