"""Orbax checkpoints of the train state and the data-iterator position.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Saves are asynchronous; `every` steps and at the
end; the last `keep` are kept, plus every step that is a multiple of `keep_period` (if > 0).
Restoring takes abstract arrays carrying the *target* shardings, so a checkpoint written on one
mesh restores into another.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int = 3, keep_period: int = 0,
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=max(int(keep), 1),
            keep_period=int(keep_period) or None, enable_async_checkpointing=async_save,
            create=True)
        self.every = max(int(every), 1)
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> bool:
        """Saves now (the trainer decides when: every `every` steps, at the end, on SIGTERM)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["data"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Only the params of a trainer checkpoint (for evaluation, export or model_init)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
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
