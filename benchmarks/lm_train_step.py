"""Decoder LM train-step throughput: vlmjax's `lm` task against transformers'
`LlamaForCausalLM` (torch, AdamW) at the same shapes, in one run.

The vlmjax side is the trainer's own step (`step.make_train_step` over `LMTask.loss_fn`, the
optimiser of `optim.make_optimizer`, state donated) on the model of configs/lm/tiny.py resized
to the decoder benchmark's shapes (benchmarks/decode.py SIZES); the torch side is
`LlamaForCausalLM(input_ids, labels)` + `torch.optim.AdamW` with the same hyper-parameters,
float32, eager attention. Both see random full rows (every position counted). Columns: median
step time after warm-up and tokens/s of each side, and the ratio vlmjax / transformers.

    python benchmarks/lm_train_step.py                     # 15m, batch 8 x 256 tokens
    python benchmarks/lm_train_step.py --sizes 15m,125m --batch 4 --length 128
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from decode import SIZES, VOCAB  # noqa: E402

HEADER = "| size | params | batch x length | HF step ms | HF tok/s | vlmjax step ms | vlmjax tok/s | vlmjax / HF |"


def vlmjax_step(size: str, batch: int, length: int, warmup: int, steps: int) -> float:
    """Median seconds of one train step of the `lm` task."""
    import flax.linen as nn

    from vlmjax import config as config_lib, sharding
    from vlmjax.train import optim, step as step_lib
    from vlmjax.train.tasks.lm import LMTask
    shape = SIZES[size]
    config = config_lib.load_config("configs/lm/tiny.py")
    config.model.update(vocab_size=VOCAB, width=shape["hidden_size"],
                        depth=shape["num_hidden_layers"], num_heads=shape["num_attention_heads"],
                        num_kv_heads=shape["num_key_value_heads"],
                        mlp_dim=shape["intermediate_size"], tie_embeddings=False)
    config.input.max_len = length
    config.evals = {}
    mesh = sharding.make_mesh({"data": -1})
    task = LMTask(config, mesh)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    tx, schedule = optim.make_optimizer(config.optim, 1000, params)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1))
    train_step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh),
                         donate_argnums=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (batch, length + 1)).astype(np.int32)
    batch_dict = {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
                  "loss_mask": jnp.ones((batch, length), bool),
                  "segment_ids": jnp.ones((batch, length), jnp.int32)}
    with jax.set_mesh(mesh):
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = train_step(state, batch_dict)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return common.median(times)


def torch_step(size: str, batch: int, length: int, warmup: int, steps: int) -> tuple[float, int]:
    """(median seconds of one AdamW step of LlamaForCausalLM, its parameter count)."""
    import torch
    import transformers
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096,
                                      tie_word_embeddings=False, **SIZES[size])
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(4, VOCAB, (batch, length)), dtype=torch.long)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return common.median(times), sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="15m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    print(common.machine_line(), f"torch {torch.__version__} ({args.threads} threads)")
    print(f"float32, AdamW, median of {args.steps} steps after {args.warmup} warm-up")
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    rows = []
    for size in args.sizes.split(","):
        tokens = args.batch * args.length
        hf_s, params = torch_step(size, args.batch, args.length, args.warmup, args.steps)
        ours_s = vlmjax_step(size, args.batch, args.length, args.warmup, args.steps)
        print(f"| {size} | {params / 1e6:.1f}M | {args.batch} x {args.length} | "
              f"{hf_s * 1e3:.0f} | {tokens / hf_s:.0f} | {ours_s * 1e3:.0f} | "
              f"{tokens / ours_s:.0f} | {hf_s / ours_s:.2f}x |", flush=True)
        rows.append((size, hf_s / ours_s))
    return rows


if __name__ == "__main__":
    main()
