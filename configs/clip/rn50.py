"""CLIP RN50 at 224 px: the paper's ResNet recipe (Radford et al. 2021, Tables 19 and 20).

Run (a v4-64 / v5e-64 TPU slice or 8+ nodes of 8 GPUs; see README "Scaling up"):

    python -m vlmjax.train --config configs/clip/rn50.py:data=gs://BUCKET/laion400m/{00000..41455}.tar,tokenizer=gs://BUCKET/clip_bpe/tokenizer.json,tfds_dir=gs://BUCKET/tfds \
        --workdir gs://BUCKET/runs/clip_rn50
    python -m vlmjax.train --config configs/clip/rn50.py:runlocal --workdir /tmp/rn50  # CPU, seconds

Evaluations: those of configs/clip/vit_b16.py (ImageNet-1k zero-shot on imagenet2012 validation
and imagenet_v2, COCO 5k-test retrieval). Paper, not measured here: CLIP RN50 reaches 59.6%
ImageNet zero-shot top-1 after 32 epochs of 400M pairs; open_clip reports ~59.8% for RN50 on
its reproduction (YFCC/CC12M figures are lower). This repository has not run this config at
scale (no web-scale data on its development machines).
Settings (the paper): CLIP's modified ResNet (models/resnet.py: blocks (3, 4, 6, 3), width 64,
attention pool with 32 heads to the 1024-d embedding, so no image projection), the text
transformer of configs/clip/vit_b16.py (width 512, 12 layers, 8 heads, 77 tokens, BPE 49408,
pooled at EOS) projected to 1024; batch 32k, Adam b1 0.9, b2 0.999, eps 1e-8 (the paper's
ResNet values; its ViTs use 0.98 / 1e-6), decoupled weight decay 0.2, lr 5e-4, 2k warmup
steps, cosine decay, 32 epochs (390k steps), t' = log(1/0.07).
Not the paper's, and why:
- GroupNorm (32 groups) in place of BatchNorm: the trainer carries no batch statistics
  (models/resnet.py), and its `batchnorm` form is frozen statistics, an affine map when trained
  from scratch. Pretrained CLIP ResNets run with `norm="batchnorm"`.
- no clipping of the temperature at 100: the softmax loss here has none.

`:runlocal` trains a tiny ResNet (one block per stage, width 8) a few CPU steps on vlm_shapes
(tested).
"""
import os

from vlmjax.config import load_config, parse_preset_args

RN50 = dict(layers=(3, 4, 6, 3), width=64, num_heads=32, output_dim=1024, image_size=224,
            norm="groupnorm", norm_groups=32)
EMBED_DIM = 1024  # RN50's attention pool output: the shared embedding width


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, data="", tokenizer="", tfds_dir="",
                             steps=390_000, batch=32_768)
    here = os.path.dirname(os.path.abspath(__file__))
    # The ViT-B/16 config's data, text tower, evaluations and schedule; its presets pass through.
    presets = ",".join(f"{k}={v}" for k, v in args.items()
                       if k != "runlocal" and v != "") + (",runlocal" if args.runlocal else "")
    c = load_config(os.path.join(here, "vit_b16.py") + ":" + presets)
    c.model.image = dict(RN50, image_size=c.input.image_size)
    c.model.update(image_arch="resnet", embed_dim=EMBED_DIM, image_projection=False)
    c.optim.update(b2=0.999, eps=1e-8)
    if args.runlocal:
        c.model.image.update(layers=(1, 1, 1, 1), width=8, num_heads=4, output_dim=32,
                             norm_groups=4)
        c.model.embed_dim = 32
    return c
