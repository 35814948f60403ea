"""`make demo-blip`: tiny BLIP on vlm_shapes on a laptop CPU, then its table.

    python -m vlmjax.demos.blip --data_dir DATA_DIR --workdir WORKDIR

The chain (each run in WORKDIR/<name>, reused when complete, resumed when interrupted; the
commands are printed before they run, as vlmjax/demos/llava.py does):
  siglip_2000  configs/siglip/tiny.py:steps=2000 (the CNN image tower: the SigLIP tiny recipe;
               `--siglip_steps N` for another length, in WORKDIR/siglip_N; the LLaVA chain's is
               800 steps, and BLIP's captions name shapes less often from it, docs/experiments.md)
  blip         configs/blip/tiny.py from that run's image tower (ITC + ITM + LM)
Then it prints the run's final ITM, retrieval and captioning figures (metrics.jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from vlmjax.demos.blip2 import evaluations
from vlmjax.demos.llava import Run, build_shapes, train

CAPTION_KEYS = ("colour_acc", "shape_acc", "all_objects_named", "cider_d", "bleu4")


SIGLIP_STEPS = 2000


def chain(blip_args: str = "", siglip_steps: int = SIGLIP_STEPS) -> list[Run]:
    siglip = f"siglip_{siglip_steps}"
    return [Run(siglip, f"configs/siglip/tiny.py:steps={siglip_steps}", sets_data_dir=True),
            Run("blip", f"configs/blip/tiny.py:vision_init={{workdir}}/{siglip}{blip_args}",
                sets_data_dir=True)]


def table(metrics: dict) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    for split in ("validation", "test"):
        for key in ("accuracy", "accuracy_positive", "accuracy_hard_negative"):
            rows.append(f"| itm {split} {key} | {_fmt(metrics.get(f'itm/itm_{split}/{key}'))} |")
    for key in ("i2t_r1", "i2t_r1_rerank", "t2i_r1", "t2i_r1_rerank"):
        rows.append(f"| retrieval test {key} | "
                    f"{_fmt(metrics.get(f'retrieval/retrieval_test/{key}'))} |")
    for key in CAPTION_KEYS:
        value = metrics.get(f"captioning/captioning_test/{key}")
        rows.append(f"| captions test {key} | "
                    f"{_fmt(value, percent=key != 'cider_d')} |")
    return "\n".join(rows)


def _fmt(value, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmjax.demos.blip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    p.add_argument("--workdir", required=True, help="one subdirectory per run")
    p.add_argument("--blip_args", default="", help="extra presets for the BLIP run, e.g. "
                                                   "',steps=100'")
    p.add_argument("--siglip_steps", type=int, default=SIGLIP_STEPS,
                   help="steps of the SigLIP run whose image tower BLIP starts from")
    args = p.parse_args(argv)
    data_dir, workdir = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    build_shapes(data_dir)
    for run in chain(args.blip_args, args.siglip_steps):
        train(run, data_dir, workdir)
    blip = os.path.join(workdir, "blip")
    print(f"\nBLIP tiny ({blip}): final evaluations (recipe chosen on validation)\n")
    print(table(evaluations(blip)))
    print(f"\nchain wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
