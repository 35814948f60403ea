"""`make demo-blip2`: the tiny BLIP-2 chain on a laptop CPU, then its tables and loss curves.

    python -m vlmjax.demos.blip2 --data_dir DATA_DIR --workdir WORKDIR

The chain shares WORKDIR with `make demo-llava` (vlmjax/demos/llava.py): its vlm_shapes export
(WORKDIR/llava_shapes), SigLIP run (the frozen image tower) and LM run (the frozen LLM) are
reused when complete, and built otherwise. Then, each in its own WORKDIR/<name>:
  blip2_stage1  configs/blip2/tiny.py:stage=1 on the frozen SigLIP CNN (ITC + ITM + ITG)
  blip2_stage2  configs/blip2/tiny.py:stage=2 from blip2_stage1 and the LM: the Q-Former's
                queries as a soft prompt of the frozen LM, trained on captions alone
It prints stage 1's retrieval and ITM on validation and test, stage 2's caption attribute
accuracy and zero-shot VQA exact match per question type (the trainer's final evaluations, from
each run's metrics.jsonl), and draws the three stage-1 losses into
WORKDIR/blip2_stage1/plots/losses.png (`python -m vlmjax.plot`).
Every step shells out to the command a user would type (printed before it runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from vlmjax.demos.llava import QA_TYPES, Run, build_data, chain as llava_chain, train
from vlmjax.train.metrics import read_jsonl

STAGE1_LOSSES = ("train/loss_itc", "train/loss_itm", "train/loss_lm")
CAPTION_KEYS = ("colour_acc", "shape_acc", "count_acc", "object_precision")


def chain(stage1_args: str = "", stage2_args: str = "") -> list[Run]:
    parts = [run for run in llava_chain() if run.name in ("siglip", "lm")]
    return parts + [
        Run("blip2_stage1", "configs/blip2/tiny.py:stage=1,shapes_dir={data_dir},"
                            f"vision_init={{workdir}}/siglip{stage1_args}"),
        Run("blip2_stage2", "configs/blip2/tiny.py:stage=2,shapes_dir={data_dir},"
                            "llava_dir={workdir}/llava_shapes,stage1={workdir}/blip2_stage1,"
                            f"llm_init={{workdir}}/lm{stage2_args}"),
    ]


def evaluations(workdir: str) -> dict:
    """Every evaluation metric of a run's metrics.jsonl (the last value of each)."""
    found = {}
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        found.update({k: v for k, v in record.items() if not k.startswith("train/")})
    return found


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def stage1_table(metrics: dict) -> str:
    head = "| split | ITM accuracy | i2t R@1 | i2t R@1 re-ranked | t2i R@1 | t2i R@1 re-ranked |"
    rows = [head, "|" + " --- |" * 6]
    for split in ("validation", "test"):
        r = f"retrieval/retrieval_{split}/"
        cells = [metrics.get(f"itm/itm_{split}/accuracy"), metrics.get(r + "i2t_r1"),
                 metrics.get(r + "i2t_r1_rerank"), metrics.get(r + "t2i_r1"),
                 metrics.get(r + "t2i_r1_rerank")]
        rows.append(f"| {split} | " + " | ".join(map(_pct, cells)) + " |")
    return "\n".join(rows)


def stage2_table(metrics: dict) -> str:
    head = ("| split | " + " | ".join(f"caption {k}" for k in CAPTION_KEYS)
            + " | VQA exact match | " + " | ".join(QA_TYPES) + " |")
    rows = [head, "|" + " --- |" * (len(CAPTION_KEYS) + len(QA_TYPES) + 2)]
    for split in ("validation", "test"):
        cells = [metrics.get(f"captioning/{split}_captions/{k}") for k in CAPTION_KEYS]
        cells += [metrics.get(f"vqa/{split}_vqa/exact_match")]
        cells += [metrics.get(f"vqa/{split}_vqa/{t}") for t in QA_TYPES]
        rows.append(f"| {split} | " + " | ".join(map(_pct, cells)) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmjax.demos.blip2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    p.add_argument("--workdir", required=True, help="one subdirectory per run of the chain "
                                                    "(shared with make demo-llava)")
    p.add_argument("--stage1_args", default="", help="extra presets for stage 1, e.g. ',steps=100'")
    p.add_argument("--stage2_args", default="", help="extra presets for stage 2")
    args = p.parse_args(argv)
    data_dir, workdir = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    build_data(data_dir, workdir)
    for run in chain(args.stage1_args, args.stage2_args):
        train(run, data_dir, workdir)
    stage1 = os.path.join(workdir, "blip2_stage1")
    print(f"\nBLIP-2 tiny, stage 1 ({stage1}): retrieval on 500 images per split (recipe chosen "
          "on validation)\n")
    print(stage1_table(evaluations(stage1)))
    stage2 = os.path.join(workdir, "blip2_stage2")
    print(f"\nBLIP-2 tiny, stage 2 ({stage2}): captions (attribute accuracy) and zero-shot VQA "
          "(trained on captions alone)\n")
    print(stage2_table(evaluations(stage2)))
    from vlmjax.plot import plot_together
    path = plot_together(stage1, STAGE1_LOSSES, os.path.join(stage1, "plots", "losses.png"),
                         title="BLIP-2 tiny, stage 1")
    print(f"\nstage-1 loss curves: {path}")
    print(f"chain wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
