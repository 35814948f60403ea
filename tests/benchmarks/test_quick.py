"""The benchmarks' --quick modes run and print complete tables (CI)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_benchmark(script: str, *args: str) -> str:
    env = dict(os.environ)
    # One CPU device, as a user's run has (the suite's conftest simulates 8).
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                            capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in `text`: rows of cells, header first, separator dropped."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = []
                out.append(current)
            if not set(line) <= set("|-"):
                current.append(cells)
        else:
            current = None
    return out


def number(cell: str) -> float:
    return float(cell.rstrip("%M"))


@pytest.mark.slow
def test_train_step_quick_prints_complete_tables():
    shapes, switches = tables(run_benchmark("train_step.py", "--quick"))
    assert shapes[0][:3] == ["shape", "dtype", "batch"] and len(shapes) == 2
    row = dict(zip(shapes[0], shapes[1]))
    assert row["shape"] == "tiny" and row["batch"] == "16"
    for key in ("params", "GFLOP/example", "compile s", "step ms", "examples/s", "MFU"):
        assert number(row[key]) > 0, (key, row)
    # examples/s is consistent with the step time.
    assert number(row["examples/s"]) == pytest.approx(16e3 / number(row["step ms"]), rel=0.02)
    assert [r[0] for r in switches[1:]] == ["base", "scan+remat=save-dots+fused", "data=prefetch"]
    assert all(len(r) == len(switches[0]) and number(r[-1]) > 0 for r in switches[1:])


@pytest.mark.slow
def test_vs_pytorch_quick_prints_both_and_the_ratio():
    out = run_benchmark("vs_pytorch.py", "--quick")
    (table,) = tables(out)
    assert [r[0].split(" ")[0] for r in table[1:]] == ["vlmjax", "PyTorch"]
    assert table[1][1] == table[2][1]  # the same parameter count: the same model
    ratio = re.fullmatch(r"ratio vlmjax/pytorch examples/s: (\d+\.\d+)", out.splitlines()[-1])
    assert ratio and float(ratio.group(1)) > 0


@pytest.mark.slow
def test_memory_quick_orders_the_remat_policies():
    (table,) = tables(run_benchmark("memory.py", "--quick"))
    rows = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    assert set(rows) == {"none", "full", "save-dots"}
    batch = {k: int(r["max batch / device"]) for k, r in rows.items()}
    # Recomputing more keeps less: a larger batch fits the same budget.
    assert 0 < batch["none"] < batch["save-dots"] < batch["full"], batch
    for r in rows.values():
        # The largest batch fits --quick's 32 MiB budget, and donating the state saves memory.
        assert number(r["peak MiB"]) <= 32, r
        assert number(r["peak MiB"]) < number(r["peak without donation MiB"]), r
