"""Tiny BLIP on vlm_shapes: ITC + ITM (hard negatives) + LM on a laptop CPU (`make demo-blip`).

    python -m vlmjax.train --config configs/siglip/tiny.py --workdir /tmp/siglip \
        --config.data.data_dir=/tmp/vlm_shapes                # the image tower's start
    python -m vlmjax.train --config configs/blip/tiny.py:vision_init=/tmp/siglip \
        --workdir /tmp/blip_tiny --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.train --config configs/blip/tiny.py:runlocal --workdir /tmp/t   # seconds

The recipe: the CNN image tower of configs/siglip/tiny.py (`image_arch="cnn"`: its 4x4 feature
map at 64 px is the image tokens, their max over positions the first token), started from a
SigLIP tiny run of the recipe's 2000 steps (`vision_init`; from the LLaVA chain's 800-step run
captions name the right shape 77% of the time instead of 88%) and trained on, and a 2-layer
BERT-style text transformer whose encoder and decoder share all but their self-attention
(BLIP); captions tokenised `[CLS] caption [SEP]` with the vlm_shapes tokenizer plus [ENC] /
[DEC] / [MASK];
losses ITC + ITM + LM (label smoothing 0.1) with equal weights, as in BLIP. Departures from
BLIP (docs/experiments.md, BLIP tiny): the text kernels start with variance 1/fan_in (with
BERT's 0.02 at width 96 ITM stays at its prior); the ITM negatives are drawn at temperature
0.2, not the ITC temperature; each image's caption with its shape word swapped is one more ITM
and ITC negative (`swaps=1`, NegCLIP-style); and the image tower is the SigLIP CNN, not BLIP's
ViT (the conv-stem ViT of `image=vit` did not learn shape: ITM 75%). Evaluations at the end: ITM
accuracy on validation (recipes are chosen on it) and test, retrieval on test with ITM
re-ranking of the ITC top 8 (by ITM + the ITC logit, similarity / temperature: chosen on
validation over BLIP's ITM + similarity, docs/experiments.md), captioning on test (attribute
accuracy against the scene, CIDEr-D, BLEU-4).
Presets: runlocal (a few steps on tiny data, for tests), steps=N, batch=N, lr=X, mlm=W (the
MLM weight; 0 = off), momentum=M (momentum distillation with a queue of `queue` features;
0 = off), queue=N, width=N (text and image width), itm_t=T (the ITM negatives' temperature; 0 =
the ITC temperature, BLIP's), swaps=K (K shape-word-swapped captions per image as extra ITM
negatives; default 1; 0 = off, BLIP's), image=cnn|vit (the image tower: the CNN of
configs/siglip/tiny.py, the default, or the conv-stem ViT, which HF BLIP can express),
vision_init=WORKDIR (a contrastive run whose image tower is this one: SigLIP tiny's for the CNN;
default: a random tower, which for the CNN does not learn shape in this budget), fine_map=True
(the CNN's last stage without its final pool: 8x8 = 64 image tokens of 8 px cells instead of
4x4, the same parameters; docs/experiments.md, BLIP tiny).
"""
import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import ConfigError, parse_preset_args
from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS


CNN = dict(channels=(32, 64, 96), patch_size=2)  # configs/siglip/tiny.py's image tower


def evals(max_images: int, captions: int, batch_size: int) -> dict:
    def on(split):
        return dict(split=split)
    return dict(
        itm_validation=dict(type="itm", data=on("validation"), max_images=max_images,
                            batch_size=batch_size),
        itm_test=dict(type="itm", data=on("test"), max_images=max_images,
                      batch_size=batch_size),
        retrieval_test=dict(type="retrieval", data=on("test"), max_images=max_images,
                            rerank_k=8, rerank_itc="logit", batch_size=batch_size),
        captioning_test=dict(type="captioning", data=dict(source="vlm_shapes", split="test"),
                             max_examples=captions, max_new_tokens=32, batch_size=batch_size))


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, steps=1500, batch=64, lr=1e-3, mlm=0.0,
                             momentum=0.0, queue=0, width=96, itm_t=0.2,
                             swaps=1, image="cnn", vision_init="", fine_map=False)
    if args.image not in ("vit", "cnn"):
        raise ConfigError(f"preset image={args.image!r} must be 'vit' or 'cnn'")
    if args.fine_map and args.image != "cnn":
        raise ConfigError("preset fine_map=True is the CNN's (its last stage without the final "
                          "pool); image=vit has no such map")
    c = ml_collections.ConfigDict()
    c.task = "blip"
    c.seed = 0
    c.total_steps = args.steps
    width = args.width
    vit = dict(patch_size=8, stem="conv", width=width, depth=3, num_heads=4, mlp_dim=4 * width,
               posemb="learn", norm_eps=1e-5)
    c.model = dict(
        image=vit if args.image == "vit" else dict(
            CNN, **({"last_stage_pool": False} if args.fine_map else {})),
        image_arch=args.image,
        text=dict(vocab_size=512, max_len=32, width=width, depth=2, num_heads=4,
                  mlp_dim=4 * width, init_scheme="fan_in"),
        embed_dim=64, share="all_but_self_attention", parts=("encoder", "decoder"),
        temperature_init=0.07, dtype="float32")
    # vision_init: a contrastive workdir whose image tower is this one (image=cnn: SigLIP tiny).
    c.model_init = ({"image": {"source": args.vision_init, "prefix": "image_tower"}}
                    if args.vision_init else "")
    c.loss = dict(itc=1.0, itm=1.0, lm=1.0, mlm=args.mlm, label_smoothing=0.1,
                  momentum=args.momentum, alpha=0.4, queue_size=args.queue,
                  itm_temperature=args.itm_t)
    c.data = dict(source="vlm_shapes", split="train", config="64px",
                  data_dir=placeholder(str))  # None: TFDS's default data dir
    c.input = dict(global_batch_size=args.batch, image_size=64,
                   preprocess="caption_random|resize_crop|flip_caption_aware|value_range",
                   crop_area_min=0.3, shuffle_buffer=10_000, seed=0, tokenizer="vlm_shapes",
                   special_tokens=list(VLM_SHAPES_LM_TOKENS) + ["[MASK]"], max_text_len=32,
                   add_bos=True, eos="sticky", prefetch_batches=4)
    if args.swaps:
        c.input.hard_negatives = dict(count=args.swaps, vocabulary="vlm_shapes")
    c.optim = dict(name="adamw", lr=args.lr, schedule="cosine", warmup_steps=100, end_lr=1e-5,
                   weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0, freeze="")
    c.evals = evals(max_images=500, captions=500, batch_size=128)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = 4
        c.data.train_size, c.data.eval_size, c.data.novel_size = 128, 32, 16
        c.input.global_batch_size = 16
        c.input.shuffle_buffer = 64
        c.input.image_size = 32
        c.model.image.update(dict(channels=(8, 16)) if args.image == "cnn" else
                             dict(width=32, depth=1, mlp_dim=64))
        c.model.text.update(width=32, depth=1, mlp_dim=64)
        c.model.embed_dim = 16
        c.optim.warmup_steps = 1
        c.log_every = 2
        c.checkpoint.every = 2
        c.evals = evals(max_images=16, captions=8, batch_size=16)
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
