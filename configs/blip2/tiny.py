"""Tiny BLIP-2 on vlm_shapes: a Q-Former between the frozen tiny SigLIP CNN and the frozen tiny
LM, in BLIP-2's two stages, on a laptop CPU.

    # the frozen parts (the SigLIP and LM demos' runs) and the LLaVA JSON export of vlm_shapes
    python -m vlmjax.train --config configs/siglip/tiny.py --workdir /tmp/siglip \
        --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.train --config configs/lm/tiny.py:steps=200,scenes=True \
        --workdir /tmp/lm_tiny --config.data.data_dir=/tmp/vlm_shapes
    python -m vlmjax.data.export llava /tmp/llava_shapes --data_dir /tmp/vlm_shapes
    # stage 1: ITC + ITM + ITG on the frozen CNN
    python -m vlmjax.train --workdir /tmp/blip2_s1 --config configs/blip2/tiny.py:stage=1,\
shapes_dir=/tmp/vlm_shapes,vision_init=/tmp/siglip
    # stage 2: the Q-Former's queries as a soft prompt of the frozen LM, on captions
    python -m vlmjax.train --workdir /tmp/blip2_s2 --config configs/blip2/tiny.py:stage=2,\
shapes_dir=/tmp/vlm_shapes,llava_dir=/tmp/llava_shapes,stage1=/tmp/blip2_s1,llm_init=/tmp/lm_tiny
    python -m vlmjax.train --config configs/blip2/tiny.py:runlocal,stage=1 ...   # seconds

The model: the CNN image tower of configs/siglip/tiny.py (its last 4x4 feature map at 64 px: 16
visual tokens of 96 channels; frozen), ln_vision, and a Q-Former of `queries` learned queries
(default 8), width 96, 2 layers, cross-attention in every layer (cross_attention_freq 1; BLIP-2's
is 2 of 12 layers), text kernels with variance 1/fan_in (BERT's 0.02 at this width leaves the
cross-attention at ~1% of the residual, as the BLIP tiny recipe found). Stage 1: ITC + ITM + ITG
with equal weights, ITG label smoothing 0.1 (BLIP-2), ITM negatives drawn at temperature 0.2 (as
the BLIP tiny recipe); captions `[CLS] caption [SEP]` with the vlm_shapes tokenizer + the LM
demo's special tokens ([DEC] among them). Stage 2: the stage-1 Q-Former (its text parts dropped)
+ a new language projection in front of the LM of configs/lm/tiny.py (trained with scenes=True:
a caption, then its questions answered), only the projector trained, on the captions of the
LLaVA export (template plain: the 8 query tokens, then the caption). Evaluations on vlm_shapes:
stage 1 retrieval (ITC and ITM re-ranking) and ITM on validation (where recipes are chosen) and
test; stage 2 captioning (the prompt is the image alone) and zero-shot VQA ("Q: {question} A:",
the question form of the LM's training text, BLIP-2's being "Question: {question} Answer:";
answers cut at the next "Q:", as BLIP-2 stops OPT at a newline).
Presets: stage=1|2, shapes_dir, llava_dir, tokenizer (default: the 64px one of shapes_dir),
vision_init (stage 1: a SigLIP workdir), stage1 (stage 2: a stage-1 workdir), llm_init (stage 2:
an lm workdir), steps, batch, lr, queries, width, itm_t, train_llm (stage 2: also train the LLM,
a diagnostic, not BLIP-2), runlocal (a few steps of a tiny model
on a tiny build, for tests).
"""
import ml_collections

from vlmjax.config import ConfigError, parse_preset_args
from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS

from vlmjax.data.shapes_instruct import SHORT_ANSWER_INSTRUCTION

from configs.llava.tiny import (RUNLOCAL_SIZES, llava_json,  # noqa: E402
                                tokenizer_path)

