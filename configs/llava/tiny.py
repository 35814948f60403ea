"""Tiny LLaVA on vlm_shapes: the tiny SigLIP CNN + the tiny LM, joined by an MLP projector, in
LLaVA's two stages, on a laptop CPU. `make demo-llava` runs the whole chain
(vlmjax/demos/llava.py); by hand:

    # 1. the parts (vlm_shapes in /tmp/vlm_shapes), and the LLaVA JSON of vlm_shapes' train split
    python -m vlmjax.train --config configs/siglip/tiny.py:steps=800 --workdir /tmp/siglip \
        --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.train --config configs/lm/tiny.py:steps=200,scenes=True \
        --workdir /tmp/lm_tiny --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.data.export llava /tmp/llava_shapes --data_dir /tmp/vlm_shapes
    # 2. stage 1: the projector alone, on image -> caption (template plain)
    python -m vlmjax.train --workdir /tmp/llava_s1 --config configs/llava/tiny.py:stage=1,\
shapes_dir=/tmp/vlm_shapes,llava_dir=/tmp/llava_shapes,vision_init=/tmp/siglip,\
llm_init=/tmp/lm_tiny
    # 3. the shape warm-up: stage 2's trainables on shape questions alone (300 steps; in the
    #    mixture shape is never learnt, learnt first the mixture keeps it)
    python -m vlmjax.train --workdir /tmp/llava_shape --config configs/llava/tiny.py:stage=2,\
shapes_dir=/tmp/vlm_shapes,llava_dir=/tmp/llava_shapes,stage1=/tmp/llava_s1,train_vision=True,\
vqa_only=shape,steps=300
    # 4. stage 2: projector + LLM (+ vision), from the warm-up, on the instruction kinds (chatml)
    python -m vlmjax.train --workdir /tmp/llava_s2 --config configs/llava/tiny.py:stage=2,\
shapes_dir=/tmp/vlm_shapes,llava_dir=/tmp/llava_shapes,stage1=/tmp/llava_shape,train_vision=True
    python -m vlmjax.train --config configs/llava/tiny.py:runlocal,llava_dir=D,shapes_dir=S ...

The model: the CNN image tower of configs/siglip/tiny.py (vision_arch 'cnn': 3 conv stages of
32/64/96 channels; its last 4x4 feature map at 64 px is 16 visual tokens, vision_feature_layer
-1, strategy 'full'). The tiny ViT of `:image=vit` learns colour but not shape (18% zero-shot
top-1 after 500 steps here, against 86% for the CNN after 800), so a LLaVA on it could not answer
shape questions. Projector mlp2x_gelu with a learned vector per visual token position
(projector_posemb: a CNN's tokens do not say where they are; it doubled position accuracy, see
docs/experiments.md); the LLM of configs/lm/tiny.py (width 128, 4 layers, GQA, tied
embeddings, vocabulary 512) trained with `scenes=True` (documents that answer questions from a
caption before them). Its tokenizer (the vlm_shapes SentencePiece model +
tokenizers.VLM_SHAPES_LM_TOKENS; <image> is id 4) is read from shapes_dir.
Stage 1 trains the projector on `train_caption.json` with the plain template (the image tokens,
then the caption); stage 2 the projector and the LLM (and with train_vision=True the tower) on
a mixture of conversation, detailed description, complex reasoning (weight 1 each) and
short-answer VQA (weight 8: LLaVA-1.5's "Answer the question using a single word or phrase."
questions, one per entry; ChatML, whose markers are tokens of the LM's tokenizer), plus the
short-answer colour and shape questions once more (weight 8). The VQA evaluator asks with the
same instruction.
Rows are packed (input.pack): stage 1 rows of 128 tokens (3 images a row, about 3 captions),
stage 2 rows of 384 (5 images a row; a short-answer VQA sample is ~90 tokens: the vlm_shapes
tokenizer spells the instruction in 29 pieces). AdamW, cosine, lr 1e-3; stage 1 300 steps of 32
rows, stage 2 1000 steps of 16 rows (validation: 400 steps 42.6%, 1000 47.6% with VQA at
weight 4 and no colour/shape source; 58.8% with this mixture; 60.3% after the chain's shape
warm-up, `vqa_only=shape,steps=300`, which `make demo-llava` runs between the stages).
Evaluations (at the end, on vlm_shapes validation, where recipes are chosen, test and
test_novel): stage 1 captioning (the colours, shapes and counts its descriptions name); stage 2
also VQA (exact match per question type). Measured: README, "LLaVA".
Presets: stage=1|2, shapes_dir (the vlm_shapes data_dir of the SigLIP and LM runs), llava_dir
(the export's OUT), tokenizer (default: shapes_dir's 64px one), vision_init, llm_init (their
workdirs; '' = random), stage1 (stage 2: a stage-1 workdir for the whole model), steps, batch
(rows), lr, vision_layer, train_vision, max_len, pack, posemb (projector_posemb, default
True), norm (projector_norm: none | instance), stage1_kind (stage 1's data: caption, the
default, or detailed_description), select=N (evaluate N validation images only, stage 1
captioning and stage 2 VQA, nothing else: the quick runs that choose a recipe), vqa (stage 2:
the short-answer VQA weight, default 8), hard (stage 2: the weight of a second VQA source that
holds only the questions of `hard_types`, '+'-separated, default colour+shape: the kinds the
model learns last; default 8, 0 = none; an entry `kind:w` is a source of its own at weight w),
vqa_only (stage 2 on the short-answer questions of these types alone, '+'-separated: the chain's
shape warm-up, `vqa_only=shape,steps=300`, between stage 1 and stage 2; checked on 100 validation
images), runlocal (a few steps of a tiny model on a tiny build, for tests).
"""
import os

