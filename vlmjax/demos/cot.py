"""`make demo-cot`: the tiny LLaVA-CoT chain on a laptop CPU, then the inference-time search
measurement.

    python -m vlmjax.demos.cot --data_dir DATA_DIR --workdir WORKDIR [--questions 500]

  1. the LLaVA chain of `make demo-llava` (vlmjax/demos/llava.py) in WORKDIR, each complete run
     reused;
  2. the CoT kinds of vlm_shapes' train split (`python -m vlmjax.data.export llava
     WORKDIR/llava_cot --kinds cot,cot_judge`), kept once complete;
  3. cot       configs/llava_cot/tiny.py from WORKDIR/stage2 (its evaluations: greedy CoT
               accuracy, format validity and judge accuracy on validation and test);
  4. benchmarks/cot_search.py on the test split, writing WORKDIR/cot_search.json and printing
     the table (greedy, stage_beam at 1-4 beams, best_of_n, sentence_beam; judged by the
     model's judge prompt and by the candidates' log-probability).
Every step prints the command it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from vlmjax.demos import llava as llava_demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_cot(data_dir: str, workdir: str) -> str:
    out = os.path.join(workdir, "llava_cot")
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        print(f"reusing {out} (complete)")
        return out
    llava_demo._run([sys.executable, "-m", "vlmjax.data.export", "llava", out, "--data_dir",
                     data_dir, "--kinds", "cot,cot_judge"])
    open(marker, "w").close()
    return out


def cot_run(data_dir: str, workdir: str, extra: str = "") -> llava_demo.Run:
    return llava_demo.Run("cot", f"configs/llava_cot/tiny.py:shapes_dir={data_dir},"
                                 f"llava_dir={workdir}/llava_cot,llava={workdir}/stage2{extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmjax.demos.cot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    p.add_argument("--workdir", required=True, help="one subdirectory per run of the chain")
    p.add_argument("--cot_args", default="",
                   help="extra presets for the CoT SFT, e.g. ',steps=50'")
    p.add_argument("--questions", type=int, default=500, help="test questions searched")
    args = p.parse_args(argv)
    data_dir, workdir = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    llava_demo.build_data(data_dir, workdir)
    for run in llava_demo.chain():
        llava_demo.train(run, data_dir, workdir)
    export_cot(data_dir, workdir)
    llava_demo.train(cot_run(data_dir, workdir, args.cot_args), data_dir, workdir)
    llava_demo._run([sys.executable, os.path.join(REPO, "benchmarks", "cot_search.py"),
                     "--workdir", os.path.join(workdir, "cot"), "--data_dir", data_dir,
                     "--out", os.path.join(workdir, "cot_search.json"),
                     "--questions", str(args.questions)])
    print(f"\nchain wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
