"""Per-device memory, communication and step time of the contrastive losses as the device
count grows.

For a fixed per-device batch b and width D, compiles `value_and_grad` of each SigLIP impl and of
CLIP's loss on N = 1, 2, 4, 8 devices (simulated CPU devices unless real ones exist) and prints
the per-device temporary memory from XLA's compiled memory analysis, the b x D chunks each
device sends per step (collectives in the compiled HLO, as benchmarks/measure_comm.py counts
them: loops once per trip) and the median step time.

    python benchmarks/loss_memory.py                 # b=1024,D=256 and b=512,D=768
    python benchmarks/loss_memory.py --shapes 256x64 --devices 2,8 --steps 3
    python benchmarks/loss_memory.py --losses siglip/ppermute,siglip/ppermute_bidir
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlmjax import sharding  # noqa: E402
from vlmjax.losses import contrastive  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure_comm import collective_bytes  # noqa: E402

LOSSES = {
    "siglip/dense": lambda mesh: lambda zi, zt, t, b: contrastive.siglip_loss(
        zi, zt, t, b, mesh=mesh, impl="dense"),
    "siglip/all_gather": lambda mesh: lambda zi, zt, t, b: contrastive.siglip_loss(
        zi, zt, t, b, mesh=mesh, impl="all_gather"),
    "siglip/ppermute": lambda mesh: lambda zi, zt, t, b: contrastive.siglip_loss(
        zi, zt, t, b, mesh=mesh, impl="ppermute"),
    "siglip/ppermute_bidir": lambda mesh: lambda zi, zt, t, b: contrastive.siglip_loss(
        zi, zt, t, b, mesh=mesh, impl="ppermute_bidir"),
    "clip": lambda mesh: lambda zi, zt, t, b: contrastive.clip_loss(zi, zt, t, mesh=mesh),
}


def measure(loss_name: str, devices: int, rows: int, dim: int, steps: int):
    mesh = sharding.make_mesh({"data": devices}, jax.devices()[:devices])
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step = jax.jit(jax.value_and_grad(LOSSES[loss_name](mesh), argnums=(0, 1, 2, 3)))
    emb = jax.ShapeDtypeStruct((rows * devices, dim), jnp.float32, sharding=batch_sharding)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    compiled = step.lower(emb, emb, scalar, scalar).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    moved = collective_bytes(compiled.as_text(), devices)
    chunks = sum(v for k, v in moved.items() if k != "scalars") / (rows * dim * 4)

    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, rows * devices, dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    args = (*jax.device_put((z[0], z[1]), batch_sharding),
            *jax.device_put((np.float32(10.0), np.float32(-10.0)), replicated))
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return temp_mib, chunks, statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x256,512x768",
                        help="comma-separated per-device-batch x width pairs")
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    args = parser.parse_args(argv)
    device_counts = [int(n) for n in args.devices.split(",")]
    if max(device_counts) > jax.device_count():
        sys.exit(f"--devices asks for {max(device_counts)} devices; {jax.device_count()} exist")
    print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          "temp = per-device temporary memory (XLA memory analysis) of value_and_grad; "
          "chunks = b x D chunks each device sends per step")
    header = "| b x D | loss | " + " | ".join(f"N={n} temp MiB | N={n} chunks | N={n} ms"
                                             for n in device_counts)
    print(header + " |")
    print("|" + "---|" * (2 + 3 * len(device_counts)))
    for shape in args.shapes.split(","):
        rows, dim = (int(v) for v in shape.split("x"))
        for loss_name in args.losses.split(","):
            cells = []
            for n in device_counts:
                temp_mib, chunks, ms = measure(loss_name, n, rows, dim, args.steps)
                cells += [f"{temp_mib:.1f}", f"{chunks:.0f}", f"{ms:.1f}"]
            print(f"| {rows} x {dim} | {loss_name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