import ml_collections

from vlmjax.config import ConfigError, parse_preset_args
from vlmjax.data import shapes
from vlmjax.data.shapes_instruct import SHORT_ANSWER_INSTRUCTION
from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS

# The kinds each stage trains on, with their mixture weights: stage 2 samples short-answer VQA
# most, the skill its evaluation measures (the other kinds keep the model able to chat).
STAGE_DATA = {1: {"caption": 1.0},
              2: {"conversation": 1.0, "detailed_description": 1.0, "complex_reasoning": 1.0,
                  "vqa": 8.0}}
# Stage 2 adds the short-answer colour and shape questions once more at this weight (`hard`):
# at the plain mixture's share (~10% of samples each) colour was never learnt within 1000 steps
# (docs/experiments.md, "Colour is learnt once enough colour questions reach the model").
HARD_WEIGHT, HARD_TYPES = 8.0, "colour+shape"
# The validation images a `vqa_only` warm-up is checked on at its end.
WARMUP_IMAGES = 100
# The tiny build of :runlocal (the same sizes as configs/lm/tiny.py:runlocal).
RUNLOCAL_SIZES = dict(train_size=64, eval_size=16, novel_size=8)


def tokenizer_path(shapes_dir: str, sizes: dict) -> str:
    """The vlm_shapes 64px SentencePiece model of the build in `shapes_dir`."""
    return os.path.join(shapes_dir, "vlm_shapes", shapes.config_name("64px", **sizes),
                        str(shapes.VlmShapes.VERSION), shapes.TOKENIZER_FILENAME)


def llava_json(llava_dir: str, kind: str, **extra) -> dict:
    return dict(source="llava_json", json_path=os.path.join(llava_dir, f"train_{kind}.json"),
                image_dir=os.path.join(llava_dir, "images"), **extra)


def hard_sources(llava_dir: str, weight: float, types: str) -> dict:
    """The short-answer questions of the kinds learnt last, once more: `types` '+'-separated;
    the plain entries share one source `vqa_hard` at `weight`, an entry `kind:w` is a source
    `vqa_{kind}` of its own at weight w (e.g. 'colour:4+shape:12' weights shape 3x colour)."""
    shared, own = [], {}
    for entry in filter(None, types.split("+")):
        kind, sep, own_weight = entry.partition(":")
        if not sep:
            shared.append(kind)
            continue
        try:
            own[kind] = float(own_weight)
        except ValueError:
            raise ConfigError(f"preset hard_types entry {entry!r}: 'kind' or 'kind:weight' "
                              "with a number weight, e.g. 'colour+shape' or 'colour:4+shape:12'")
    sources = {f"vqa_{kind}": llava_json(llava_dir, "vqa", weight=w, question_types=[kind])
               for kind, w in own.items() if w}
    if shared and weight:
        sources["vqa_hard"] = llava_json(llava_dir, "vqa", weight=weight,
                                         question_types=shared)
    return sources


