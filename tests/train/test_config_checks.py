"""The whole config is validated before the workdir is touched; the saved config is compared
only when a checkpoint exists, and only on keys that can change the trained params."""
import json
import os
import re

import jax
import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax.train import checkpoint, trainer


def quick_config(data_dir, *overrides):
    """The tiny config for 1-3 steps without evaluators (they are not what is tested here)."""
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "total_steps=1",
                                        *overrides])
    with config.unlocked():
        config.evals = {}
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_typo_in_evals_writes_nothing_and_the_corrected_rerun_trains(data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = quick_config(data_dir)
    with config.unlocked():
        config.evals = {"test": {"type": "zero_shot", "data": {"split": "test"},
                                 "templates": "vlm_shapes", "evrey": 5}}
    with pytest.raises(config_lib.ConfigError, match="evrey"):
        trainer.train(config, str(workdir))
    assert not workdir.exists()  # no config.json, no checkpoints directory
    result = trainer.train(quick_config(data_dir), str(workdir))
    assert int(result.state.step) == 1
    assert json.load(open(workdir / "config.json"))["evals"] == {}


def test_config_json_without_a_checkpoint_does_not_block_a_new_config(data_dir, tmp_path):
    os.makedirs(tmp_path / "checkpoints")  # what a run that failed before its first save leaves
    (tmp_path / "config.json").write_text(json.dumps({"optim": {"lr": 123.0}}))
    result = trainer.train(quick_config(data_dir), str(tmp_path))
    assert int(result.state.step) == 1
    assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] != 123.0


def test_result_neutral_keys_are_no_change():
    old = {"data": {"data_dir": "/a", "split": "train"}, "log_every": 5,
           "checkpoint": {"every": 3}, "optim": {"lr": 0.1}, "evals": {"t": {"every": 1}},
           "input": {"prefetch_batches": 2, "global_batch_size": 8}}
    new = {"data": {"data_dir": "/b", "split": "train"}, "log_every": 50,
           "checkpoint": {"every": 30, "keep": 1}, "optim": {"lr": 0.2},
           "evals": {"t": {"every": 2}, "u": {}}, "input": {"prefetch_batches": 8,
                                                           "global_batch_size": 16}}
    assert trainer._changed_keys(old, new) == ["input.global_batch_size", "optim.lr"]


def test_resume_accepts_result_neutral_changes_and_refuses_others(data_dir, tmp_path):
    trainer.train(quick_config(data_dir, "total_steps=2"), str(tmp_path), stop_after=1)
    resumed = trainer.train(quick_config(data_dir, "total_steps=2", "log_every=1",
                                         "checkpoint.every=1"), str(tmp_path))
    assert int(resumed.state.step) == 2
    with pytest.raises(trainer.ConfigMismatchError, match="optim.lr"):
        trainer.train(quick_config(data_dir, "total_steps=2", "optim.lr=0.5"), str(tmp_path))


def test_nonfinite_stop_keeps_the_last_checkpoint_intact(data_dir, tmp_path):
    """A run diverges after a checkpoint: config.nonfinite='stop' raises before saving, and the
    checkpoint still restores to the params of the healthy run."""
    healthy = trainer.train(quick_config(data_dir, "total_steps=3"), str(tmp_path))
    diverging = quick_config(data_dir, "total_steps=6", "nonfinite='stop'", "optim.lr=1e30",
                             "optim.warmup_steps=0",
                             "optim.schedule='constant'", "log_every=1", "checkpoint.every=1")
    with pytest.raises(trainer.NonFiniteError, match="non-finite") as error:
        trainer.train(diverging, str(tmp_path), allow_config_change=True)
    failed_at = int(re.search(r"before step (\d+)", str(error.value)).group(1))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert 3 <= steps[-1] < failed_at  # nothing saved from the step that went non-finite
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            healthy.state.params)
    restored = checkpoint.restore_params(str(tmp_path), abstract, step=3)
    for a, b in zip(jax.tree.leaves(healthy.state.params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    latest = checkpoint.restore_params(str(tmp_path), abstract)  # whatever was saved last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(latest))
