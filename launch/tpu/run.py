#!/usr/bin/env python3
"""Train on a Cloud TPU VM or pod slice: create it, ship the code, install, train, stream logs,
delete. Every step is a `gcloud` command; `--dry_run` prints them all and runs none.

    python launch/tpu/run.py all --name vlmjax-b16 --zone us-central2-b --accelerator v4-32 \\
        --workdir gs://BUCKET/runs/siglip_b16 --config configs/siglip/vit_b16.py \\
        --delete -- --config.data.paths='gs://BUCKET/shards/{00000..00999}.tar'

Steps (each also a subcommand: create | ship | install | train | logs | delete | all):
  create   `gcloud compute tpus tpu-vm create` (or, with --queued, a queued resource; it waits
           until the slice is ACTIVE); --spot for preemptible capacity
  ship     this checkout as a tarball to every worker (or --git URL [--ref REF]: clone there)
  install  requirements + jax[tpu] on every worker
  train    `python -m vlmjax.train` on every worker, detached (it survives a dropped ssh); each
           process finds the others through the TPU metadata (vlmjax.distributed)
  logs     stream worker 0's log until training ends; exits with the trainer's status
  delete   (all: only with --delete) delete the VM / queued resource

A pod slice's workers share nothing but GCS, so the workdir must be a gs:// path. Restarting after
a preemption is rerunning `train` (it resumes from the workdir's last checkpoint).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REMOTE_DIR = "vlmjax"                 # on each worker, under $HOME
LOG, STATUS, PID = "vlmjax_train.log", "vlmjax_train.status", "vlmjax_train.pid"
STEPS = ("create", "ship", "install", "train", "logs", "delete")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" in argv:
        argv, trainer_flags = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    else:
        trainer_flags = []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS + ("all",))
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version")
    parser.add_argument("--queued", action="store_true", help="create via queued resources")
    parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    parser.add_argument("--git", help="clone this repository on the workers instead of shipping "
                                      "the local checkout")
    parser.add_argument("--ref", default="main", help="with --git: branch, tag or commit")
    parser.add_argument("--config", help="config file[:presets] (train, all)")
    parser.add_argument("--workdir", help="gs://... workdir (train, all)")
    parser.add_argument("--delete", action="store_true", help="all: delete the VM at the end")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run none")
    args = parser.parse_args(argv)
    args.trainer_flags = trainer_flags
    if args.step in ("train", "all"):
        if not args.config or not args.workdir:
            parser.error(f"{args.step} needs --config and --workdir")
        if not args.workdir.startswith("gs://"):
            parser.error(f"--workdir {args.workdir!r} must be a gs:// path: the workers of a "
                         "slice share no disk, and checkpoints are written by all of them")
    return args


class Gcloud:
    """Builds (and runs, unless dry) the gcloud commands of one TPU VM."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.common = [f"--zone={args.zone}"] + (
            [f"--project={args.project}"] if args.project else [])

    def run(self, command: list[str], *, check: bool = True, capture: bool = False) -> str:
        print("+ " + shlex.join(command), flush=True)
        if self.args.dry_run:
            return ""
        result = subprocess.run(command, check=check, text=True,
                                stdout=subprocess.PIPE if capture else None)
        return result.stdout or ""

    def ssh(self, command: str, worker: str = "all", **kwargs) -> str:
        return self.run(["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.args.name,
                         *self.common, f"--worker={worker}", f"--command={command}"], **kwargs)

    # ---- steps -------------------------------------------------------------------------
    def create(self):
        a = self.args
        spot = ["--spot"] if a.spot else []
        if not a.queued:
            self.run(["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *self.common,
                      f"--accelerator-type={a.accelerator}", f"--version={a.version}", *spot])
            return
        self.run(["gcloud", "compute", "tpus", "queued-resources", "create", a.name,
                  *self.common, f"--node-id={a.name}", f"--accelerator-type={a.accelerator}",
                  f"--runtime-version={a.version}", *spot])
        describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name,
                    *self.common, "--format=value(state.state)"]
        while True:  # a queued slice becomes ACTIVE when capacity frees up
            state = self.run(describe, capture=True).strip()
            if a.dry_run or state == "ACTIVE":
                return
            if state in ("FAILED", "SUSPENDED"):
                sys.exit(f"queued resource {a.name} is {state}")
            time.sleep(30)

    def ship(self):
        a = self.args
        if a.git:
            self.ssh(f"rm -rf ~/{REMOTE_DIR} && git clone {shlex.quote(a.git)} ~/{REMOTE_DIR} "
                     f"&& git -C ~/{REMOTE_DIR} checkout {shlex.quote(a.ref)}")
            return
        tarball = f"/tmp/{a.name}-vlmjax.tar.gz"
        self.run(["tar", "czf", tarball, "-C", ROOT, "--exclude=.git", "--exclude=.venv",
                  "--exclude=workdir*", "--exclude=data_dir", "--exclude=__pycache__", "."])
        self.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{a.name}:~/",
                  *self.common, "--worker=all"])
        self.ssh(f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR} && "
                 f"tar xzf ~/{os.path.basename(tarball)} -C ~/{REMOTE_DIR}")

    def install(self):
        self.ssh(f"cd ~/{REMOTE_DIR} && python3 -m pip install -q -U pip && "
                 "python3 -m pip install -q -r requirements.txt 'jax[tpu]' && "
                 "python3 -m pip install -q --no-deps -e .")

    def train(self):
        a = self.args
        trainer = shlex.join(["python3", "-m", "vlmjax.train", f"--config={a.config}",
                              f"--workdir={a.workdir}", *a.trainer_flags])
        # Detached, so that a dropped ssh connection does not stop training; the exit status
        # lands in a file that `logs` waits for.
        self.ssh(f"cd ~/{REMOTE_DIR} && rm -f ~/{STATUS} && "
                 f"(setsid nohup bash -c {shlex.quote(f'{trainer}; echo $? > ~/{STATUS}')} "
                 f"> ~/{LOG} 2>&1 < /dev/null & echo $! > ~/{PID})")

    def logs(self) -> int:
        self.ssh(f"tail -n +1 --pid=$(cat ~/{PID}) -F ~/{LOG}", worker="0", check=False)
        status = self.ssh(f"cat ~/{STATUS} 2>/dev/null || echo 1", worker="0", capture=True)
        return int(status.strip() or 0) if not self.args.dry_run else 0

    def delete(self):
        a = self.args
        if a.queued:
            self.run(["gcloud", "compute", "tpus", "queued-resources", "delete", a.name,
                      *self.common, "--force", "--quiet"])
        else:
            self.run(["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *self.common,
                      "--quiet"])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    gcloud = Gcloud(args)
    if args.step != "all":
        status = getattr(gcloud, args.step)()
        return status if isinstance(status, int) else 0
    gcloud.create()
    try:
        gcloud.ship()
        gcloud.install()
        gcloud.train()
        return gcloud.logs()
    finally:
        if args.delete:
            gcloud.delete()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
