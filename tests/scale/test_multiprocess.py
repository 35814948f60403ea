"""Several processes on this machine (launch/local.sh): the same training as one process,
checkpoints that move between process counts, preemption (SIGTERM) and a dying process.

One chain of runs of the tiny config (24 steps, checkpoints every 8, 2 data shards):
  A  2 processes x 2 devices, from scratch     } run side by side; same per-step losses,
  B  1 process  x 4 devices, from scratch      } final parameters and evaluation
  D  2 x 2 from B's step-8 checkpoint; SIGTERM to process 1 only -> both stop at one step, exit 0
  E  2 x 2 from D's checkpoint; process 1 SIGKILLed -> process 0 exits with an error, bounded time
  F  1 x 4 from the last complete checkpoint -> B's final parameters
Every run's per-step losses must equal B's.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.test_trainer import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Enough steps after the SIGTERM for the processes to agree on a stop step (a fraction of a
# second) before the run ends, even where steps take milliseconds.
STEPS, EVERY = 24, 8
HEARTBEAT_S = 10
CONFIG = """
from vlmjax import config as config_lib

def get_config(arg=None):
    c = config_lib.load_config({tiny!r})
    c.data.data_dir = {data_dir!r}
    c.data_shards = 2  # the same global batches on 1 or 2 processes
    c.total_steps, c.log_every, c.checkpoint.every = {steps}, 1, {every}
    c.checkpoint.keep = 10
    return c
"""


class Run:
    """launch/local.sh in its own process group, output to a log file."""

    def __init__(self, tmp_path, name, processes, devices, workdir, cache_dir):
        self.log = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not conftest's 8
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHON=sys.executable)
        command = ["bash", os.path.join(ROOT, "launch/local.sh"), "--devices_per_process",
                   str(devices), str(processes), str(tmp_path / "config.py"), str(workdir),
                   f"--heartbeat_timeout_s={HEARTBEAT_S}"]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(pattern, self.output(), re.MULTILINE)
            if match:
                return match
            assert self.process.poll() is None, f"exited before {pattern!r}:\n{self.tail()}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.tail()}")

    def pid(self, index: int) -> int:
        return int(self.wait_for(rf"^local.sh: process {index} pid (\d+)").group(1))

    def wait(self, timeout: float = 400) -> int:
        return self.process.wait(timeout=timeout)

    def tail(self) -> str:
        return self.output()[-3000:]

    def kill(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run's lines come after the earlier ones)."""
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def evals(workdir) -> dict[str, float]:
    with open(workdir / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if any(k.startswith("zero_shot/") for k in r)]
    return {k: v for k, v in records[-1].items() if k.startswith(("zero_shot/", "retrieval/"))}


def complete_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def saved_state(workdir, step):
    """A checkpoint's train state as numpy arrays (whatever process layout wrote it)."""
    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_losses_match(workdir, reference, steps):
    got = losses(workdir)
    assert set(steps) <= set(got), (sorted(got), steps)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps],
                               rtol=1e-6, err_msg=str(workdir))