def evals(stage: int, shapes_dir: str, sizes: dict, batch_size: int, max_examples: int,
          max_new_tokens: int | None = None, select: bool = False) -> dict:
    """The final evaluations; `select`: validation alone (stage 1 its captions, stage 2 its
    VQA: choosing a recipe reads nothing else)."""
    def data(split):
        return dict(source="vlm_shapes", split=split, config="64px", data_dir=shapes_dir,
                    **sizes)
    limits = dict(batch_size=batch_size, max_examples=max_examples)
    if max_new_tokens:
        limits["max_new_tokens"] = max_new_tokens
    out = {}
    if select and stage == 1:
        return {"validation_captions": dict(type="captioning", data=data("validation"),
                                            **limits)}
    if select:
        return {"validation_vqa": dict(type="vqa", data=data("validation"), **limits,
                                       answer_instruction=SHORT_ANSWER_INSTRUCTION)}
    for split in ("validation", "test", "test_novel"):
        if split != "test_novel":
            out[f"{split}_captions"] = dict(type="captioning", data=data(split), **limits)
        if stage == 2:  # stage 1's plain template has no question to answer
            out[f"{split}_vqa"] = dict(type="vqa", data=data(split), **limits,
                                       answer_instruction=SHORT_ANSWER_INSTRUCTION)
    return out


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, stage=1, shapes_dir="/tmp/vlm_shapes",
                             llava_dir="/tmp/llava_shapes", tokenizer="", vision_init="",
                             llm_init="", stage1="", steps=0, batch=0, lr=0.0,
                             vision_layer=-1, train_vision=False, max_len=0, pack=True,
                             posemb=True, norm="none", select=0, stage1_kind="caption",
                             vqa=0.0, hard=HARD_WEIGHT, hard_types=HARD_TYPES, vqa_only="")
    if args.stage not in STAGE_DATA:
        raise ConfigError(f"preset stage={args.stage!r} must be 1 or 2")
    if args.stage1 and (args.stage != 2 or args.vision_init or args.llm_init):
        raise ConfigError("preset stage1=WORKDIR starts stage 2 from a stage-1 run (the whole "
                          "model): use it with stage=2 and without vision_init / llm_init")
    sizes = RUNLOCAL_SIZES if args.runlocal else {}
    c = ml_collections.ConfigDict()
    c.task = "llava"
    c.seed = 0
    c.stage = args.stage
    if args.train_vision:
        c.train_vision = True
    c.total_steps = args.steps or (300 if args.stage == 1 else 1000)
    c.model = dict(
        vision_arch="cnn", vision=dict(channels=(32, 64, 96), patch_size=2),
        llm=dict(vocab_size=512, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                 rope_theta=10_000.0, tie_embeddings=True),
        image_token_id=4, vision_feature_layer=args.vision_layer,
        vision_feature_select_strategy="full",
        projector="mlp2x_gelu", projector_bias=True, projector_posemb=args.posemb,
        projector_norm=args.norm,
        prefix_attention="causal",
        dtype="float32")
    if args.stage1:
        c.model_init = args.stage1
    else:
        parts = {"vision": args.vision_init, "llm": args.llm_init}
        c.model_init = {k: v for k, v in parts.items() if v} or ""
    c.loss = dict(chunk_size=128, z_loss=0.0, label_smoothing=0.0)
    kinds = STAGE_DATA[args.stage]
    if args.stage == 1:
        if args.stage1_kind not in ("caption", "detailed_description"):
            raise ConfigError(f"preset stage1_kind={args.stage1_kind!r}: 'caption' or "
                              "'detailed_description'")
        kinds = {args.stage1_kind: 1.0}
    sources = {kind: llava_json(args.llava_dir, kind, weight=weight)
               for kind, weight in kinds.items()}
    if args.vqa_only:  # the warm-up on one skill: those short-answer questions, nothing else
        if args.stage != 2:
            raise ConfigError(f"preset vqa_only={args.vqa_only!r} is a stage-2 preset: use it "
                              "with stage=2")
        sources = {"vqa": llava_json(args.llava_dir, "vqa",
                                     question_types=args.vqa_only.split("+"))}
    elif args.stage == 2:
        if args.vqa:
            sources["vqa"]["weight"] = args.vqa
        sources.update(hard_sources(args.llava_dir, args.hard, args.hard_types))
    if len(sources) == 1:
        c.data = {k: v for k, v in next(iter(sources.values())).items() if k != "weight"}
    else:
        c.data = dict(source="mixture", sources=sources)
    c.input = dict(global_batch_size=args.batch or (32 if args.stage == 1 else 16),
                   image_size=64, preprocess="resize|value_range",
                   max_len=args.max_len or (384 if args.stage == 2 else
                                            256 if args.stage1_kind != "caption" else 128),
                   pack=args.pack, images_per_row=3 if args.stage == 1 else 5,
                   template="plain" if args.stage == 1 else "chatml",
                   tokenizer=args.tokenizer or tokenizer_path(args.shapes_dir, sizes),
                   special_tokens=list(VLM_SHAPES_LM_TOKENS), shuffle_buffer=10_000, seed=0,
                   prefetch_batches=4)
    c.optim = dict(name="adamw", lr=args.lr or 1e-3,
                   schedule="cosine", warmup_steps=50, end_lr=1e-5, weight_decay=0.0, b1=0.9,
                   b2=0.95, clip_norm=1.0)
    # A warm-up is judged by the stage 2 that follows it: its own check is validation VQA on
    # WARMUP_IMAGES images.
    select = args.select or (WARMUP_IMAGES if args.vqa_only else 0)
    c.evals = evals(args.stage, args.shapes_dir, sizes, batch_size=64,
                    max_examples=select or 500, select=bool(select))
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = args.steps or 4
        # The towers of siglip/tiny.py:runlocal,image=vit (with 2 blocks) and lm/tiny.py:runlocal.
        c.model.vision.update(channels=(8, 16))
        c.model.llm.update(width=32, depth=1, mlp_dim=64)
        c.input.update(global_batch_size=8, image_size=32, shuffle_buffer=64,
                       max_len=64 if args.stage == 1 else 192)
        c.optim.warmup_steps = 1
        c.log_every = 2
        c.checkpoint.every = 2
        c.evals = evals(args.stage, args.shapes_dir, sizes, batch_size=8, max_examples=8,
                        max_new_tokens=8)
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
