"""BLIP ViT-B/16 pre-training on the 14M set: the paper's recipe (Li et al. 2022, "BLIP:
Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding and
Generation", sec. 4.1 and the released configs/pretrain.yaml).

Run (a v4-64 / v5e-64 TPU slice or 4+ nodes of 8 GPUs; see README "Scaling up"):

    python -m vlmjax.train --config configs/blip/base_14m.py:data=gs://BUCKET/blip14m/{00000..01399}.tar,tokenizer=gs://BUCKET/bert-base-uncased/tokenizer.json,bert=gs://BUCKET/bert-base-uncased,tfds_dir=gs://BUCKET/tfds \
        --workdir gs://BUCKET/runs/blip_b16_14m

Data: the 14M pre-training set (COCO, Visual Genome, Conceptual Captions, SBU; ~14M image-text
pairs; BLIP trains on its CapFilt-bootstrapped version, `python -m vlmjax.data.capfilt`) as
webdataset shards. Text: bert-base-uncased's tokenizer.json with BLIP's [DEC] and [ENC] added
(ids 30522, 30523: vocab 30524), captions `[CLS] caption [SEP]` of at most 30 tokens; the text
transformer starts from bert-base-uncased (`bert=DIR`, an HF BERT directory; convert.hf_bert),
the ViT from ImageNet (`vit=SRC`, optional, e.g. an HF ViT-B/16 converted for vlmjax).
Settings, checked against the paper and configs/pretrain.yaml: ViT-B/16 at 224 px; batch 2880;
AdamW, weight decay 0.05; lr warmed up over 3000 steps to 3e-4, then decayed per epoch by 0.85
(the paper; the released config says 0.9) down to 1e-6; 20 epochs; ITC with momentum
distillation (momentum 0.995, queue 57600, alpha 0.4) + ITM on hard negatives + LM with label
smoothing 0.1; random crops of 20-100% of the image area and horizontal flips. Not reproduced:
BLIP's RandAugment (vlmjax has no RandAugment op) and its alpha ramp over the first 2 epochs.
Steps: 20 epochs x 14M / 2880 = 4861 steps per epoch, 97,220 in all.
Paper (not measured here): BLIP ViT-B on 14M images reaches COCO 5k retrieval TR@1 80.6 /
IR@1 63.1 after fine-tuning (Table 5) and COCO captioning CIDEr 127.8 (Table 7, 14M, fine-tuned
with the 'a picture of' prompt). This repository has not run this config at scale.

Evaluations (every 10k steps and at the end): ImageNet zero-shot and COCO 5k-test retrieval on
TFDS (coco also re-ranked by ITM over the ITC top 256, BLIP's k for COCO); tfds_dir=DIR.
`:runlocal` shrinks everything to a few CPU steps on vlm_shapes (tested).
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from vlmjax.config import load_config, parse_preset_args
from vlmjax.evals import presets as evals_presets

IMAGES_14M, BATCH, EPOCHS = 14_000_000, 2880, 20


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, data="", tokenizer="", bert="", vit="",
                             tfds_dir="", batch=BATCH)
    steps_per_epoch = IMAGES_14M // args.batch
    c = ml_collections.ConfigDict()
    c.task = "blip"
    c.seed = 0
    c.total_steps = EPOCHS * steps_per_epoch
    c.model = dict(
        image=dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                   posemb="learn", norm_eps=1e-6),
        text=dict(vocab_size=30_524, max_len=512, width=768, depth=12, num_heads=12,
                  mlp_dim=3072, norm_eps=1e-12, dropout=0.1, attention_dropout=0.1),
        embed_dim=256, share="all_but_self_attention", parts=("encoder", "decoder"),
        temperature_init=0.07, dtype="bfloat16")
    init = {"text": args.bert} if args.bert else {}
    c.model_init = dict(init, **({"image": args.vit} if args.vit else {}))
    c.loss = dict(itc=1.0, itm=1.0, lm=1.0, mlm=0.0, label_smoothing=0.1, momentum=0.995,
                  alpha=0.4, queue_size=57_600)
    c.data = dict(source="webdataset", split="train", paths=args.data or placeholder(str),
                  text_extension="txt", label_field=placeholder(str))
    c.input = dict(global_batch_size=args.batch, image_size=224,
                   preprocess="caption_first|inception_crop|flip_caption_aware|normalize_clip",
                   crop_area_min=0.2, shuffle_buffer=50_000, seed=0,
                   tokenizer=args.tokenizer or placeholder(str), special_tokens=["[DEC]", "[ENC]"],
                   max_text_len=30, add_bos=True, eos="sticky", prefetch_batches=4)
    c.optim = dict(name="adamw", lr=3e-4, schedule="step", warmup_steps=3000,
                   decay_every=steps_per_epoch, decay_rate=0.85, end_lr=1e-6, weight_decay=0.05,
                   b1=0.9, b2=0.999, clip_norm=0.0)
    c.evals = evals_presets.imagenet_and_coco(batch_size=512, every=10_000,
                                              data_dir=args.tfds_dir or None)
    c.evals.coco.rerank_k = 256
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 100
    c.checkpoint = dict(every=2_000, keep=3, keep_period=steps_per_epoch)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        here = os.path.dirname(os.path.abspath(__file__))
        # The tiny ViT and no swapped-caption negatives: BLIP's architecture and losses.
        tiny = load_config(os.path.join(here, "tiny.py") + ":runlocal,image=vit,swaps=0")
        for key in ("total_steps", "model", "data", "input", "evals", "log_every", "checkpoint",
                    "peak_flops"):
            c[key] = tiny[key]
        c.model_init = {}
        c.loss.queue_size = 2 * tiny.input.global_batch_size
        c.optim.update(warmup_steps=1, decay_every=2)
    return c
