"""Tiny SigLIP on vlm_shapes: trains on a laptop CPU in minutes (the `make demo` run).

    python -m vlmjax.train --config configs/siglip/tiny.py --workdir /tmp/siglip_tiny
    python -m vlmjax.train --config configs/siglip/tiny.py:runlocal --workdir /tmp/t  # seconds

The recipe (README "Measured: tiny models"): the small CNN image tower of models/convnet.py; a
text tower of token + position embeddings pooled by one attention (MAP) head, no transformer
layers (`text_depth=0`); each image also scored against 7 copies of its caption with the shape
words swapped (NegCLIP-style hard negatives, input.hard_negatives), without which shape is not
learned; AdamW at lr 3e-3 (chosen on validation, docs/experiments.md sixth round); 2000 steps of batch 128 (256k examples, ~5 epochs).
Evaluations (at the end): zero-shot on vlm_shapes validation (recipes are chosen on it), test and
test_novel (reported), image-text retrieval on test; metrics zero_shot/<entry>/top1, ...
Measured in this repository (README, vlm_shapes 1.1.0): 93.6% zero-shot top-1 on validation,
93.4% on test; about 8.5 min of training at ~500 examples/s on a 2-core CPU.
Presets: runlocal (a few steps, tiny data, for tests), steps=N, batch=N, lr=X, image=cnn|vit|resnet,
text_depth=N (transformer layers of the text tower; 0 = embeddings + MAP pooling, >0 pools the
last token), negatives=N (hard-negative captions per image; 0 = off). The earlier ViT recipe,
which learns colour but not shape (~18% top-1):
`:image=vit,text_depth=2,negatives=0,lr=1e-3,steps=500`.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import parse_preset_args
from vlmjax.evals import presets as evals_presets


TINY_IMAGE_TOWERS = {
    "cnn": dict(channels=(32, 64, 96), patch_size=2, pool="max"),
    "vit": dict(patch_size=8, stem="patch", width=96, depth=3, num_heads=4, mlp_dim=384,
                pool="map", posemb="learn"),
    # CLIP's modified ResNet, one block per stage; GroupNorm, since training carries no batch
    # statistics (models/resnet.py). 8.7 MFLOPs a 64 px image (the CNN: 24), yet on a 2-core
    # CPU it trains at ~200 examples/s to the CNN's ~500: 3x3 convolutions at 32x32 and 16x16.
    "resnet": dict(layers=(1, 1, 1, 1), width=8, num_heads=4, output_dim=64, image_size=64,
                   norm="groupnorm", norm_groups=4),
}


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, steps=2000, batch=128, lr=3e-3, image="cnn",
                             text_depth=0, negatives=7)
    if args.image not in TINY_IMAGE_TOWERS:  # efficientnet is a tower, but has no tiny recipe
        raise ValueError(f"preset image={args.image!r} is not one of {sorted(TINY_IMAGE_TOWERS)}")
    if type(args.text_depth) is not int or args.text_depth < 0:  # bool is no depth
        raise ValueError(f"preset text_depth={args.text_depth!r} must be an integer >= 0 "
                         "(0: embeddings + MAP pooling, no transformer layers)")
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.seed = 0
    c.total_steps = args.steps
    image = dict(TINY_IMAGE_TOWERS[args.image])
    c.model = dict(
        image=image,
        text=dict(vocab_size=1000, max_len=24, width=64, depth=args.text_depth, num_heads=2,
                  mlp_dim=256, pool="last" if args.text_depth else "map"),
        image_arch=args.image,
        embed_dim=64, image_projection=True, text_projection=True,
        temperature_init=10.0, bias_init=-10.0, dtype="float32")
    c.model_init = ""
    c.loss = dict(name="siglip", impl="ppermute")
    c.data = dict(source="vlm_shapes", split="train", config="64px",
                  data_dir=placeholder(str))  # None: TFDS's default data dir
    c.input = dict(global_batch_size=args.batch, image_size=64,
                   preprocess="caption_random|resize_crop|flip_caption_aware|value_range",
                   crop_area_min=0.05,
                   shuffle_buffer=10_000, seed=0, tokenizer="vlm_shapes", max_text_len=24,
                   add_bos=False, eos="sticky", prefetch_batches=4)
    if args.negatives:  # NegCLIP-style: captions with the shape word swapped, per image
        c.input.hard_negatives = dict(count=args.negatives, vocabulary="vlm_shapes")
    c.optim = dict(name="adamw", lr=args.lr, schedule="cosine", warmup_steps=50, end_lr=1e-5,
                   weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0)
    c.evals = evals_presets.vlm_shapes(batch_size=512, max_images=1000)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = 6
        c.data.train_size, c.data.eval_size, c.data.novel_size = 256, 64, 32
        c.input.global_batch_size = 16
        c.input.shuffle_buffer = 64
        c.input.image_size = 32
        c.model.image.update({"cnn": dict(channels=(8, 16)),
                              "vit": dict(width=32, depth=1, mlp_dim=64),
                              "resnet": dict(output_dim=32, image_size=32)}[args.image])
        c.model.text.update(width=32, depth=min(args.text_depth, 1), mlp_dim=64)
        c.model.embed_dim = 32
        c.optim.warmup_steps = 2
        c.log_every = 2
        c.checkpoint.every = 3
        c.evals = evals_presets.vlm_shapes(batch_size=64, max_images=64)
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