VISION = dict(channels=(32, 64, 96), patch_size=2)
LLM = dict(vocab_size=512, width=128, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
           rope_theta=10_000.0, tie_embeddings=True)
# The LLaVA chain's stage-2 mixture as it was when BLIP-2 tiny's instruction tuning was measured
# (configs/llava/tiny.py has since raised VQA to 8 and added colour/shape questions).
INSTRUCT_DATA = {"conversation": 1.0, "detailed_description": 1.0, "complex_reasoning": 1.0,
                 "vqa": 4.0}
QUESTION_FORMAT = "Q: {question} A:"
ANSWER_STOP = "Q:"  # the LM goes on to a next question, as OPT goes on past BLIP-2's newline


def shapes_data(shapes_dir: str, split: str, sizes: dict) -> dict:
    return dict(source="vlm_shapes", split=split, config="64px", data_dir=shapes_dir, **sizes)


def stage1_evals(shapes_dir, sizes, max_images, batch_size) -> dict:
    out = {}
    for split in ("validation", "test"):
        data = shapes_data(shapes_dir, split, sizes)
        out[f"itm_{split}"] = dict(type="itm", data=data, max_images=max_images,
                                   batch_size=batch_size)
        out[f"retrieval_{split}"] = dict(type="retrieval", data=data, max_images=max_images,
                                         rerank_k=8, batch_size=batch_size)
    return out


def stage2_evals(shapes_dir, sizes, max_examples, batch_size, max_new_tokens=None,
                 instruct=False) -> dict:
    """Captions and VQA on validation and test: zero-shot (BLIP-2's prompts) after caption
    training, the LLaVA chain's instructions after instruction tuning."""
    limits = dict(batch_size=batch_size, max_examples=max_examples)
    if max_new_tokens:
        limits["max_new_tokens"] = max_new_tokens
    asked = (dict(answer_instruction=SHORT_ANSWER_INSTRUCTION) if instruct else
             dict(question_format=QUESTION_FORMAT, answer_stop=ANSWER_STOP))
    out = {}
    for split in ("validation", "test"):
        data = shapes_data(shapes_dir, split, sizes)
        out[f"{split}_captions"] = dict(type="captioning", data=data,
                                        **({} if instruct else {"prompt": ""}), **limits)
        out[f"{split}_vqa"] = dict(type="vqa", data=data, **asked, **limits)
    return out


