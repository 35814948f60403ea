"""LLaVA train-step throughput: vlmjax's `llava` task against transformers'
`LlavaForConditionalGeneration` (torch, AdamW) at the same small shapes, stage 1 and stage 2, in
one run.

Both sides: a CLIP-style ViT (64 px, patch 8: 64 visual tokens after dropping the class token,
features of layer -2), an mlp2x_gelu projector, a Llama LLM (width 256, 4 layers, 32k vocab);
rows of 64 image tokens + 64 text tokens, loss on the text; float32, eager attention. Stage 1
trains the projector alone (vision tower and LLM frozen: torch `requires_grad=False`, vlmjax's
`trainable`); stage 2 the projector and the LLM. The vlmjax side is the trainer's own step
(`step.make_train_step` over `LlavaTask.loss_fn`, state donated) built from
configs/llava/llava15_7b.py with these shapes. Columns: median step time after warm-up,
examples/s of each side, and the ratio vlmjax / transformers.

    python benchmarks/llava_step.py                    # batch 8, both stages
    python benchmarks/llava_step.py --batch 4 --steps 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

IMAGE, PATCH, TEXT = 64, 8, 64
VISION = dict(patch_size=PATCH, width=128, depth=4, num_heads=4, mlp_dim=512, posemb="learn",
              activation="quick_gelu", norm_eps=1e-5, pool="cls", pre_norm=True,
              patch_bias=False)
LLM = dict(vocab_size=32_064, width=256, depth=4, num_heads=4, num_kv_heads=4, head_dim=64,
           mlp_dim=688, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False,
           remat="none", scan_layers=False)
IMAGE_TOKEN = 32_000
NUM_VISUAL = (IMAGE // PATCH) ** 2
HEADER = ("| stage | batch | HF step ms | HF examples/s | vlmjax step ms | vlmjax examples/s | "
          "vlmjax / HF |")


def random_rows(batch: int, seed: int = 0):
    """tokens [B, 64 + 64] (image tokens first), images [B, 64, 64, 3] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    text = rng.integers(4, 30_000, (batch, TEXT + 1))
    tokens = np.concatenate([np.full((batch, NUM_VISUAL), IMAGE_TOKEN), text], axis=1)
    images = rng.uniform(-1, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)
    return tokens.astype(np.int32), images


def timed(step, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return common.median(times)


def vlmjax_step(stage: int, batch: int, warmup: int, steps: int, chunk_size: int = 0) -> float:
    import flax.linen as nn

    from vlmjax import config as config_lib, sharding
    from vlmjax.train import optim, step as step_lib
    from vlmjax.train.tasks import get_task
    # The recipe config at these shapes; no file is read (params are random, data in memory).
    presets = f"runlocal,stage={stage},data=unused.json,images=unused,tokenizer=unused.json"
    presets += ",stage1=unused" if stage == 2 else ""
    config = config_lib.load_config(f"configs/llava/llava15_7b.py:{presets}")
    config.model.update(vision=dict(VISION), llm=dict(LLM), image_token_id=IMAGE_TOKEN)
    config.input.update(image_size=IMAGE, max_len=NUM_VISUAL + TEXT, global_batch_size=batch)
    config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant")
    if chunk_size:
        config.loss.chunk_size = chunk_size
    mesh = sharding.make_mesh({"data": -1})
    task = get_task("llava")(config, mesh)
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.PRNGKey(0))
    mask = step_lib.trainable_mask(params, task.trainable)
    trainable, _ = step_lib.split_params(params, mask)
    tx, schedule = optim.make_optimizer(config.optim, 1000, trainable)
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
    rows, images = random_rows(batch)
    length = NUM_VISUAL + TEXT
    loss_mask = np.zeros((batch, length), bool)
    loss_mask[:, NUM_VISUAL - 1:length - 1] = True  # predict every text token
    data = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": loss_mask,
            "segment_ids": np.ones((batch, length), np.int32), "image": images}
    data = sharding.host_batch_to_global(data, mesh)
    with jax.set_mesh(mesh):
        train_step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh,
                                                      trainable=mask), donate_argnums=0)
        holder = {"state": state}

        def run():
            holder["state"], metrics = train_step(holder["state"], data)
            jax.block_until_ready(metrics)
        return timed(run, warmup, steps)


def torch_step(stage: int, batch: int, warmup: int, steps: int) -> float:
    import torch
    import transformers
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=VISION["width"],
                           intermediate_size=VISION["mlp_dim"],
                           num_hidden_layers=VISION["depth"],
                           num_attention_heads=VISION["num_heads"], patch_size=PATCH,
                           image_size=IMAGE, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", vocab_size=LLM["vocab_size"],
                         hidden_size=LLM["width"], intermediate_size=LLM["mlp_dim"],
                         num_hidden_layers=LLM["depth"], num_attention_heads=LLM["num_heads"],
                         num_key_value_heads=LLM["num_kv_heads"], head_dim=LLM["head_dim"],
                         rms_norm_eps=LLM["norm_eps"], max_position_embeddings=512),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).train()
    for name, p in model.named_parameters():
        trained = "multi_modal_projector" in name or (stage == 2 and "language_model" in name)
        p.requires_grad_(trained)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    rows, images = random_rows(batch)
    ids = torch.as_tensor(rows[:, :-1], dtype=torch.long)
    labels = ids.clone()
    labels[:, :NUM_VISUAL] = -100
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()

    def run():
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(run, warmup, steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--chunk_size", type=int, default=0,
                        help="vlmjax's loss chunk (default: the recipe's, 128 = the whole row; "
                             "64 lets the loss skip the image-token half of each row)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    print(common.machine_line(), f"torch {torch.__version__} ({args.threads} threads)")
    print(f"float32, AdamW, {NUM_VISUAL} image + {TEXT} text tokens per row, median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    rows = []
    for stage in (1, 2):
        hf_s = torch_step(stage, args.batch, args.warmup, args.steps)
        ours_s = vlmjax_step(stage, args.batch, args.warmup, args.steps, args.chunk_size)
        print(f"| {stage} | {args.batch} | {hf_s * 1e3:.0f} | {args.batch / hf_s:.1f} | "
              f"{ours_s * 1e3:.0f} | {args.batch / ours_s:.1f} | {hf_s / ours_s:.2f}x |",
              flush=True)
        rows.append((stage, hf_s, ours_s))
    return rows


if __name__ == "__main__":
    main()
