"""OpenFlamingo-3B-like: CLIP ViT-L/14 (frozen) + a 1-3B Llama / Qwen2 LM (frozen), joined by
OpenFlamingo's Perceiver resampler and tanh-gated cross-attention, trained on MMC4.

Run on 8+ accelerators (one 8xA100/H100 host or a v5p-8; FSDP over every device). Not run here:
no figure of ours to quote. OpenFlamingo's own (README of mlfoundations/open_flamingo, MPT-1B
LM, not measured by vlmjax): OpenFlamingo-3B-vitl-mpt1b COCO 4-shot CIDEr 77.3, VQAv2 4-shot
45.8; the 9B (MPT-7B, xattn every 4) 89.0 / 54.8.

    python -m vlmjax.train --workdir gs://B/of3b --config configs/fusion/openflamingo_3b.py:\
vision_init=/ckpt/clip-vit-large-patch14,llm_init=/ckpt/Llama-3.2-1B,\
data=/data/mmc4/docs.jsonl,images=/data/mmc4/images
    # 9B-style placement: a gated block before every 4th LM layer
    ... openflamingo_3b.py:xattn_every=4,...
    # a few CPU steps on tiny random HF models (what tests/train/test_fusion_configs.py runs)
    python -m vlmjax.train --workdir /tmp/of --config configs/fusion/openflamingo_3b.py:runlocal,\
vision_init=TINY_CLIP,llm_init=TINY_LLAMA,data=D.jsonl,images=DIR

Model (open_flamingo/src/: factory.py, flamingo.py, helpers.py):
- vision: OpenAI CLIP ViT-L/14 at 224 px (factory default `ViT-L-14`, `openai`), frozen; its
  256 patch tokens (class token dropped: open_clip's output_tokens) of width 1024.
- resampler: 64 latents, depth 6, 8 heads x 64, FFN x4 with GELU, LayerNorms (helpers.py
  PerceiverResampler defaults: num_latents=64, depth=6, heads=8, dim_head=64, ff_mult=4).
- gated cross-attention: 8 heads x 64, FFN 4 x LM width with GELU, LayerNorm (eps 1e-5, torch's
  default), no biases, one scalar tanh gate per sub-block at 0 (helpers.py
  GatedCrossAttentionBlock); text before any image gets no attention but still the gated FFN
  (skip_without_media=False, as MaskedCrossAttention zeroes only the attention).
- cross_attn_every: 1 for 3B (README table: "Xattn interval" 1 for the MPT-1B models, 2 for the
  4B RedPajama-3B, 4 for the 9B MPT-7B); preset xattn_every=N.
- LM: frozen; `<image>` and `<|endofchunk|>` are two added ids (vocab, vocab + 1) with their own
  trained rows and head (OpenFlamingo resizes the table and masks the gradient to those two rows;
  train_utils.py). OpenFlamingo's MPT-1B is not a vlmjax decoder (no MPT); the default here is
  Llama-3.2-1B's shape (16 layers, width 2048), and with llm_init the architecture is read from
  that directory's config files, so any HF Llama / Qwen2 / OPT of 1-3B works (Qwen2.5-1.5B, ...).

Recipe (open_flamingo/train/: README.md example command and scripts/run_train.sh, train.py
defaults, data.py):
- AdamW lr 1e-4 (train.py default), constant schedule (default `constant`) after 1,875 linear
  warmup steps (README command), betas 0.9/0.999, eps 1e-8 (torch defaults), weight decay 0.1 on
  the gated cross-attention blocks only (train.py get_grouped_params; vlmjax additionally never
  decays parameters with fewer than 2 dims: the gates and LayerNorms), gradient clipping 1.0.
- MMC4 batch 32 per GPU on 8 GPUs (run_train.sh: 1 node, 8 tasks) = 256; 125,000 samples per
  "epoch" x 480 epochs at (125000 // 256) = 488 steps each = 234,240 steps (train.py's
  total_training_steps), about 60M MMC4 sequences (the tech report, Awadalla et al. 2023,
  arXiv:2308.01390: "60M interleaved (MMC4) examples").
- MMC4 rows: 256 tokens (data.py max_tokens=256, <image> tokens included), at most 6 images
  (train.py --mmc4_max_num_images 6; train/README "six images per sequence"), images dropped
  below CLIP similarity 0.24 (README --mmc4_textsim_threshold 0.24).
- bf16 compute, float32 params (OpenFlamingo trains amp_bf16 or fp32), full remat of the LM
  (run_train.sh --gradient_checkpointing).

Not reproduced (the fusion task reads one MMC4 source): OpenFlamingo's LAION-2B stream (64 pairs
per GPU, captions of 32 tokens, loss x 0.2, 120M pairs in all), its dropping of half the
single-image MMC4 documents and of images under 10 KB, and the ChatGPT-generated sequences of
the 4B models. The image pipeline resizes to 224 px squares (no centre crop) and applies one
scalar range to all channels: CLIP's per-channel mean/std normalisation cannot be expressed by
data/interleaved.py's value_range, so the range below is the per-channel ranges' mean (within
0.17 of each channel's).

Checkpoint portability (OpenFlamingo -> vlmjax): not portable as is. vlmjax reads the tower at
vision_feature_layer -1, the last block's output *before* CLIP's post-LayerNorm (HF's
hidden_states[-1], what Idefics reads), while open_clip's output tokens are taken *after*
ln_post; the resampler's own input LayerNorm does not undo ln_post's per-channel scale and
bias, so OpenFlamingo's resampler would see different inputs. Also, for xattn_every > 1
OpenFlamingo puts the gated blocks before layers k-1, 2k-1, ... ((layer_idx + 1) % k == 0,
flamingo_lm.py) and vlmjax before 0, k, 2k, ... (Idefics' placement); at k = 1 they coincide.
And its MPT-1B LM has no vlmjax decoder. Train with this config instead of converting weights.

Presets: vision_init (HF CLIPModel directory), llm_init (HF Llama / Qwen2 directory, or a
converted / lm workdir), data (MMC4 .jsonl), images (its image folder), tokenizer (default:
llm_init's tokenizer.json), xattn_every (1), steps, batch, lr, runlocal.
"""
import os

