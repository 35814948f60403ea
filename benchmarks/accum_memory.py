"""Memory and step time of gradient accumulation for a contrastive train step at a fixed batch.

Compiles the trainer's train step (vlmjax/train/step.py, ContrastiveTask, AdamW) for one global
batch at optim.accum_steps = 1, 2, 4, 8, with `exact` accumulation (GradCache: the full-batch
loss) and, for comparison, `naive` (micro-batch losses averaged), and prints the per-device
temporary memory from XLA's compiled memory analysis and the median step time, each also as a
ratio to the full-batch step (accum 1). The towers are small ViTs on many patches, so that
activations, not parameters, dominate the step's memory.

    python benchmarks/accum_memory.py                       # batch 64, 64 px, 4 px patches
    python benchmarks/accum_memory.py --loss clip --accum 1,4 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from vlmjax import sharding
from vlmjax.train import step as step_lib
from vlmjax.train.tasks.contrastive import ContrastiveTask


def make_task(args, mesh) -> ContrastiveTask:
    tower = dict(width=args.width, num_heads=4, mlp_dim=4 * args.width)
    siglip = args.loss == "siglip"
    return ContrastiveTask(ml_collections.ConfigDict(dict(
        model=dict(image=dict(tower, depth=args.depth, patch_size=args.patch, pool="map",
                              posemb="learn"),
                   text=dict(tower, depth=1, vocab_size=1000, max_len=args.text_len,
                             pool="last"),
                   embed_dim=args.width, temperature_init=10.0 if siglip else 1 / 0.07,
                   bias_init=-10.0 if siglip else None, dtype="float32"),
        loss=dict(name="siglip", impl="ppermute") if siglip else dict(name="clip"),
        data=dict(source="vlm_shapes", split="train"),  # never read: batches are synthetic
        input=dict(image_size=args.image_size, max_text_len=args.text_len))), mesh)


def measure(task, params, batch, accum_steps: int, accum: str, steps: int):
    """(per-device temp MiB, median step ms) of the train step."""
    tx = optax.adamw(1e-4)
    step = jax.jit(step_lib.make_train_step(
        task.loss_fn, tx, optax.constant_schedule(1e-4), accum_steps=accum_steps, accum=accum,
        task=task, mesh=task.mesh))
    state = step_lib.init_state(params, tx, jax.random.key_data(jax.random.key(1)))
    with jax.set_mesh(task.mesh):
        compiled = step.lower(state, batch).compile()
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(state, batch))  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            times.append(time.perf_counter() - start)
    return temp_mib, statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="siglip", choices=("siglip", "clip"))
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--accum", default="1,2,4,8", help="optim.accum_steps values")
    parser.add_argument("--modes", default="exact,naive", help="optim.accum values (besides "
                        "the full-batch step at accum 1)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="image tower blocks (text: 1)")
    parser.add_argument("--text_len", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    args = parser.parse_args(argv)
    mesh = sharding.make_mesh({"data": -1})
    task = make_task(args, mesh)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)),
                     out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = sharding.host_batch_to_global({
        "image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
            np.float32),
        "text": rng.integers(1, 1000, (args.batch, args.text_len)).astype(np.int32),
        "text_mask": np.ones((args.batch, args.text_len), bool)}, mesh)
    tokens = (args.image_size // args.patch) ** 2
    print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{args.loss} loss, global batch {args.batch}, ViT width {args.width} depth "
          f"{args.depth} on {tokens} patches, text {args.text_len} tokens, AdamW; temp = "
          "per-device temporary memory (XLA memory analysis); ratios vs accum 1")
    modes = args.modes.split(",")
    print("| accum | micro-batch | " + " | ".join(
        f"{m} temp MiB | {m} temp ratio | {m} step ms | {m} time ratio" for m in modes) + " |")
    print("|" + "---|" * (2 + 4 * len(modes)))
    base = None
    for accum_steps in (int(a) for a in args.accum.split(",")):
        cells = []
        for mode in modes:
            temp_mib, ms = measure(task, params, batch, accum_steps, mode, args.steps)
            if base is None:  # accum 1: exact and naive are the same full-batch step
                base = (temp_mib, ms)
            cells += [f"{temp_mib:.1f}", f"{temp_mib / base[0]:.2f}", f"{ms:.0f}",
                      f"{ms / base[1]:.2f}"]
        print(f"| {accum_steps} | {args.batch // accum_steps} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
