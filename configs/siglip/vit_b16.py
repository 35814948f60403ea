"""SigLIP ViT-B/16 at 224 px: the paper's recipe (Zhai et al. 2023, "Sigmoid Loss for Language
Image Pre-Training").

Run (a v4-64 / v5e-64 TPU slice or 8+ nodes of 8 GPUs; see README "Scaling up"):

    python -m vlmjax.train --config configs/siglip/vit_b16.py:data=gs://BUCKET/webli/{000000..099999}.tar,tokenizer=gs://BUCKET/c4_en.model,tfds_dir=gs://BUCKET/tfds \
        --workdir gs://BUCKET/runs/siglip_b16

Evaluations (every 10k steps and at the end): ImageNet-1k zero-shot on TFDS imagenet2012
validation and imagenet_v2 (CLIP's class names and 80 prompts), COCO 5k-test retrieval on TFDS
coco_captions (5 captions per image); prepare them with `tfds build` and pass tfds_dir=DIR.
Paper (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"), not measured here:
SigLIP B/16 reaches about 73-76% ImageNet zero-shot top-1 after 9-40B seen examples of WebLI;
on a smaller web dataset (e.g. 400M pairs) expect less. This repository has not run this config
at scale (no web-scale data on its development machines).
Settings: batch 32k, AdamW lr 1e-3 (b2 0.95), weight decay 1e-4, t' = log 10, b = -10, text
length 16 with the T5 SentencePiece (32k), chunked ppermute loss.

`:runlocal` shrinks everything to a few CPU steps on vlm_shapes (tested):
    python -m vlmjax.train --config configs/siglip/vit_b16.py:runlocal --workdir /tmp/b16
"""
import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import parse_preset_args
from vlmjax.evals import presets as evals_presets


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, data="", tokenizer="", tfds_dir="",
                             steps=300_000, batch=32_768)
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = args.steps
    c.model = dict(
        image=dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="map",
                   posemb="learn"),
        text=dict(vocab_size=32_000, max_len=16, width=768, depth=12, num_heads=12,
                  mlp_dim=3072, pool="last"),
        embed_dim=768, image_projection=False, text_projection=True, text_projection_bias=True,
        temperature_init=10.0, bias_init=-10.0, dtype="bfloat16")
    c.model_init = ""
    c.loss = dict(name="siglip", impl="ppermute")
    c.data = dict(source="webdataset", split="train", paths=args.data or placeholder(str),
                  text_extension="txt", label_field=placeholder(str))
    c.input = dict(global_batch_size=args.batch, image_size=224,
                   preprocess="caption_random|inception_crop|value_range", crop_area_min=0.4,
                   shuffle_buffer=50_000, seed=0, tokenizer=args.tokenizer or placeholder(str),
                   max_text_len=16, add_bos=False, eos="sticky", prefetch_batches=4)
    c.optim = dict(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=5_000, end_lr=0.0,
                   weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0)
    c.evals = evals_presets.imagenet_and_coco(batch_size=1024, every=10_000,
                                              data_dir=args.tfds_dir or None)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 100
    c.checkpoint = dict(every=2_000, keep=3, keep_period=50_000)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        shrink_to_runlocal(c)
    return c


def shrink_to_runlocal(c):
    """A few CPU steps on a tiny vlm_shapes build, same code paths (float32 on CPU)."""
    c.total_steps = 3
    c.model.image.update(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.text.update(vocab_size=1000, max_len=16, width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.embed_dim = 32
    c.model.dtype = "float32"
    c.data = dict(source="vlm_shapes", split="train", config="64px", data_dir=placeholder(str),
                  train_size=64, eval_size=32, novel_size=16)
    c.input.update(global_batch_size=16, image_size=32, shuffle_buffer=64, tokenizer="vlm_shapes",
                   preprocess="caption_random|inception_crop|value_range")
    c.optim.warmup_steps = 1
    c.evals = dict(test=dict(type="zero_shot", data=dict(split="test"), templates="vlm_shapes",
                             batch_size=32))
    c.log_every = 1
    c.checkpoint = dict(every=3, keep=1)
    c.peak_flops = 1e11