import ml_collections

from vlmjax.config import ConfigError, parse_preset_args

RECIPE = dict(lr=1e-4, batch=256, steps=234_240, warmup=1_875, max_len=256, max_images=6,
              sim_threshold=0.24, weight_decay=0.1)
CLIP_L14 = dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096, posemb="learn",
                activation="quick_gelu", norm_eps=1e-5, pool="cls", pre_norm=True,
                patch_bias=False)
# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B); with llm_init the directory's own.
LLAMA32_1B = dict(vocab_size=128_256, width=2048, depth=16, num_heads=32, num_kv_heads=8,
                  head_dim=64, mlp_dim=8192, activation="silu", norm_eps=1e-5,
                  rope_theta=500_000.0,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192),
                  tie_embeddings=True)
RESAMPLER = dict(num_latents=64, depth=6, num_heads=8, head_dim=64, mlp_ratio=4,
                 activation="gelu", norm_eps=1e-5)
XATTN = dict(num_heads=8, head_dim=64, activation="gelu", mlp="plain", norm="layernorm",
             norm_eps=1e-5, gate="float", skip_without_media=False)
FFN_MULT = 4  # the gated block's FFN is 4 x the LM width (helpers.py FeedForward(mult=4))
# CLIP's per-channel normalisation ((x - mean) / std, x in [0, 1]) maps [0, 1] onto
# [-1.79, 1.93], [-1.75, 2.07], [-1.48, 2.15]: one scalar range for all three, their mean.
CLIP_VALUE_RANGE = (-1.675, 2.050)
# :runlocal: the shapes of the tiny random HF models the test builds
TINY_VISION = dict(CLIP_L14, patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
TINY_IMAGE_SIZE = 32
TINY_LLM = dict(LLAMA32_1B, vocab_size=256, width=32, depth=4, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64,
                rope_scaling=dict(LLAMA32_1B["rope_scaling"], original_max_position_embeddings=16))
TINY_RESAMPLER = dict(RESAMPLER, num_latents=4, depth=2, num_heads=2, head_dim=8)
TINY_XATTN = dict(XATTN, num_heads=2, head_dim=8)


def llm_architecture(src: str) -> dict:
    """Decoder arguments of an LM source (its config files only), without the info keys."""
    from vlmjax.convert.hf_decoder_config import INFO_KEYS
    from vlmjax.train.tasks.lm import source_model_config
    try:
        model = source_model_config(src)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"llm_init={src}: {error}") from error
    return {k: v for k, v in model.items()
            if k not in (*INFO_KEYS, "dtype", "scan_layers", "remat")}


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, vision_init="", llm_init="", data="",
                             images="", tokenizer="", xattn_every=1, steps=0, batch=0, lr=0.0)
    if type(args.xattn_every) is not int or args.xattn_every < 1:
        raise ConfigError(f"preset xattn_every={args.xattn_every!r} must be an integer >= 1 "
                          "(1: OpenFlamingo-3B, 2: 4B, 4: 9B)")
    llm = llm_architecture(args.llm_init) if args.llm_init else dict(
        TINY_LLM if args.runlocal else LLAMA32_1B)
    vocab = int(llm["vocab_size"])
    c = ml_collections.ConfigDict()
    c.task = "fusion"
    c.seed = 0
    c.total_steps = args.steps or (3 if args.runlocal else RECIPE["steps"])
    c.model = dict(
        vision_arch="vit", vision=dict(TINY_VISION if args.runlocal else CLIP_L14),
        llm=dict(llm, remat="none" if args.runlocal else "full"),
        image_token_id=vocab, end_of_chunk_id=vocab + 1, additional_vocab_size=2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        resampler=dict(TINY_RESAMPLER if args.runlocal else RESAMPLER),
        cross_attention=dict(TINY_XATTN if args.runlocal else XATTN,
                             mlp_dim=FFN_MULT * int(llm["width"])),
        cross_attn_every=args.xattn_every, only_attend_immediate_media=True,
        dtype="float32" if args.runlocal else "bfloat16")
    c.model_init = {k: v for k, v in (("vision", args.vision_init),
                                      ("llm", args.llm_init)) if v} or ""
    c.train_embeddings = True
    c.loss = dict(chunk_size=256, z_loss=0.0, label_smoothing=0.0)
    c.data = dict(source="mmc4", json_path=args.data or "/data/mmc4/docs.jsonl",
                  image_dir=args.images or "/data/mmc4/images",
                  sim_threshold=RECIPE["sim_threshold"])
    tokenizer = args.tokenizer or os.path.join(args.llm_init or "/ckpt/Llama-3.2-1B",
                                               "tokenizer.json")
    c.input = dict(global_batch_size=args.batch or RECIPE["batch"], image_size=224,
                   max_len=RECIPE["max_len"], max_images=RECIPE["max_images"],
                   tokenizer=tokenizer, value_range=CLIP_VALUE_RANGE, special_tokens=[], seed=0)
    c.optim = dict(name="adamw", lr=args.lr or RECIPE["lr"], schedule="constant",
                   warmup_steps=RECIPE["warmup"], weight_decay=RECIPE["weight_decay"],
                   # decay the gated blocks only (train.py get_grouped_params)
                   no_decay=r"^(perceiver|media_posemb|additional_embed|additional_head)",
                   b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)
    c.evals = {}  # OpenFlamingo's few-shot COCO / VQAv2 suite scores generations with its tools
    c.data_shards = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=2000, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.input.update(global_batch_size=args.batch or 8, image_size=TINY_IMAGE_SIZE,
                       max_len=64, max_images=3)
        c.loss.chunk_size = 64
        # step 0 is at lr 0 and step 1 moves only the gates (every other gradient passes
        # through tanh(0)); step 2 is the first to train the resampler and the blocks
        c.optim.warmup_steps = 1
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.log_every = 1
        c.checkpoint.every = c.total_steps  # the final one only: saves are slow on CPU
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
