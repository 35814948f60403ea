"""Tiny Flamingo-style fusion model on vlm_shapes: the tiny SigLIP CNN (frozen) and the tiny LM
(frozen), joined by a Perceiver resampler and tanh-gated cross-attention, trained on interleaved
few-shot sequences on a laptop CPU. `make demo-fusion` runs the whole chain; by hand:

    # 1. the frozen parts (the SigLIP and LM demos' workdirs) and the interleaved export
    python -m vlmjax.train --config configs/siglip/tiny.py:steps=800 --workdir /tmp/siglip \
        --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.train --config configs/lm/tiny.py:steps=200,scenes=True \
        --workdir /tmp/lm_tiny --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.data.export mmc4 /tmp/mmc4_shapes --data_dir /tmp/vlm_shapes
    # 2. the resampler, the gated blocks and the two added tokens
    python -m vlmjax.train --workdir /tmp/fusion --config configs/fusion/tiny.py:\
shapes_dir=/tmp/vlm_shapes,mmc4_dir=/tmp/mmc4_shapes,vision_init=/tmp/siglip,llm_init=/tmp/lm_tiny

The model: the CNN image tower of configs/siglip/tiny.py (its last 4x4 map at 64 px: 16 visual
tokens of width 96) with a learned position vector per token (feature_posemb: a CNN's tokens do
not say where they are, cross-attention cannot tell them apart otherwise); a Perceiver
resampler of 8 latents (depth 2, 4 heads of 24); gated cross-attention (4 heads of 32, SwiGLU
FFN 256, gates at 0) before every `xattn_every`-th layer of the LM of configs/lm/tiny.py (width
128, 4 layers, vocabulary 512); `<image>` and `<|endofchunk|>` are the added ids 512 and 513
(additional_vocab_size 2: rows and head trained, the LM's own table frozen).
Data: the mmc4 export of vlm_shapes' train split: documents of 1-5 images, each followed by a
question about it and its short answer in the LM's format ("Q: ... A: red") or (20%) a caption;
rows of max_len 160 tokens, up to 5 images. AdamW, cosine, lr 3e-3, 50 warmup steps, 1200
steps of 16 rows (chosen on validation, 100 images: 600 steps at lr 1e-3 / 3e-3 / 1e-2 gave
28.2% (300 steps) / 38.6% / 30.0% 0-shot, 1200 steps at 3e-3 43.6%; docs/experiments.md).
Evaluations: VQA exact match on vlm_shapes validation (where the recipe is chosen) and test, 0-,
2- and 4-shot (in-context examples from train), 200 images per split:
vqa/{split}/{k}shot/exact_match.
Presets: shapes_dir, mmc4_dir, tokenizer (default: shapes_dir's 64px SentencePiece model),
vision_init, llm_init (workdirs; '' = random), steps, batch, lr, xattn_every, latents,
select=N (validation only, N images, 0- and 4-shot: the runs that choose a recipe), runlocal
(a few steps of a tiny model on a tiny build, for tests).
"""
import os

import ml_collections

from vlmjax.config import parse_preset_args
from vlmjax.data import shapes
from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS

RUNLOCAL_SIZES = dict(train_size=64, eval_size=16, novel_size=8)
SHOTS = (0, 2, 4)


def tokenizer_path(shapes_dir: str, sizes: dict) -> str:
    return os.path.join(shapes_dir, "vlm_shapes", shapes.config_name("64px", **sizes),
                        str(shapes.VlmShapes.VERSION), shapes.TOKENIZER_FILENAME)


def evals(shapes_dir: str, sizes: dict, splits, shots, batch_size: int, max_examples: int,
          max_new_tokens: int = 8) -> dict:
    def data(split):
        return dict(source="vlm_shapes", split=split, config="64px", data_dir=shapes_dir,
                    **sizes)
    return {f"{split}/{k}shot": dict(type="vqa", data=data(split), shots=k,
                                     shots_pool=min(256, max(4 * k, sizes.get("train_size", 256))),
                                     batch_size=batch_size, max_examples=max_examples,
                                     max_new_tokens=max_new_tokens)
            for split in splits for k in shots}


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, shapes_dir="/tmp/vlm_shapes",
                             mmc4_dir="/tmp/mmc4_shapes", tokenizer="", vision_init="",
                             llm_init="", steps=0, batch=0, lr=0.0, xattn_every=1, latents=8,
                             select=0)
    sizes = RUNLOCAL_SIZES if args.runlocal else {}
    c = ml_collections.ConfigDict()
    c.task = "fusion"
    c.seed = 0
    c.total_steps = args.steps or 1200
    c.model = dict(
        vision_arch="cnn", vision=dict(channels=(32, 64, 96), patch_size=2),
        llm=dict(vocab_size=512, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                 rope_theta=10_000.0, tie_embeddings=True),
        image_token_id=512, end_of_chunk_id=513, additional_vocab_size=2,
        vision_feature_layer=-1, vision_feature_select_strategy="full", feature_posemb=True,
        resampler=dict(num_latents=args.latents, depth=2, num_heads=4, head_dim=24),
        cross_attention=dict(num_heads=4, head_dim=32, mlp_dim=256),
        cross_attn_every=args.xattn_every, only_attend_immediate_media=True, dtype="float32")
    parts = {"vision": args.vision_init, "llm": args.llm_init}
    c.model_init = {k: v for k, v in parts.items() if v} or ""
    c.train_embeddings = True
    c.loss = dict(chunk_size=160, z_loss=0.0, label_smoothing=0.0)
    c.data = dict(source="mmc4", json_path=os.path.join(args.mmc4_dir, "train_mmc4.jsonl"),
                  image_dir=os.path.join(args.mmc4_dir, "images"))
    c.input = dict(global_batch_size=args.batch or 16, image_size=64, max_len=160,
                   max_images=5, tokenizer=args.tokenizer or tokenizer_path(args.shapes_dir, sizes),
                   special_tokens=list(VLM_SHAPES_LM_TOKENS), seed=0)
    c.optim = dict(name="adamw", lr=args.lr or 3e-3, schedule="cosine", warmup_steps=50,
                   end_lr=1e-5, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
    if args.select:
        c.evals = evals(args.shapes_dir, sizes, ("validation",), (0, 4), batch_size=64,
                        max_examples=args.select)
    else:
        c.evals = evals(args.shapes_dir, sizes, ("validation", "test"), SHOTS, batch_size=64,
                        max_examples=200)
    c.data_shards = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = args.steps or 4
        c.model.vision.update(channels=(8, 16))
        c.model.llm.update(width=32, depth=1, mlp_dim=64)  # configs/lm/tiny.py:runlocal
        c.model.resampler.update(num_latents=4, depth=1, num_heads=2, head_dim=8)
        c.model.cross_attention.update(num_heads=2, head_dim=8, mlp_dim=32)
        c.input.update(global_batch_size=8, image_size=32, max_len=96, max_images=3)
        c.loss.chunk_size = 96
        c.optim.warmup_steps = 1
        c.log_every = 2
        c.checkpoint.every = 2
        c.evals = evals(args.shapes_dir, sizes, ("test",), (0, 2), batch_size=8, max_examples=4)
        c.peak_flops = 1e11
    return c
