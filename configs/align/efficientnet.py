"""ALIGN's published recipe (Jia et al. 2021, "Scaling Up Visual and Vision-Language
Representation Learning With Noisy Text Supervision"): EfficientNet-L2 + BERT-Large, on
vlm_shapes/noisy with ALIGN's filters (configs/align/tiny.py's data, evaluations and filters).

    python -m vlmjax.train --config configs/align/efficientnet.py --workdir DIR
    python -m vlmjax.train --config configs/align/efficientnet.py:runlocal --workdir /tmp/a
    python -m vlmjax.eval --workdir DIR --config.input.image_size=600   # the second resolution

Hardware: the paper trained on 1024 TPUv3 cores; at batch 16384 this needs a pod-scale slice
(mesh data=-1; shard the params with --config.mesh.fsdp=N). Not run at scale here: no
measured result. `:runlocal` trains 4 steps of a tiny EfficientNet + BERT on CPU (tested).
`:scan` (or --config.model.text.scan_layers=True) runs BERT's 24 layers as one nn.scan: compile
time flat in depth, the same weights stacked (`text_tower/bert/layer_scan`; model_init from an
HF AlignModel and export to one convert); XLA's FLOP count, and so MFU, then sees one layer.

From the paper (Section 5, as this repository's authors recall it; the text could not be
fetched to check): EfficientNet-L2 with global pooling and no top 1x1 conv, trained from
scratch at 289x289 (random crop after resizing to 346, random flip); BERT-Large pooled at
[CLS] with a linear projection to the image width (text_projection with bias; no image
projection); 64 wordpiece tokens (a 100k vocabulary); softmax temperature learnable, init 1.0
(HF's `temperature`: logits = cos / t, so temperature_init = 1 / 1.0 here); label smoothing 0.1;
LAMB, weight decay 1e-5, lr warmed up linearly to 1e-3 over 10k steps then linearly to zero at
1.2M steps; batch 16384 (16 pairs on each of 1024 cores).
Not the paper's, and why:
- optim adamw: vlmjax.train.optim has no LAMB (its per-layer trust ratio is what lets lr 1e-3
  train BERT-Large; lower lr if AdamW diverges). b1/b2/eps are LAMB's usual values.
- no label smoothing: losses.contrastive's softmax loss has none.
- embed_dim 1376 = round_filters(320, 4.3), EfficientNet-L2's pooled width: with no image
  projection the embedding is the image tower's width (640 is EfficientNet-B7's, HF's
  kakaobrain/align-base).
- the crop: inception_crop with area >= 0.7 ~ (289/346)^2 in place of resize-346 + random crop.
- the tokenizer and data: vlm_shapes (1000 ids) in place of ALIGN's 1.8B web pairs and its
  wordpiece vocabulary; vocab_size stays the paper's 100k.
- two resolutions: the trainer and its evaluators use one input.image_size, so this config
  trains and evaluates at 289 px; the convolutional tower runs at any size, so evaluate a
  checkpoint at another resolution with `python -m vlmjax.eval ... --config.input.image_size=600`
  (600 px is HF AlignVisionConfig's default image_size, EfficientNet-B7's native size; the paper's
  pretraining uses 289 px only).
- BatchNorm runs in inference form with fixed statistics (models/efficientnet.py): trained
  from scratch here each BN is an affine layer, not the batch-normalised network of the paper.
"""
import os

from vlmjax.config import load_config, parse_preset_args

# EfficientNet's B0 stages (HF AlignVisionConfig's lists), scaled by width / depth.
B0_STAGES = dict(kernel_sizes=[3, 3, 5, 3, 5, 5, 3], in_channels=[32, 16, 24, 40, 80, 112, 192],
                 out_channels=[16, 24, 40, 80, 112, 192, 320], strides=[1, 2, 2, 2, 1, 2, 1],
                 num_block_repeats=[1, 2, 2, 3, 3, 4, 1], expand_ratios=[1, 6, 6, 6, 6, 6, 6])
L2_SCALING = dict(width_coefficient=4.3, depth_coefficient=5.3)   # EfficientNet-L2
L2_WIDTH = 1376                                                   # round_filters(320, 4.3)
BERT_LARGE = dict(width=1024, depth=24, num_heads=16, mlp_dim=4096)
PAPER_VOCAB, PAPER_TEXT_LEN, PAPER_IMAGE_SIZE = 100_000, 64, 289


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, steps=1_200_000, batch=16_384, scan=False)
    here = os.path.dirname(os.path.abspath(__file__))
    # configs/align/tiny.py: vlm_shapes/noisy, ALIGN's filters, the vlm_shapes evaluations.
    c = load_config(os.path.join(here, "tiny.py") + (":runlocal" if args.runlocal else ""))
    c.total_steps = args.steps
    c.model = dict(
        image=dict(**B0_STAGES, **L2_SCALING, depthwise_padding=[], squeeze_expansion_ratio=0.25,
                   batch_norm_eps=1e-3, drop_connect_rate=0.2, activation="silu", pool="mean",
                   remat="full"),
        # Both towers recompute each block / layer in the backward (EfficientNet-L2's
        # activations at 289 px dominate memory); :runlocal keeps it, so the path is tested.
        text=dict(vocab_size=PAPER_VOCAB, max_len=PAPER_TEXT_LEN, **BERT_LARGE,
                  activation="gelu", norm_eps=1e-12, remat="full", scan_layers=args.scan),
        image_arch="efficientnet", text_arch="bert", embed_dim=L2_WIDTH,
        image_projection=False, text_projection=True, text_projection_bias=True,
        temperature_init=1.0, bias_init=None, dtype="bfloat16")
    c.loss = dict(name="clip")
    c.input.update(global_batch_size=args.batch, image_size=PAPER_IMAGE_SIZE,
                   preprocess="caption_random|inception_crop|flip_caption_aware|value_range",
                   crop_area_min=0.7, max_text_len=PAPER_TEXT_LEN, add_bos=True, eos="sticky",
                   shuffle_buffer=50_000)
    c.optim = dict(name="adamw", lr=1e-3, schedule="linear", warmup_steps=10_000, end_lr=0.0,
                   weight_decay=1e-5, b1=0.9, b2=0.999, eps=1e-6, clip_norm=0.0)
    c.log_every = 100
    c.checkpoint = dict(every=5_000, keep=3)
    if args.runlocal:  # a tiny EfficientNet (3 stages, 3 blocks) and a 1-layer BERT, 4 steps
        c.total_steps = 4
        c.model.image.update(width_coefficient=0.5, depth_coefficient=1.0,
                             kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24],
                             out_channels=[16, 24, 40], strides=[1, 2, 2],
                             num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6])
        c.model.text.update(vocab_size=1000, max_len=24, width=32, depth=1, num_heads=2,
                            mlp_dim=64)
        c.model.update(embed_dim=24, dtype="float32")  # round_filters(40, 0.5)
        c.input.update(global_batch_size=16, image_size=32, max_text_len=24, shuffle_buffer=64)
        c.optim.update(warmup_steps=1)
        c.log_every, c.checkpoint.every = 2, 2
    return c
