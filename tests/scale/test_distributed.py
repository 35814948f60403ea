"""When (and only when) a multi-process start is attempted, and its errors."""
import jax
import pytest

from vlmjax import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, kind", [
    ({}, None),                                                        # a plain host
    ({**SLURM, "SLURM_NTASKS": "1"}, None),                            # one task: nothing to join
    ({**SLURM, "SLURM_NTASKS": "8"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),                # salloc shell, no srun step
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "explicit"),
])
def test_detect_cluster_from_the_environment(env, kind):
    cluster = distributed.detect_cluster(env=env)
    assert (cluster.kind if cluster else None) == kind
    if kind == "explicit":
        assert (cluster.coordinator_address, cluster.num_processes, cluster.process_id) == (
            "h:1", 2, 1)


def test_flags_override_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    cluster = distributed.detect_cluster("other:2", 4, 3, env=env)
    assert (cluster.coordinator_address, cluster.num_processes, cluster.process_id) == (
        "other:2", 4, 3)


@pytest.mark.parametrize("args, env, message", [
    (("h:1", None, None), {}, "--num_processes --process_id"),
    ((None, None, None), {"JAX_PROCESS_ID": "0"}, "--coordinator_address --num_processes"),
    (("h:1", 2, 2), {}, r"process_id must be in \[0, num_processes\)"),
    (("h", 2, 0), {}, "must be HOST:PORT"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                          "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_incomplete_or_bad_settings_are_clear_errors(args, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.detect_cluster(*args, env=env)


def test_a_plain_host_never_starts_jax_distributed(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)

    def fail(**kwargs):
        raise AssertionError(f"jax.distributed.initialize called with {kwargs}")
    monkeypatch.setattr(jax.distributed, "initialize", fail)
    assert distributed.initialize() is None
    assert not distributed.is_multiprocess()