def assert_params_match(a, b, rtol, key_bias_atol, atol=1e-5):
    """Every parameter to rtol/atol, except attention key biases, whose gradient is exactly zero
    in exact arithmetic (softmax ignores a shift shared by all keys): what they get is rounding
    noise (~1e-8 against ~1 for the query bias), which Adam scales up to lr-sized steps, so
    their values depend on the summation order of the collectives, i.e. on the process layout;
    they only have to stay within `key_bias_atol` (Adam moves a parameter at most ~lr a step).
    `atol` covers smaller differences of the same origin on a few token-embedding entries
    (seen: 3e-7 on 2 of 32,000, with 30x margin; entries are ~1e-2; the losses still agree
    to 1e-6)."""
    leaves = jax.tree_util.tree_leaves_with_path(a["params"])
    key_biases = 0
    for (path, x), y in zip(leaves, jax.tree.leaves(b["params"])):
        name = jax.tree_util.keystr(path)
        if name.endswith("['key']['bias']"):
            key_biases += 1
            np.testing.assert_allclose(x, y, rtol=0, atol=key_bias_atol, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
    assert key_biases, "no attention key bias found: the exception above is stale"


def resume_from(source, step, target):
    """A copy of workdir `source` as if it had stopped after checkpoint `step`."""
    os.makedirs(target / "checkpoints")
    shutil.copy(source / "config.json", target / "config.json")
    shutil.copytree(source / "checkpoints" / str(step), target / "checkpoints" / str(step))
    with open(source / "metrics.jsonl") as f, open(target / "metrics.jsonl", "w") as out:
        out.writelines(line for line in f if json.loads(line)["step"] <= step)


@pytest.mark.slow
def test_processes_train_like_one_and_survive_preemption_and_death(tmp_path):
    data_dir = str(tmp_path / "tfds")
    from vlmjax.data import pipeline  # build vlm_shapes once, before processes race for it
    config = tiny_config(data_dir)
    key_bias_atol = 2 * STEPS * config.optim.lr  # two runs, each moved at most ~lr a step
    with pipeline.make_pipeline(config.data, config.input, training=True) as stream:
        next(stream)
    (tmp_path / "config.py").write_text(CONFIG.format(
        tiny=os.path.join(ROOT, "configs/siglip/tiny.py:runlocal"), data_dir=data_dir,
        steps=STEPS, every=EVERY))
    cache = tmp_path / "jax_cache"
    wd = {name: tmp_path / name for name in "ABD"}
    runs = []

    def launch(name, processes, devices, workdir):
        runs.append(Run(tmp_path, name, processes, devices, workdir, cache))
        return runs[-1]

    try:
        # A and B: the same training on 2 processes x 2 devices and on 1 process x 4.
        a, b = launch("A", 2, 2, wd["A"]), launch("B", 1, 4, wd["B"])
        assert a.wait() == 0, a.tail()
        assert b.wait() == 0, b.tail()
        reference = losses(wd["B"])
        assert sorted(reference) == list(range(1, STEPS + 1))
        assert_losses_match(wd["A"], reference, range(1, STEPS + 1))
        final_b = saved_state(wd["B"], STEPS)
        assert_params_match(saved_state(wd["A"], STEPS), final_b, rtol=1e-6,
                            key_bias_atol=key_bias_atol)
        assert evals(wd["A"]) == evals(wd["B"])  # the 2-process run also checked both agree
        assert "2 data shard(s)" in a.output() and "over 2 process(es)" in a.output()
        data = wd["A"] / "checkpoints" / str(STEPS) / "data"  # each process saved its position
        assert {p.name: sorted(json.loads(p.read_text())["shards"])
                for p in data.glob("process_*.json")} == {"process_0.json": ["0"],
                                                          "process_1.json": ["1"]}

        # D: B's step-8 checkpoint (1 process) resumes on 2; SIGTERM reaches process 1 only.
        resume_from(wd["B"], EVERY, wd["D"])
        d = launch("D", 2, 2, wd["D"])
        d.wait_for(rf"^\[0\] step {EVERY + 1}/")
        os.kill(d.pid(1), signal.SIGTERM)
        assert d.wait(timeout=120) == 0, d.tail()
        stops = re.findall(r"^\[(\d)\] preemption notice: all processes stop at step (\d+)",
                           d.output(), re.MULTILINE)
        assert sorted(stops) == [("0", stops[0][1]), ("1", stops[0][1])], d.tail()
        stop_step = int(stops[0][1])
        assert EVERY + 1 < stop_step < STEPS - 1 and complete_steps(wd["D"])[-1] == stop_step
        assert_losses_match(wd["D"], reference, range(EVERY + 1, stop_step + 1))

        # E: resumes D on 2 processes; process 1 dies. Process 0 must not hang.
        e = launch("E", 2, 2, wd["D"])
        e.wait_for(rf"^\[0\] step {stop_step + 1}/")
        os.kill(e.pid(1), signal.SIGKILL)
        killed_at = time.time()
        assert e.wait(timeout=HEARTBEAT_S + 90) != 0
        assert time.time() - killed_at < HEARTBEAT_S + 60
        assert re.search(r"^\[0\] .*(another task died|unhealthy)", e.output(), re.MULTILINE), \
            e.tail()
        last_complete = complete_steps(wd["D"])[-1]
        assert stop_step <= last_complete < STEPS

        # F: one process picks up the last complete checkpoint and ends where B ended.
        f = launch("F", 1, 4, wd["D"])
        assert f.wait() == 0, f.tail()
        assert f"at step {last_complete}\n" in f.output()
        assert_losses_match(wd["D"], reference, range(1, STEPS + 1))
        assert_params_match(saved_state(wd["D"], STEPS), final_b, rtol=1e-6,
                            key_bias_atol=key_bias_atol)
    finally:
        for run in runs:
            run.kill()
