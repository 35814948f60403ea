"""Tiny LLaVA-CoT on vlm_shapes: supervised fine-tuning of the LLaVA demo's stage-2 model on
four-stage answers to questions that need several steps, mixed with judge data (the same model
learns to pick the better of two texts for a stage), on a laptop CPU.

    # the LLaVA chain (make demo-llava) in W, then the CoT kinds of the train split
    python -m vlmjax.data.export llava W/llava_cot --data_dir D --kinds cot,cot_judge
    python -m vlmjax.train --workdir W/cot --config configs/llava_cot/tiny.py:shapes_dir=D,\
llava_dir=W/llava_cot,llava=W/stage2

The model and its tokenizer are configs/llava/tiny.py's (the stage tags <SUMMARY> ..
</CONCLUSION> are special tokens of the vlm_shapes LM tokenizer); `llava` is the LLaVA workdir
it starts from (all of it: vision, projector, LLM). Data: a mixture of `train_cot.json`
(shapes_cot: a question -> <SUMMARY><CAPTION><REASONING><CONCLUSION>) and
`train_cot_judge.json` (a judge prompt for one stage -> "Since ..., I choose response N.") at
`judge_ratio` (default 0.3 of the samples); chatml rows of 512 tokens, packed. The projector
and the LLM are trained (the tower frozen unless train_vision=True). Evaluations (vlmjax/evals/
cot.py): greedy accuracy of the CONCLUSION, per-stage format validity and judge accuracy on
held-out pairs, on validation (where recipes are chosen) and test.
Presets: shapes_dir (default data_dir), llava_dir (the cot export's OUT, default
workdir/llava_tiny/llava_cot), llava (the LLaVA workdir to start from, default
workdir/llava_tiny/stage2: `make demo-llava`'s defaults, paths from the repository root),
judge_ratio, steps (default 400), batch (rows, default 16), lr (default 5e-4),
train_vision, select=N (evaluate validation alone on N images), runlocal (a few steps of a tiny
model on a tiny build, for tests; with llava='' a random init).
"""
import os

from vlmjax.config import ConfigError, load_config, parse_preset_args


def get_config(arg=None):
    args = parse_preset_args(arg, runlocal=False, shapes_dir="data_dir",
                             llava_dir="workdir/llava_tiny/llava_cot",
                             llava="workdir/llava_tiny/stage2", judge_ratio=0.3, steps=0,
                             batch=0, lr=0.0, train_vision=False, select=0)
    if not 0.0 <= args.judge_ratio < 1.0:
        raise ConfigError(f"preset judge_ratio={args.judge_ratio!r} must be in [0, 1): the "
                          "share of judge samples in the mixture")
    if not args.llava and not args.runlocal:
        raise ConfigError("preset llava=WORKDIR is needed: the LLaVA (stage 2) workdir the "
                          "CoT fine-tuning starts from (make demo-llava's WORKDIR/stage2)")
    if args.runlocal and args.llava == "workdir/llava_tiny/stage2":
        args.llava = ""  # runlocal: a random init of the tiny model unless one is named
    here = os.path.dirname(os.path.abspath(__file__))
    base = (f"stage=2,shapes_dir={args.shapes_dir},llava_dir={args.llava_dir}"
            + (f",stage1={args.llava}" if args.llava else "")
            + (",train_vision=True" if args.train_vision else "")
            + (",runlocal" if args.runlocal else ""))
    c = load_config(os.path.join(here, "..", "llava", "tiny.py") + f":{base}")
    kinds = {"cot": 1.0 - args.judge_ratio, "cot_judge": args.judge_ratio}
    sources = {kind: dict(source="llava_json",
                          json_path=os.path.join(args.llava_dir, f"train_{kind}.json"),
                          image_dir=os.path.join(args.llava_dir, "images"), weight=weight)
               for kind, weight in kinds.items() if weight > 0}
    c.data = (dict(source="mixture", sources=sources) if len(sources) > 1
              else {k: v for k, v in next(iter(sources.values())).items() if k != "weight"})
    c.total_steps = args.steps or (4 if args.runlocal else 400)
    c.input.global_batch_size = args.batch or c.input.global_batch_size
    c.input.max_len = 256 if args.runlocal else 512
    c.input.images_per_row = 2
    c.optim.lr = args.lr or 5e-4
    data = lambda split: dict(source="vlm_shapes", split=split, config="64px",  # noqa: E731
                              data_dir=args.shapes_dir,
                              **(dict(train_size=64, eval_size=16, novel_size=8)
                                 if args.runlocal else {}))
    limits = dict(batch_size=8, max_examples=8, max_new_tokens=16) if args.runlocal else dict(
        batch_size=64, max_examples=args.select or 500, max_new_tokens=192)
    splits = ("validation",) if args.select or args.runlocal else ("validation", "test")
    c.evals = {f"{split}_cot": dict(type="cot", data=data(split), **limits) for split in splits}
    return c
