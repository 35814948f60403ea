"""Launchers: the TPU launcher's commands (dry run), the SLURM script's srun line, local.sh's
argument checks. Nothing here reaches a cloud or a cluster."""
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "launch", "tpu"))
import run as tpu_run  # noqa: E402  (launch/tpu/run.py)

TPU = ["--name", "vlm", "--zone", "us-central2-b", "--accelerator", "v4-32", "--dry_run"]


def dry_run(capsys, *argv) -> list[list[str]]:
    assert tpu_run.main(list(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("+ ") for line in lines), lines
    return [shlex.split(line[2:]) for line in lines]


def test_tpu_all_prints_every_step_in_order(capsys):
    commands = dry_run(capsys, "all", *TPU, "--config", "configs/siglip/vit_b16.py:runlocal",
                       "--workdir", "gs://bucket/run", "--delete", "--",
                       "--config.total_steps=5", "--config.data.paths=gs://b/{0..9}.tar")
    create, tar, scp, untar, install, train, logs, status, delete = commands
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--accelerator-type=v4-32", "--zone=us-central2-b"} <= set(create)
    assert tar[0] == "tar" and scp[4] == "scp" and "--worker=all" in scp
    assert "tar xzf" in untar[-1] and "--worker=all" in untar
    assert "requirements.txt" in install[-1] and "jax[tpu]" in install[-1]
    # The trainer runs detached on every worker with the exact flags given after `--`.
    assert "--worker=all" in train
    remote = shlex.split(train[-1])  # the shell line each worker runs
    inner = remote[remote.index("-c") + 1]
    trainer = shlex.split(inner.split(";")[0])
    assert trainer == ["python3", "-m", "vlmjax.train",
                       "--config=configs/siglip/vit_b16.py:runlocal",
                       "--workdir=gs://bucket/run", "--config.total_steps=5",
                       "--config.data.paths=gs://b/{0..9}.tar"]
    assert "--worker=0" in logs and "tail" in logs[-1] and "--worker=0" in status
    assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


def test_tpu_queued_spot_and_git(capsys):
    create, describe, clone = dry_run(capsys, "create", *TPU, "--queued", "--spot") + dry_run(
        capsys, "ship", *TPU, "--git", "https://example.com/vlmjax.git", "--ref", "v1")
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--spot", "--node-id=vlm", "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
    assert describe[4] == "describe"
    assert "git clone https://example.com/vlmjax.git" in clone[-1] and "checkout v1" in clone[-1]


def test_tpu_workdir_must_be_on_gcs(capsys):
    with pytest.raises(SystemExit):
        tpu_run.main(["train", *TPU, "--config", "c.py", "--workdir", "/tmp/run"])
    assert "must be a gs:// path" in capsys.readouterr().err


def sbatch_dry_run(process_per, *args, gpus="4"):
    env = {**os.environ, "DRY_RUN": "1", "PROCESS_PER": process_per, "SLURM_GPUS_ON_NODE": gpus,
           "SLURM_SUBMIT_DIR": ROOT}
    return subprocess.run(["bash", os.path.join(ROOT, "launch/slurm/train.sbatch"), *args],
                          env=env, capture_output=True, text=True)


def test_slurm_script_per_gpu_and_per_node():
    per_gpu = sbatch_dry_run("gpu", "configs/siglip/vit_b16.py", "/shared/run",
                             "--config.total_steps=9")
    assert per_gpu.returncode == 0, per_gpu.stderr
    flags, devices, srun = per_gpu.stdout.splitlines()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert devices == "JAX_LOCAL_DEVICE_IDS="  # jax keeps GPU SLURM_LOCALID per process
    srun = shlex.split(srun)
    assert srun[0] == "srun" and "--ntasks-per-node=4" in srun and "--kill-on-bad-exit=1" in srun
    assert srun[srun.index("-m") + 1:] == ["vlmjax.train", "--config",
                                           "configs/siglip/vit_b16.py", "--workdir",
                                           "/shared/run", "--config.total_steps=9"]
    per_node = sbatch_dry_run("node", "c.py", "/shared/run")
    assert "--ntasks-per-node=1" in per_node.stdout
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in per_node.stdout
    bad = sbatch_dry_run("rack", "c.py", "/shared/run")
    assert bad.returncode == 2 and "PROCESS_PER must be 'gpu' or 'node'" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["0", "c.py", "wd"], "N must be a positive integer"),
    (["--devices_per_process", "x", "2", "c.py", "wd"], "--devices_per_process must be"),
    (["--gpus", "2", "2", "c.py", "wd"], "unknown option --gpus"),
    (["2", "c.py"], "usage:"),
])
def test_local_sh_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", os.path.join(ROOT, "launch/local.sh"), *args],
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
