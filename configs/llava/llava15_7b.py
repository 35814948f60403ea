"""LLaVA-1.5-7B: CLIP ViT-L/14-336 + a 7B Llama-family LLM (Vicuna-7B v1.5), LLaVA-1.5's recipe.

Run on 8+ accelerators (one v5p-8 / 8xH100 host or more; the LLM is sharded FSDP-style over every
device, mesh.fsdp=-1). Not run here: no figure of ours to quote. The paper's own (Liu et al.
2023, "Improved Baselines with Visual Instruction Tuning", Table 4, LLaVA-1.5-7B): VQAv2 78.5,
GQA 62.0, TextVQA 58.2 (the paper's figures, not measured by vlmjax).

    # stage 1 (feature alignment): the projector alone, on LCS-558K (blip_laion_cc_sbu_558k.json)
    python -m vlmjax.train --workdir gs://B/llava15_s1 --config configs/llava/llava15_7b.py:\
stage=1,vision_init=/ckpt/clip-vit-large-patch14-336,llm_init=/ckpt/vicuna-7b-v1.5-image,\
data=/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json,images=/data/LLaVA-Pretrain/images
    # stage 2 (visual instruction tuning): projector + LLM, on llava_v1_5_mix665k.json
    python -m vlmjax.train --workdir gs://B/llava15_s2 --config configs/llava/llava15_7b.py:\
stage=2,stage1=gs://B/llava15_s1,data=/data/llava_v1_5_mix665k.json,images=/data/images
    # a few CPU steps on tiny random HF models (what the tests run)
    python -m vlmjax.train --workdir /tmp/l15 --config configs/llava/llava15_7b.py:runlocal,\
vision_init=TINY_CLIP,llm_init=TINY_LLAMA,data=D.json,images=DIR

Recipe (LLaVA-1.5, scripts/v1_5/pretrain.sh and finetune.sh): one epoch per stage; stage 1
lr 1e-3, batch 256 (558K samples: 2,180 steps), template plain; stage 2 lr 2e-5, batch 128
(665K samples: 5,197 steps), template vicuna_v1; AdamW without weight decay, cosine, 3% warmup;
projector mlp2x_gelu; features of the penultimate CLIP layer (vision_feature_layer -2), class
token dropped (`default`): 576 image tokens at 336 px; max_len 2048; the vision tower frozen in
both stages. bf16 compute, float32 params (LLaVA trains in bf16 with DeepSpeed ZeRO-3: vlmjax's
FSDP mesh is the same sharding).

The LLM's vocabulary must hold the image token: HF's llava-1.5 adds `<image>` as id 32000 and pads
the embeddings to 32064. Prepare `llm_init` once with transformers
(`tok.add_tokens(["<image>"], special_tokens=True); model.resize_token_embeddings(32064)`,
then save both), or start stage 2 from an HF LlavaForConditionalGeneration directory
(`stage1=` takes one, e.g. llava-hf/llava-1.5-7b-hf, which also brings its projector).

Presets: stage=1|2, vision_init, llm_init, stage1 (a stage-1 workdir or an HF LLaVA directory),
data (LLaVA JSON; default LLaVA's file names under /data), images (its image folder), tokenizer (default: llm_init's or stage1's
tokenizer.json), image_token_id (the tokenizer's id of `<image>`; 32000), steps, batch, lr,
runlocal.
"""
import os

import ml_collections

from vlmjax.config import ConfigError, parse_preset_args

STAGE = {1: dict(lr=1e-3, batch=256, steps=2_180, template="plain",
                data="/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
                images="/data/LLaVA-Pretrain/images"),
         2: dict(lr=2e-5, batch=128, steps=5_197, template="vicuna_v1",
                 data="/data/llava_v1_5_mix665k.json", images="/data/images")}
CLIP_L14_336 = dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                    posemb="learn", activation="quick_gelu", norm_eps=1e-5, pool="cls",
                    pre_norm=True, patch_bias=False)
VICUNA_7B = dict(vocab_size=32_064, width=4096, depth=32, num_heads=32, num_kv_heads=32,
                 head_dim=128, mlp_dim=11_008, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False,
                 remat="full", scan_layers=True)
# :runlocal: the shapes of the tiny random HF models the tests build (tests/train/test_llava15.py)
TINY_VISION = dict(CLIP_L14_336, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)
TINY_LLM = dict(VICUNA_7B, vocab_size=128, width=32, depth=2, num_heads=4, num_kv_heads=4,
                head_dim=8, mlp_dim=64, remat="none", scan_layers=False)


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, stage=1, vision_init="", llm_init="",
                             stage1="", data="", images="", tokenizer="", image_token_id=32_000,
                             steps=0, batch=0, lr=0.0)
    if args.stage not in STAGE:
        raise ConfigError(f"preset stage={args.stage!r} must be 1 or 2")
    recipe = STAGE[args.stage]
    c = ml_collections.ConfigDict()
    c.task = "llava"
    c.seed = 0
    c.stage = args.stage
    c.total_steps = args.steps or recipe["steps"]
    c.model = dict(vision=dict(CLIP_L14_336), llm=dict(VICUNA_7B),
                   image_token_id=args.image_token_id,
                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                   projector="mlp2x_gelu", projector_bias=True, prefix_attention="causal",
                   dtype="bfloat16")
    if args.stage == 2:
        if not args.stage1 or args.vision_init or args.llm_init:
            raise ConfigError("stage=2 starts from stage 1: give stage1=WORKDIR (or an HF LLaVA "
                              "directory) and no vision_init / llm_init")
        c.model_init = args.stage1
    else:
        if args.stage1:
            raise ConfigError("preset stage1= is for stage=2")
        c.model_init = {k: v for k, v in (("vision", args.vision_init),
                                          ("llm", args.llm_init)) if v} or ""
    c.loss = dict(chunk_size=128, z_loss=0.0, label_smoothing=0.0)
    c.data = dict(source="llava_json", json_path=args.data or recipe["data"],
                  image_dir=args.images or recipe["images"])
    tokenizer = args.tokenizer or os.path.join(args.stage1 or args.llm_init, "tokenizer.json")
    c.input = dict(global_batch_size=args.batch or recipe["batch"], image_size=336,
                   preprocess="resize|value_range(-1, 1)", max_len=2048,
                   template=recipe["template"], tokenizer=tokenizer, special_tokens=[],
                   shuffle_buffer=50_000, seed=0, prefetch_batches=4)
    c.optim = dict(name="adamw", lr=args.lr or recipe["lr"], schedule="cosine",
                   warmup_steps=max(1, round(0.03 * c.total_steps)), end_lr=0.0,
                   weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0)
    c.evals = {}  # VQAv2 / GQA / TextVQA are scored with their official tools on generations
    c.data_shards = 0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.log_every = 10
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = args.steps or 2
        c.model.update(vision=dict(TINY_VISION), llm=dict(TINY_LLM), dtype="float32")
        c.input.update(global_batch_size=args.batch or 8, image_size=16,
                       max_len=64 if args.stage == 1 else 256,  # vicuna_v1: a long system prompt
                       shuffle_buffer=16)
        c.optim.warmup_steps = 1
        c.mesh = dict(data=-1, fsdp=1, tensor=1)
        c.log_every = 1
        c.checkpoint.every = 2
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
