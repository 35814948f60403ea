"""`make demo-fusion`: the tiny Flamingo-style chain on a laptop CPU, then its few-shot VQA table.

    python -m vlmjax.demos.fusion --data_dir DATA_DIR --workdir WORKDIR [--fusion_args ,steps=N]

The chain shares WORKDIR with `make demo-llava` (vlmjax/demos/llava.py): its SigLIP run (the
frozen image tower) and LM run (the frozen LM) are reused when complete, and trained otherwise.
Then:
  mmc4_shapes  `python -m vlmjax.data.export mmc4`: vlm_shapes' train split as interleaved
               few-shot documents (kept once complete)
  fusion       configs/fusion/tiny.py from siglip's image tower and lm's LM: the resampler, the
               gated cross-attention and the two added tokens trained, the rest frozen
It prints the final VQA exact match per question type at 0, 2 and 4 shots on validation and test
(the trainer's evaluations, from WORKDIR/fusion/metrics.jsonl) and the chain's wall time.
Every step shells out to the command a user would type (printed before it runs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from vlmjax.demos.blip2 import evaluations
from vlmjax.demos.llava import QA_TYPES, Run, _run, build_shapes, chain as llava_chain, train

SHOTS = (0, 2, 4)


def chain(fusion_args: str = "") -> list[Run]:
    parts = [run for run in llava_chain() if run.name in ("siglip", "lm")]
    return parts + [Run("fusion", "configs/fusion/tiny.py:shapes_dir={data_dir},"
                                  "mmc4_dir={workdir}/mmc4_shapes,vision_init={workdir}/siglip,"
                                  f"llm_init={{workdir}}/lm{fusion_args}")]


def export_mmc4(data_dir: str, workdir: str) -> None:
    out = os.path.join(workdir, "mmc4_shapes")
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        print(f"reusing {out} (complete)")
        return
    _run([sys.executable, "-m", "vlmjax.data.export", "mmc4", out, "--data_dir", data_dir])
    open(marker, "w").close()


def vqa_table(metrics: dict, splits=("validation", "test")) -> str:
    """Markdown: one row per split and shot count, exact match overall and per question type."""
    head = "| split | shots | exact match | " + " | ".join(QA_TYPES) + " |"
    rows = [head, "|" + " --- |" * (len(QA_TYPES) + 3)]
    for split in splits:
        for shots in SHOTS:
            prefix = f"vqa/{split}/{shots}shot/"
            if prefix + "exact_match" not in metrics:
                continue
            cells = [metrics[prefix + "exact_match"]] + [metrics.get(prefix + t)
                                                        for t in QA_TYPES]
            rows.append(f"| {split} | {shots} | " + " | ".join(
                "-" if v is None else f"{100 * v:.1f}%" for v in cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmjax.demos.fusion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    p.add_argument("--workdir", required=True, help="one subdirectory per run of the chain "
                                                    "(shared with make demo-llava)")
    p.add_argument("--fusion_args", default="", help="extra presets for the fusion run, e.g. "
                                                     "',steps=500'")
    args = p.parse_args(argv)
    data_dir, workdir = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    build_shapes(data_dir)
    export_mmc4(data_dir, workdir)
    for run in chain(args.fusion_args):
        train(run, data_dir, workdir)
    fusion = os.path.join(workdir, "fusion")
    print(f"\nFusion tiny ({fusion}): VQA exact match with k in-context examples from train "
          "(200 images per split; recipe chosen on validation)\n")
    print(vqa_table(evaluations(fusion)))
    print(f"\nchain wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
