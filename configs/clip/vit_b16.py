"""CLIP ViT-B/16 at 224 px: the paper's recipe (Radford et al. 2021).

Run (a v4-64 / v5e-64 TPU slice or 8+ nodes of 8 GPUs; see README "Scaling up"):

    python -m vlmjax.train --config configs/clip/vit_b16.py:data=gs://BUCKET/laion400m/{00000..41455}.tar,tokenizer=gs://BUCKET/clip_bpe/tokenizer.json,tfds_dir=gs://BUCKET/tfds \
        --workdir gs://BUCKET/runs/clip_b16

Evaluations (every 10k steps and at the end): ImageNet-1k zero-shot on TFDS imagenet2012
validation and imagenet_v2 (CLIP's class names and 80 prompts), COCO 5k-test retrieval on TFDS
coco_captions (5 captions per image); prepare them with `tfds build` and pass tfds_dir=DIR.
Paper (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"), not measured here: CLIP ViT-B/16 reaches 68.3% ImageNet zero-shot top-1 after 32
epochs of 400M pairs (12.8B examples); open_clip reports ~67% for ViT-B/16 on LAION-400M. This
repository has not run this config at scale (no web-scale data on its development machines).
Settings: batch 32k, AdamW lr 5e-4 (b2 0.98, eps 1e-6), weight decay 0.2, 2k warmup steps,
cosine decay, t' = log(1/0.07), causal text transformer (width 512, 12 layers, 77 tokens, BPE
49408) pooled at EOS, class-token ViT with pre-norm and quick-GELU.

`:runlocal` shrinks everything to a few CPU steps on vlm_shapes (tested).
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import load_config, parse_preset_args
from vlmjax.evals import presets as evals_presets


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, data="", tokenizer="", tfds_dir="",
                             steps=390_000, batch=32_768)
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = args.steps
    c.model = dict(
        image=dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="cls",
                   pre_norm=True, patch_bias=False, activation="quick_gelu", norm_eps=1e-5),
        text=dict(vocab_size=49_408, max_len=77, width=512, depth=12, num_heads=8, mlp_dim=2048,
                  causal=True, pool="eos", eos_id=49_407, activation="quick_gelu",
                  norm_eps=1e-5),
        embed_dim=512, image_projection=True, text_projection=True,
        temperature_init=1 / 0.07, bias_init=placeholder(float), dtype="bfloat16")
    c.model_init = ""
    c.loss = dict(name="clip")
    c.data = dict(source="webdataset", split="train", paths=args.data or placeholder(str),
                  text_extension="txt", label_field=placeholder(str))
    c.input = dict(global_batch_size=args.batch, image_size=224,
                   preprocess="caption_first|inception_crop|normalize_clip", crop_area_min=0.9,
                   shuffle_buffer=50_000, seed=0, tokenizer=args.tokenizer or placeholder(str),
                   max_text_len=77, add_bos=True, eos="sticky", prefetch_batches=4)
    c.optim = dict(name="adamw", lr=5e-4, schedule="cosine", warmup_steps=2_000, end_lr=0.0,
                   weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, clip_norm=0.0)
    c.evals = evals_presets.imagenet_and_coco(batch_size=1024, every=10_000,
                                              data_dir=args.tfds_dir or None)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 100
    c.checkpoint = dict(every=2_000, keep=3, keep_period=50_000)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        here = os.path.dirname(os.path.abspath(__file__))
        siglip = load_config(os.path.join(here, "..", "siglip", "vit_b16.py") + ":runlocal")
        for key in ("total_steps", "data", "evals", "log_every", "checkpoint", "peak_flops"):
            c[key] = siglip[key]
        c.model.image.update(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
        c.model.text.update(vocab_size=1000, max_len=16, width=32, depth=1, num_heads=2,
                            mlp_dim=64, eos_id=3)  # vlm_shapes EOS
        c.model.update(embed_dim=32, dtype="float32")
        c.input.update(global_batch_size=16, image_size=32, shuffle_buffer=64,
                       tokenizer="vlm_shapes", max_text_len=16)
        c.optim.warmup_steps = 1
    return c
