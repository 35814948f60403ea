"""Multi-process (multi-host) start-up and the agreements the processes need.

`initialize` starts `jax.distributed` only where a cluster is present:
  explicit   --coordinator_address/--num_processes/--process_id, or the environment variables
             JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/local.sh)
  slurm      srun with more than one task (SLURM_JOB_ID, SLURM_NTASKS > 1, ...)
  ompi       mpirun/mpiexec of Open MPI with more than one rank
  tpu        a Cloud TPU VM (libtpu installed and a TPU device node present): JAX reads the
             slice's workers from the metadata server; a one-host slice is one process
On any other machine nothing is attempted, so a plain single-host run never needs a
coordinator. It must run before anything touches a JAX backend.

On CPU the processes exchange collectives with gloo over TCP (launch/local.sh runs N processes
on one machine this way).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import inspect
import os
import signal
from typing import Mapping

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# How long the coordination service waits for a silent process before it stops every process.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


@dataclasses.dataclass(frozen=True)
class Cluster:
    kind: str                          # 'explicit' | 'slurm' | 'ompi' | 'tpu'
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def detect_cluster(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None,
                   env: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster this process runs in, or None on a plain single host."""
    env = os.environ if env is None else env
    explicit = {"coordinator_address": coordinator_address or env.get(ENV_ADDRESS),
                "num_processes": num_processes if num_processes is not None else (
                    _int_env(env, ENV_COUNT) if ENV_COUNT in env else None),
                "process_id": process_id if process_id is not None else (
                    _int_env(env, ENV_ID) if ENV_ID in env else None)}
    given = [k for k, v in explicit.items() if v is not None]
    if given:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-process start needs coordinator_address, num_processes and process_id "
                f"together (flags --{' --'.join(missing)} or environment variables "
                f"{ENV_ADDRESS}, {ENV_COUNT}, {ENV_ID}); got only {', '.join(given)}")
        count, index = explicit["num_processes"], explicit["process_id"]
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"process_id must be in [0, num_processes): got process_id={index}, "
                             f"num_processes={count}")
        if ":" not in explicit["coordinator_address"]:
            raise ValueError(f"coordinator_address {explicit['coordinator_address']!r} must be "
                             "HOST:PORT, e.g. localhost:12345")
        return Cluster("explicit", **explicit)
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int_env(env, "SLURM_NTASKS") > 1:
        return Cluster("slurm")
    if "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return Cluster("ompi")
    if _on_cloud_tpu_vm():
        return Cluster("tpu")
    return None


def _on_cloud_tpu_vm() -> bool:
    # libtpu alone is not enough (it installs anywhere); a TPU VM also has the device nodes.
    return (importlib.util.find_spec("libtpu") is not None
            and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> Cluster | None:
    """Start jax.distributed if a cluster is present (see the module docstring); returns it."""
    cluster = detect_cluster(coordinator_address, num_processes, process_id)
    if cluster is None or jax.distributed.is_initialized():
        return cluster
    if not jax.config.jax_platforms or "cpu" in str(jax.config.jax_platforms):
        try:  # CPU collectives across processes: gloo (jax 0.10's default; explicit elsewhere)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):
            pass
    kwargs = {}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    if cluster.kind == "explicit":
        kwargs.update(coordinator_address=cluster.coordinator_address,
                      num_processes=cluster.num_processes, process_id=cluster.process_id)
    jax.distributed.initialize(**kwargs)
    if jax.default_backend() == "cpu":
        # gloo builds its context for a device set at the first collective over it and gives
        # up if a peer is 30 s late; build the all-device one now, while the processes are in
        # step (later collectives over it wait as long as needed).
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vlmjax: processes started")
    return cluster


def is_multiprocess() -> bool:
    return jax.distributed.is_initialized()


class StopSignal:
    """Agreement on when to stop for a preemption (SIGTERM).

    Multi-process: JAX's preemption sync manager (started by jax.distributed) catches SIGTERM on
    any process and all processes agree on one step at which `should_stop(step)` is True, so they
    checkpoint the same step. One process: a Python SIGTERM handler sets a flag.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._synced = is_multiprocess() and _sync_manager_running()

    def __enter__(self):
        if not self._synced:  # the sync manager installs its own SIGTERM handler: keep it
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        print(f"received signal {signum}: saving a checkpoint at the next step boundary",
              flush=True)
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if self._synced and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                print(f"preemption notice: all processes stop at step {step} with a checkpoint",
                      flush=True)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _sync_manager_running() -> bool:
    try:
        from jax._src import distributed as jax_distributed  # no public accessor for it
        return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None
    except ImportError:  # jax moved it: the service is on by default (jax_enable_preemption_service)
        return bool(getattr(jax.config, "jax_enable_preemption_service", True))