def qformer(args, width: int, text: bool) -> dict:
    q = dict(num_query_tokens=args.queries, width=width, depth=2, num_heads=4,
             mlp_dim=4 * width, cross_attention_freq=1, max_len=32, init_scheme="fan_in")
    if text:
        q.update(vocab_size=512, text_input=True)
    return q


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, stage=1, shapes_dir="/tmp/vlm_shapes",
                             llava_dir="/tmp/llava_shapes", tokenizer="", vision_init="",
                             stage1="", llm_init="", steps=0, batch=0, lr=0.0, queries=8,
                             width=96, itm_t=0.2, train_llm=False, data="caption")
    if args.stage not in (1, 2):
        raise ConfigError(f"preset stage={args.stage!r} must be 1 or 2")
    if args.data not in ("caption", "instruct"):
        raise ConfigError(f"preset data={args.data!r} must be 'caption' or 'instruct'")
    instruct = args.data == "instruct"
    sizes = RUNLOCAL_SIZES if args.runlocal else {}
    width = 32 if args.runlocal else args.width
    vision = dict(VISION, channels=(8, 16)) if args.runlocal else dict(VISION)
    tokenizer = args.tokenizer or tokenizer_path(args.shapes_dir, sizes)
    c = ml_collections.ConfigDict()
    c.task = "blip2"
    c.seed = 0
    c.stage = args.stage
    if args.stage == 1:
        c.total_steps = args.steps or 1500
        c.model = dict(vision_arch="cnn", vision=vision, vision_feature_layer=-1,
                       vision_feature_select_strategy="full", projector_norm="layernorm",
                       qformer=qformer(args, width, text=True), embed_dim=64,
                       temperature_init=0.07, dtype="float32")
        c.model_init = {"vision": args.vision_init} if args.vision_init else ""
        c.loss = dict(itc=1.0, itm=1.0, lm=1.0, label_smoothing=0.1, itm_temperature=args.itm_t)
        c.data = shapes_data(args.shapes_dir, "train", sizes)
        c.input = dict(global_batch_size=args.batch or 64, image_size=64,
                       preprocess="caption_random|resize_crop|flip_caption_aware|value_range",
                       crop_area_min=0.3, shuffle_buffer=10_000, seed=0,
                       tokenizer=args.tokenizer or "vlm_shapes",
                       special_tokens=list(VLM_SHAPES_LM_TOKENS), max_text_len=32,
                       add_bos=True, eos="sticky", prefetch_batches=4)
        c.optim = dict(name="adamw", lr=args.lr or 1e-3, schedule="cosine", warmup_steps=100,
                       end_lr=1e-5, weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0)
        c.evals = stage1_evals(args.shapes_dir, sizes, max_images=500, batch_size=128)
    else:
        c.total_steps = args.steps or 600
        c.model = dict(vision_arch="cnn", vision=vision, llm=dict(LLM), image_token_id=4,
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       projector="qformer", projector_norm="layernorm",
                       qformer=qformer(args, width, text=False), prefix_attention="causal",
                       dtype="float32")
        if args.train_llm:
            c.train_llm = True
        parts = {"stage1": args.stage1, "llm": args.llm_init}
        c.model_init = {k: v for k, v in parts.items() if v} or ""
        c.loss = dict(chunk_size=128, z_loss=0.0, label_smoothing=0.0)
        if instruct:  # the LLaVA chain's stage-2 kinds, ChatML
            c.data = dict(source="mixture", sources={
                kind: llava_json(args.llava_dir, kind, weight=weight)
                for kind, weight in INSTRUCT_DATA.items()})
        else:
            c.data = llava_json(args.llava_dir, "caption")
        c.input = dict(global_batch_size=args.batch or (16 if instruct else 32), image_size=64,
                       preprocess="resize|value_range", max_len=256 if instruct else 96,
                       pack=True, images_per_row=3, template="chatml" if instruct else "plain",
                       tokenizer=tokenizer, special_tokens=list(VLM_SHAPES_LM_TOKENS),
                       shuffle_buffer=10_000, seed=0, prefetch_batches=4)
        c.optim = dict(name="adamw", lr=args.lr or 1e-3, schedule="cosine", warmup_steps=50,
                       end_lr=1e-5, weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0)
        c.evals = stage2_evals(args.shapes_dir, sizes, max_examples=500, batch_size=64,
                               instruct=instruct)
    c.data_shards = 0  # input streams; 0 = the process count of the first run (see README)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.log_every = 50
    c.checkpoint = dict(every=500, keep=2)
    c.nonfinite = "skip"
    c.peak_flops = 0.0
    if args.runlocal:
        c.total_steps = args.steps or 4
        c.input.update(global_batch_size=8, image_size=32, shuffle_buffer=64)
        if args.stage == 1:
            c.model.embed_dim = 16
            c.evals = stage1_evals(args.shapes_dir, sizes, max_images=8, batch_size=8)
        else:
            c.model.llm.update(width=32, depth=1, mlp_dim=64)
            c.input.max_len = 64
            c.evals = stage2_evals(args.shapes_dir, sizes, max_examples=8, batch_size=8,
                                   max_new_tokens=8, instruct=instruct)
        c.model.qformer.update(num_query_tokens=4, mlp_dim=64)
        c.optim.warmup_steps = 1
        c.log_every = 2
        c.checkpoint.every = 2
        c.peak_flops = 1e11  # skip the matmul measurement
    return c
