"""BLIP-2 stage 2: what freezing the LLM (and the image tower) saves in the compiled train step.

The `blip2` task's stage 2 trains `projector/` alone (ln_vision, the Q-Former, the language
projection): the trainer differentiates only those params, so the frozen LLM gets no weight
gradients and no optimiser state, while gradients still flow through its activations to the soft
prompt. This script compiles the trainer's own step (`step.make_train_step` over the task's
loss_fn, state donated) for configs/blip2/tiny.py:stage=2 at the given LLM size, once with the
task's `trainable` and once with every param trained, and prints XLA's FLOPs per step, the
compiled step's memory (arguments, outputs, temporaries) and the trained / optimiser-state
sizes, then the median step time of each on this machine (random params and rows).

    python benchmarks/blip2_frozen.py                          # the tiny recipe's LLM
    python benchmarks/blip2_frozen.py --llm_width 512 --llm_depth 8 --batch 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

HEADER = ("| trained | params trained | optimiser state MB | GFLOP / step | argument MB | "
          "temp MB | step ms |")


def _mb(nbytes) -> float:
    return float(nbytes) / 2 ** 20


def build(batch: int, llm_width: int, llm_depth: int):
    """(config, task, random params, a device batch) of blip2 stage 2 at these sizes."""
    import flax.linen as nn

    from vlmjax import config as config_lib, sharding
    from vlmjax.train.tasks import get_task
    config = config_lib.load_config("configs/blip2/tiny.py:stage=2,tokenizer=unused.model")
    config.model.llm.update(width=llm_width, depth=llm_depth, mlp_dim=3 * llm_width)
    config.input.global_batch_size = batch
    config.optim.update(warmup_steps=0, schedule="constant")
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("blip2")(config, mesh)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    length, visual = int(config.input.max_len), task.num_image_tokens
    tokens = rng.integers(5, 400, (batch, length + 1)).astype(np.int32)
    tokens[:, 1:visual + 1] = int(config.model.image_token_id)
    loss_mask = np.zeros((batch, length), bool)
    loss_mask[:, visual:] = True
    data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask,
            "segment_ids": np.ones((batch, length), np.int32),
            "image": rng.uniform(-1, 1, (batch, 64, 64, 3)).astype(np.float32)}
    return config, task, params, sharding.host_batch_to_global(data, mesh), mesh


def measure(config, task, params, data, mesh, trainable, steps: int) -> dict:
    from vlmjax.train import optim, step as step_lib
    params = jax.tree.map(lambda x: x.copy(), params)  # the step donates its state
    mask = step_lib.trainable_mask(params, trainable)
    trained, _ = step_lib.split_params(params, mask)
    tx, schedule = optim.make_optimizer(config.optim, 1000, trained)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
    with jax.set_mesh(mesh):
        train_step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh,
                                                      trainable=mask), donate_argnums=0)
        compiled = train_step.lower(state, data).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = compiled.memory_analysis()
        holder, times = {"state": state}, []
        for i in range(steps + 2):
            start = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], data)
            jax.block_until_ready(metrics)
            if i >= 2:
                times.append(time.perf_counter() - start)
    sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
    return dict(trained=sizes(trained), opt_mb=_mb(opt_bytes),
                gflop=float(cost.get("flops", 0.0)) / 1e9,
                argument_mb=_mb(memory.argument_size_in_bytes),
                temp_mb=_mb(memory.temp_size_in_bytes),
                step_ms=1e3 * common.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--llm_width", type=int, default=128)
    parser.add_argument("--llm_depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    config, task, params, data, mesh = build(args.batch, args.llm_width, args.llm_depth)
    total = sum(x.size for x in jax.tree.leaves(params))
    print(common.machine_line())
    print(f"blip2 stage 2 (configs/blip2/tiny.py), LLM width {args.llm_width} x "
          f"{args.llm_depth} layers, batch {args.batch} rows of {config.input.max_len} tokens; "
          f"{total:,} params in all; median of {args.steps} steps")
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    rows = {}
    for label, trainable in (("projector (the task's)", task.trainable), ("everything", None)):
        row = measure(config, task, params, data, mesh, trainable, args.steps)
        rows[label] = row
        print(f"| {label} | {row['trained']:,} | {row['opt_mb']:.2f} | {row['gflop']:.2f} | "
              f"{row['argument_mb']:.1f} | {row['temp_mb']:.1f} | {row['step_ms']:.0f} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
