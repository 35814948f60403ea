"""Data parallel, FSDP and tensor parallel are config changes: same losses, sharded state."""
import json

import jax
import numpy as np
import pytest

from tests.train.test_trainer import (TRANSFORMER_PRESETS, data_dir,  # noqa: F401  (fixture)
                                      tiny_config)
from vlmjax.train import trainer

MESHES = {"dp": ("mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
          "dp_fsdp": ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"),
          "dp_fsdp_tp": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")}


def losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


def per_device_bytes(tree):
    """Bytes of the tree's leaves that device 0 holds."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == jax.devices()[0])


@pytest.mark.slow
def test_loss_trajectory_is_the_same_on_every_mesh(data_dir, tmp_path):  # noqa: F811
    results, trajectories = {}, {}
    for name, mesh in MESHES.items():
        config = tiny_config(data_dir, *mesh, "total_steps=20", "log_every=1",
                             "checkpoint.every=1000", "evals.zero_shot.splits=[]",
                             "evals.retrieval.splits=[]", "model.dtype='float32'",
                             presets=TRANSFORMER_PRESETS)
        results[name] = trainer.train(config, str(tmp_path / name))
        trajectories[name] = losses(tmp_path / name)
    reference = trajectories["dp"]
    assert len(reference) == 20 and reference[-1] < reference[0]
    for name, trajectory in trajectories.items():
        np.testing.assert_allclose(trajectory, reference, rtol=1e-5, err_msg=name)
        print(f"MESH {name}: max relative loss difference to data=8 over 20 steps "
              f"{np.max(np.abs(np.subtract(trajectory, reference)) / np.abs(reference)):.1e}")

    state = {name: result.state for name, result in results.items()}
    fc1 = lambda s: s.params["text_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]  # noqa
    query = lambda s: s.params["image_tower"]["encoder"]["block0"]["attn"]["query"]["kernel"]  # noqa
    assert fc1(state["dp"]).sharding.is_fully_replicated
    assert fc1(state["dp_fsdp"]).sharding.spec[0] == "fsdp"
    assert tuple(fc1(state["dp_fsdp_tp"]).sharding.spec) == ("fsdp", "tensor")
    assert tuple(query(state["dp_fsdp_tp"]).sharding.spec)[:2] == ("fsdp", "tensor")  # heads
    # FSDP shards the parameters and the Adam moments: each device holds a fraction of them.
    for part in ("params", "opt_state"):
        full = per_device_bytes(getattr(state["dp"], part))
        fsdp = per_device_bytes(getattr(state["dp_fsdp"], part))
        assert fsdp < 0.4 * full, (part, fsdp, full)
