"""BLIP-2 stage 1 with a frozen ViT-g/14: the paper's recipe (Li et al. 2023, "BLIP-2:
Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large Language Models",
sec. 3.4 "Pre-training settings", and LAVIS's configs where the paper is silent).

Run (a v4-128 / v5e-128 TPU slice or 8+ nodes of 8 GPUs; see README "Scaling up"):

    python -m vlmjax.train --config configs/blip2/stage1_vitg.py:data=gs://B/blip2_129m/{00000..12899}.tar,tokenizer=gs://B/bert-base-uncased/tokenizer.json,bert=gs://B/bert-base-uncased,vit=gs://B/eva_vit_g \
        --workdir gs://B/runs/blip2_stage1_vitg

Data: BLIP-2's 129M images (COCO, Visual Genome, CC3M, CC12M, SBU, 115M of LAION400M) as
webdataset shards; BLIP-2 captions the web images with CapFilt (10 BLIP-large captions per image,
the top two by CLIP ViT-L/14 similarity kept beside the web text; `python -m vlmjax.data.capfilt`
writes such shards). Text: bert-base-uncased's tokenizer.json with [DEC] added (id 30522: vocab
30523), captions `[CLS] caption [SEP]` of at most 32 tokens (LAVIS max_txt_len).
Model, checked against the paper: the frozen image encoder is EVA-CLIP's ViT-g/14 without its
last layer (width 1408, 39 blocks, 16 heads, MLP 6144, patch 14, 224 px: 257 tokens; `vit=SRC`,
a vlmjax source of its tower: HF's Blip2VisionModel layout, post-LayerNorm as ln_vision); the
Q-Former is BERT-base (width 768, 12 layers, 12 heads, MLP 3072, dropout 0.1) with 32 queries
and cross-attention every other layer, initialised from bert-base-uncased (`bert=DIR`, the query
FFNs copied from BERT's, convert.hf_bert.bert_into_qformer); ITC / ITM / ITG heads into a
256-d space; the frozen ViT computed in 16-bit (BLIP-2 converts its weights to fp16; here
model.vision_dtype bfloat16, like the rest of the model's compute; params stay float32).
Optimisation (paper): 250k steps, batch 1680 for ViT-g (2320 for ViT-L), AdamW b1 0.9, b2 0.98,
weight decay 0.05, cosine decay from a peak lr of 1e-4 after a linear warm-up of 2k steps; 224 px
random resized crops and horizontal flips. Not in the paper, from LAVIS's
blip2_pretrain_stage1.yaml: the minimum lr 1e-5 (LAVIS's 5000 warm-up steps and 10 epochs of
batch 100 x 16 GPUs differ from the paper; this config follows the paper).
Paper (not measured here): BLIP-2 ViT-g, fine-tuned, COCO 5k TR@1 85.4 / IR@1 68.3 (Table 5).
Evaluations (every 25k steps and at the end): COCO 5k-test retrieval on TFDS coco_captions with
ITM re-ranking of the ITC top 128 (BLIP-2's k for COCO); tfds_dir=DIR. `:runlocal` shrinks
everything to a few CPU steps on vlm_shapes (tested).
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import load_config, parse_preset_args
from vlmjax.evals import presets as evals_presets

BATCH, STEPS = 1680, 250_000


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, data="", tokenizer="", bert="", vit="",
                             tfds_dir="", batch=BATCH)
    c = ml_collections.ConfigDict()
    c.task = "blip2"
    c.seed = 0
    c.stage = 1
    c.total_steps = STEPS
    c.model = dict(
        vision_arch="vit",
        vision=dict(patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144,
                    posemb="learn", pool="none", class_token=True, norm_eps=1e-6),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_norm="layernorm",
        qformer=dict(num_query_tokens=32, width=768, depth=12, num_heads=12, mlp_dim=3072,
                     cross_attention_freq=2, vocab_size=30_523, max_len=512, dropout=0.1,
                     attention_dropout=0.1, text_input=True),
        embed_dim=256, temperature_init=0.07, dtype="bfloat16", vision_dtype="bfloat16")
    init = {"text": args.bert} if args.bert else {}
    c.model_init = dict(init, **({"vision": args.vit} if args.vit else {}))
    c.loss = dict(itc=1.0, itm=1.0, lm=1.0, label_smoothing=0.1, itm_temperature=0.0)
    c.data = dict(source="webdataset", split="train", paths=args.data or placeholder(str),
                  text_extension="txt", label_field=placeholder(str))
    c.input = dict(global_batch_size=args.batch, image_size=224,
                   preprocess="caption_random|inception_crop|flip_caption_aware|normalize_clip",
                   crop_area_min=0.5, shuffle_buffer=50_000, seed=0,
                   tokenizer=args.tokenizer or placeholder(str), special_tokens=["[DEC]"],
                   max_text_len=32, add_bos=True, eos="sticky", prefetch_batches=4)
    c.optim = dict(name="adamw", lr=1e-4, schedule="cosine", warmup_steps=2000, end_lr=1e-5,
                   weight_decay=0.05, b1=0.9, b2=0.98, clip_norm=0.0)
    coco = evals_presets.imagenet_and_coco(batch_size=512, every=25_000,
                                           data_dir=args.tfds_dir or None)["coco"]
    coco["rerank_k"] = 128
    c.evals = dict(coco=coco)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 100
    c.checkpoint = dict(every=5_000, keep=3)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        here = os.path.dirname(os.path.abspath(__file__))
        tiny = load_config(os.path.join(here, "tiny.py") + ":runlocal,stage=1")
        for key in ("total_steps", "model", "data", "input", "evals", "log_every", "checkpoint",
                    "peak_flops"):
            c[key] = tiny[key]
        c.model_init = {}
        c.optim.warmup_steps = 1
    return c
