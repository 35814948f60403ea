"""A jax-only check of multi-process start-up and preemption agreement (no TensorFlow needed):

    python benchmarks/preemption_probe.py [N]

starts N CPU processes (2 devices each) through vlmjax.distributed, runs a psum per step and
sends SIGTERM to process 1 alone at step 20; every process must report the same stop step and
exit 0. Used to check a jax version the trainer's tests cannot run on (e.g. a machine without
TensorFlow).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time


def worker():
    from vlmjax import distributed
    distributed.initialize()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                                  jnp.ones(jax.local_device_count()))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    with distributed.StopSignal() as stop:
        for step in range(1, 10_000):
            assert int(total(ones)) == jax.device_count()
            if step == 10:
                print("at step 10", flush=True)
            if stop.should_stop(step):
                print(f"stopped at step {step}", flush=True)
                return
            time.sleep(0.01)
    raise SystemExit("never stopped")


def main(processes: int = 2) -> int:
    sock = socket.socket()
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": str(processes),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    for line in procs[1].stdout:
        if line.startswith("at step 10"):
            break
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    steps = [re.findall(r"stopped at step (\d+)", out) for out in outputs]
    codes = [p.returncode for p in procs]
    import jax
    print(f"jax {jax.__version__}: exit codes {codes}, stop steps {steps}")
    ok = all(c == 0 for c in codes) and len({tuple(s) for s in steps}) == 1 and steps[0]
    if not ok:
        print("\n".join(out[-2000:] for out in outputs))
    return 0 if ok else 1


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
