"""python -m vlmjax.eval on a tiny trained workdir: the trainer's own final evaluation again."""
import json
import os
import subprocess
import sys

import pytest

from vlmjax.evals import cli


def without_time(metrics):
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


def test_eval_of_the_checkpoint_repeats_the_trainers_evaluation(trained_workdir, capsys):
    workdir, trained = trained_workdir
    lines_before = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert cli.main(["--workdir", workdir, "--config.evals.test.batch_size=16"]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert len(records) == len(lines_before) + 1  # appended, nothing rewritten
    last = records[-1]
    assert last["step"] == 3
    # Same params and data; another batch size must not change a metric.
    assert without_time({k: v for k, v in last.items() if k != "step"}) == pytest.approx(
        without_time(trained), abs=1e-6)
    assert "zero_shot/test/top1" in printed and "value (step 3)" in printed


def test_eval_of_a_pretrained_source_uses_load_pretrained(trained_workdir, tmp_path):
    """--model: the workdir read as a pretrained source (vlmjax.convert.load_pretrained) gives
    the same metrics, logged in another directory at --step."""
    workdir, trained = trained_workdir
    out = tmp_path / "out"
    os.makedirs(out)
    os.symlink(os.path.join(workdir, "config.json"), out / "config.json")
    step, results = cli.evaluate(str(out), step=7, model=workdir)
    assert step == 7 and json.loads(open(out / "metrics.jsonl").readline())["step"] == 7
    assert without_time(results) == pytest.approx(without_time(trained), abs=1e-6)


def test_eval_errors_name_what_is_missing(tmp_path):
    assert cli.main(["--workdir", str(tmp_path)]) == 2
    result = subprocess.run([sys.executable, "-m", "vlmjax.eval", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "config.json does not exist" in result.stderr
