"""Flamingo-style fusion: what cross-attention every 1, 2 or 4 LM layers costs in the compiled
train step (open_flamingo's OOM question: its users run out of memory with a gated block before
every layer, OpenFlamingo-3B's setting, and the 9B uses every 4th).

The step is the trainer's own (`step.make_train_step` over the `fusion` task's loss_fn with its
`trainable` mask: resampler, gated blocks and the two added tokens; state donated), built from
configs/fusion/openflamingo_3b.py (OpenFlamingo's resampler and gated-block structure) at a
medium CPU-sized shape: a Llama LM of width 512 and depth 8, a CLIP-style ViT giving 64 patch
tokens per image, a resampler of 32 latents, batch 8 rows of 256 tokens with 5 images each;
random params and one random batch. For each interval it prints the trained parameters, XLA's
FLOPs per step (cost analysis: the work, whatever the machine's load), its compiled memory per
device (arguments = params + optimiser state + batch, temporaries = the activations and
gradients the step keeps) and the median step time on this machine.

    python benchmarks/fusion_memory.py                      # every 1, 2, 4; float32, no remat
    python benchmarks/fusion_memory.py --remat full --steps 5
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

VOCAB = 32_000
LLM = dict(vocab_size=VOCAB, width=512, depth=8, num_heads=8, num_kv_heads=8, head_dim=64,
           mlp_dim=1536, activation="silu", norm_eps=1e-5, rope_theta=10_000.0,
           tie_embeddings=False)
IMAGE, PATCH = 64, 8  # 8 x 8 = 64 patch tokens (class token dropped)
VISION = dict(patch_size=PATCH, width=256, depth=4, num_heads=4, mlp_dim=1024, posemb="learn",
              activation="quick_gelu", norm_eps=1e-5, pool="cls", pre_norm=True,
              patch_bias=False)
HEADER = ("| xattn every | gated blocks | params trained | GFLOP / step | argument MB | temp MB | "
          "argument + temp MB | vs every 4 | step ms |")


def _mb(nbytes) -> float:
    return float(nbytes) / 2 ** 20


def build(every: int, batch: int, length: int, images: int, latents: int, remat: str):
    """(config, task, random params, a device batch, mesh) at these sizes."""
    import flax.linen as nn

    from vlmjax import config as config_lib, sharding
    from vlmjax.models.fusion import media_mask_from_tokens
    from vlmjax.train.tasks import get_task
    config = config_lib.load_config(
        "configs/fusion/openflamingo_3b.py:runlocal,data=unused.jsonl,images=unused,"
        f"tokenizer=unused.json,xattn_every={every}")
    config.model.update(vision=dict(VISION), llm=dict(LLM, remat=remat),
                        image_token_id=VOCAB, end_of_chunk_id=VOCAB + 1)
    # OpenFlamingo's structure (the recipe's), resized: 8 heads of 64, FFNs 4x
    config.model.resampler.update(num_latents=latents, depth=6, num_heads=8, head_dim=64)
    config.model.cross_attention.update(num_heads=8, head_dim=64, mlp_dim=4 * LLM["width"])
    config.input.update(global_batch_size=batch, image_size=IMAGE, max_len=length,
                        max_images=images)
    config.loss.chunk_size = length
    config.optim.update(warmup_steps=0)
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("fusion")(config, mesh)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(0))
    return config, task, params, random_batch(batch, length, images, media_mask_from_tokens), mesh


def random_batch(batch: int, length: int, images: int, media_mask) -> dict:
    """Rows of `images` evenly spaced chunks: <image> text ... <|endofchunk|>, loss on the text
    (as data/interleaved.py: not on image tokens, not before the first image)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (batch, length + 1)).astype(np.int32)
    starts = np.arange(images) * (length // images)
    tokens[:, starts] = VOCAB
    tokens[:, starts[1:] - 1] = VOCAB + 1
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {"tokens": inputs, "targets": targets,
            "loss_mask": targets != VOCAB,
            "images": rng.uniform(-1, 1, (batch, images, IMAGE, IMAGE, 3)).astype(np.float32),
            "image_mask": media_mask(inputs, VOCAB, images, VOCAB + 1, xp=np)}


def measure(every: int, batch: int, length: int, images: int, latents: int, remat: str,
            warmup: int, steps: int) -> dict:
    from vlmjax import sharding
    from vlmjax.train import optim, step as step_lib
    config, task, params, data, mesh = build(every, batch, length, images, latents, remat)
    mask = step_lib.trainable_mask(params, task.trainable)
    trained, _ = step_lib.split_params(params, mask)
    tx, schedule = optim.make_optimizer(config.optim, 1000, trained)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
    data = sharding.host_batch_to_global(data, mesh)
    with jax.set_mesh(mesh):
        train_step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh,
                                                      trainable=mask), donate_argnums=0)
        compiled = train_step.lower(state, data).compile()
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()  # FLOPs: a load-independent measure of the work
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        holder, times = {"state": state}, []
        for i in range(warmup + steps):
            start = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], data)
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise RuntimeError(f"every {every}: non-finite loss {loss}")
    blocks = sum(1 for k in params["llm"]["layers"] if k.startswith("xattn"))
    return dict(every=every, blocks=blocks,
                trained=sum(x.size for x in jax.tree.leaves(trained)),
                gflop=float(cost.get("flops", float("nan"))) / 1e9,
                argument_mb=_mb(memory.argument_size_in_bytes),
                temp_mb=_mb(memory.temp_size_in_bytes), step_ms=common.median(times) * 1e3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--remat", default="none", help="the LM's (and gated blocks') remat")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    print(common.machine_line(), f"{jax.device_count()} device(s)")
    print(f"float32, LM width {LLM['width']} depth {LLM['depth']} vocab {VOCAB}, ViT "
          f"{(IMAGE // PATCH) ** 2} tokens/image -> {args.latents} latents, batch {args.batch} x "
          f"{args.length} tokens, {args.images} images/row, remat {args.remat}; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    rows = []
    for every in args.every:  # the table needs every row (ratios): progress on stderr
        rows.append(measure(every, args.batch, args.length, args.images, args.latents,
                            args.remat, args.warmup, args.steps))
        print(f"every {every}: {rows[-1]}", file=sys.stderr, flush=True)
    base = {r["every"]: r["argument_mb"] + r["temp_mb"] for r in rows}.get(max(args.every))
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    for r in rows:
        total = r["argument_mb"] + r["temp_mb"]
        print(f"| {r['every']} | {r['blocks']} | {r['trained'] / 1e6:.1f}M | {r['gflop']:.0f} | "
              f"{r['argument_mb']:.0f} | {r['temp_mb']:.0f} | {total:.0f} | "
              f"{total / base:.2f}x | {r['step_ms']:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
