"""End-to-end trainer runs on the tiny config: logs, checkpoints, exact resume, config checks."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax.train import trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# The tiny config's transformer towers (its recipe before the CNN one), for tests of
# transformer parameters and their sharding.
TRANSFORMER_PRESETS = "image=vit,text_depth=2,negatives=0,lr=1e-3"


def tiny_config(data_dir, *overrides, presets=""):
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal" +
                                    (f",{presets}" if presets else ""))
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])
    return config


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_runlocal_trains_logs_checkpoints_and_evaluates(data_dir, tmp_path):
    result = trainer.train(tiny_config(data_dir), str(tmp_path))
    assert {"zero_shot/validation/top1", "zero_shot/test/top1", "zero_shot/test_novel/top5",
            "retrieval/test_retrieval/i2t_r1", "retrieval/test_retrieval/t2i_r10"} <= set(
                result.metrics)
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in result.metrics if "/" in k
               and k.split("/")[0] in ("zero_shot", "retrieval"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]  # log_every=2 over 6 steps; it learns
    assert {"train/learning_rate", "train/temperature", "train/bias", "perf/examples_per_s",
            "perf/mfu"} <= set(records[0])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["loss"]["name"] == "siglip" and saved["total_steps"] == 6
    assert os.listdir(tmp_path / "tensorboard")


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    full = trainer.train(tiny_config(data_dir), str(tmp_path / "full"))
    first = trainer.train(tiny_config(data_dir), str(tmp_path / "split"), stop_after=4)
    assert int(first.state.step) == 4
    resumed = trainer.train(tiny_config(data_dir), str(tmp_path / "split"))
    assert int(resumed.state.step) == 6
    assert_same_params(full.state.params, resumed.state.params)
    assert_same_params(full.state.opt_state, resumed.state.opt_state)


def test_changed_config_is_refused_unless_allowed(data_dir, tmp_path):
    trainer.train(tiny_config(data_dir, "total_steps=2"), str(tmp_path))
    with pytest.raises(trainer.ConfigMismatchError, match="optim.lr"):
        trainer.train(tiny_config(data_dir, "total_steps=2", "optim.lr=0.5"), str(tmp_path))
    result = trainer.train(tiny_config(data_dir, "total_steps=3", "optim.lr=0.5"), str(tmp_path),
                           allow_config_change=True)
    assert int(result.state.step) == 3


def test_unknown_config_key_is_an_error(data_dir, tmp_path):
    config = tiny_config(data_dir)
    with config.unlocked():
        config.optim.warmup = 5
    with pytest.raises(config_lib.ConfigError, match="optim.warmup is not used"):
        trainer.train(config, str(tmp_path))


EMA_CONFIG = """from vlmjax.config import load_config


def get_config(arg=None):  # the tiny config with an EMA of the params, no evaluators
    config = load_config({path!r})
    config.optim.ema_decay = 0.9
    config.evals = {{}}
    return config
"""


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted_run(data_dir, tmp_path):
    """Params, optimiser and the EMA (extra state) resume bitwise after a SIGKILL."""
    config_file = tmp_path / "tiny_ema.py"
    config_file.write_text(EMA_CONFIG.format(path=os.path.abspath(
        "configs/siglip/tiny.py") + ":runlocal"))
    overrides = [f"--config.data.data_dir={data_dir}", "--config.total_steps=12",
                 "--config.checkpoint.every=2", "--config.log_every=1"]

    def command(workdir):
        return [sys.executable, "-m", "vlmjax.train", "--config", str(config_file),
                f"--workdir={workdir}", *overrides]

    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), **quiet)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        steps = os.listdir(killed / "checkpoints") if (killed / "checkpoints").exists() else []
        if any(s.isdigit() and int(s) >= 4 for s in steps):
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_at_kill = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
    assert steps_at_kill and max(steps_at_kill) < 12
    subprocess.run(command(killed), check=True, timeout=300, **quiet)  # resumes
    # The reference runs in a subprocess too, so both see the same process-level jax settings.
    subprocess.run(command(tmp_path / "uninterrupted"), check=True, timeout=300, **quiet)
    config = tiny_config(data_dir, "total_steps=12", "checkpoint.every=2", "log_every=1")
    with config.unlocked():
        config.optim.ema_decay, config.evals = 0.9, {}
    # Finished workdirs: train() restores step 12 and trains nothing.
    restored = trainer.train(config, str(killed))
    uninterrupted = trainer.train(config, str(tmp_path / "uninterrupted"))
    assert int(restored.state.step) == int(uninterrupted.state.step) == 12
    assert_same_params(uninterrupted.state.params, restored.state.params)
    assert_same_params(uninterrupted.state.opt_state, restored.state.opt_state)
    ema = restored.state.extra["ema"]
    assert_same_params(uninterrupted.state.extra["ema"], ema)
    assert not np.array_equal(np.asarray(ema["log_temperature"]),
                              np.asarray(restored.state.params["log_temperature"]))


def test_checkpoint_restores_into_a_different_mesh(data_dir, tmp_path):
    first = trainer.train(tiny_config(data_dir, "mesh.data=8", "total_steps=4"), str(tmp_path),
                          stop_after=2)
    assert int(first.state.step) == 2
    resumed = trainer.train(tiny_config(data_dir, "mesh.data=2", "mesh.fsdp=4", "total_steps=4"),
                            str(tmp_path), allow_config_change=True)
    assert int(resumed.state.step) == 4
    kernel = resumed.state.params["text_tower"]["map_head"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)  # embed dim sharded over fsdp on the new mesh


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_exits_zero(data_dir, tmp_path):
    workdir = tmp_path / "preempted"
    command = [sys.executable, "-m", "vlmjax.train", "--config",
               "configs/siglip/tiny.py:runlocal", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", "--config.total_steps=400",
               "--config.checkpoint.every=1000", "--config.log_every=1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 400  # saved where it stopped, not at `every`
    resumed = trainer.train(tiny_config(data_dir, "total_steps=400", "checkpoint.every=1000",
                                        "log_every=1"), str(workdir), stop_after=1)
    assert int(resumed.state.step) == steps[0] + 1
