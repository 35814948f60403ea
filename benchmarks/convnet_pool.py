"""The CNN image tower's forward + backward with flax's `nn.max_pool` against the reshape-and-max
`convnet.max_pool_2x2` it now uses, in one process, alternating (configs/siglip/tiny.py's
tower: channels 32/64/96, patch 2, 64 px images, global max pooling).

    python benchmarks/convnet_pool.py [--batch 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from vlmjax.models import convnet  # noqa: E402


def tower_grad(pool):
    """jit(grad) of a squared-feature loss of the tower, with `pool` as its 2x2 max pool."""
    model = convnet.ConvNet(channels=(32, 64, 96), patch_size=2)

    def loss(params, images):
        saved = convnet.max_pool_2x2
        convnet.max_pool_2x2 = pool  # read at trace time only
        try:
            return jnp.sum(model.apply(params, images) ** 2)
        finally:
            convnet.max_pool_2x2 = saved
    return model, jax.jit(jax.grad(loss))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per side per round")
    args = parser.parse_args(argv)
    images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 64, 64, 3))
    sides = {"nn.max_pool (flax)": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)),
             "max_pool_2x2 (reshape + max)": convnet.max_pool_2x2}
    compiled, times = {}, {name: [] for name in sides}
    for name, pool in sides.items():
        model, grad = tower_grad(pool)
        params = model.init(jax.random.PRNGKey(1), images)
        jax.block_until_ready(grad(params, images))
        compiled[name] = (grad, params)
    for _ in range(args.rounds):
        for name, (grad, params) in compiled.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                jax.block_until_ready(grad(params, images))
                times[name].append(time.perf_counter() - start)
    print(common.machine_line())
    print(f"CNN tower forward + backward, batch {args.batch}, 64 px, float32; median of "
          f"{args.rounds} x {args.steps} alternating calls")
    print("| 2x2 max pool | ms | vs flax |\n| --- | --- | --- |")
    base = statistics.median(times["nn.max_pool (flax)"])
    for name in sides:
        ms = statistics.median(times[name])
        print(f"| {name} | {ms * 1e3:.1f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
