"""`make demo-llava`: the tiny LLaVA chain on a laptop CPU, then its VQA table and a few answers.

    python -m vlmjax.demos.llava --data_dir DATA_DIR --workdir WORKDIR

The chain (each run in its own WORKDIR/<name>; a run whose last checkpoint is its final step is
complete and reused, an interrupted one resumes, see `is_complete`):
  1. vlm_shapes (64px) built into DATA_DIR (kept if built), and its train split exported as
     LLaVA JSON + images into WORKDIR/llava_shapes
  2. siglip   configs/siglip/tiny.py:steps=800 (the CNN image tower; 1600 steps' worth of the
              demo recipe's zero-shot accuracy in 40% of the time)
  3. lm       configs/lm/tiny.py:steps=200,scenes=True (also documents that answer questions
              from a caption before them: the skill of reading facts from the context)
  4. stage1   configs/llava/tiny.py:stage=1 from siglip's image tower and lm's LLM
  5. shape    configs/llava/tiny.py:stage=2,train_vision=True,vqa_only=shape,steps=300 from
              stage1: a warm-up on shape questions alone (in the mixture shape is never learnt;
              learnt first, the mixture keeps it: docs/experiments.md, LLaVA)
  6. stage2   configs/llava/tiny.py:stage=2,train_vision=True from shape
Then it prints stage 2's final VQA exact match per question type on validation, test and
test_novel (the trainer's evaluations, from WORKDIR/stage2/metrics.jsonl), and the answers of
`python -m vlmjax.generate --image` to every question about a few test images.
Every step shells out to the same commands a user would type (printed before each runs), so a
failure names the command to rerun.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

QA_TYPES = ("colour", "shape", "count", "position", "existence", "comparison")
SPLITS = ("validation", "test", "test_novel")
NUM_SAMPLE_IMAGES = 8  # one question each
SHAPE_WARMUP = "vqa_only=shape,steps=300"  # the presets of the warm-up between the stages


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    config: str  # the --config argument, formatted with data_dir / workdir
    sets_data_dir: bool = False  # pass --config.data.data_dir (configs with a data_dir slot)


def chain(stage1_args: str = "", stage2_args: str = "") -> list[Run]:
    shapes = "shapes_dir={data_dir},llava_dir={workdir}/llava_shapes"
    return [
        Run("siglip", "configs/siglip/tiny.py:steps=800", sets_data_dir=True),
        Run("lm", "configs/lm/tiny.py:steps=200,scenes=True", sets_data_dir=True),
        Run("stage1", f"configs/llava/tiny.py:stage=1,{shapes},vision_init={{workdir}}/siglip,"
                      f"llm_init={{workdir}}/lm{stage1_args}"),
        Run("shape", f"configs/llava/tiny.py:stage=2,{shapes},stage1={{workdir}}/stage1,"
                     f"train_vision=True,{SHAPE_WARMUP}"),
        Run("stage2", f"configs/llava/tiny.py:stage=2,{shapes},stage1={{workdir}}/shape,"
                      f"train_vision=True{stage2_args}"),
    ]


def is_complete(workdir: str) -> bool:
    """Whether a trainer workdir holds the checkpoint of its config's last step (its final
    evaluations ran before that checkpoint was written)."""
    config_path = os.path.join(workdir, "config.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.isfile(config_path) and os.path.isdir(checkpoints)):
        return False
    with open(config_path) as file:
        total = int(json.load(file)["total_steps"])
    steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
    return total in steps


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def build_shapes(data_dir: str) -> None:
    """vlm_shapes (64px) built into data_dir (kept if built)."""
    _run([sys.executable, "-m", "vlmjax.data.build", "vlm_shapes", "--data_dir", data_dir])


def build_data(data_dir: str, workdir: str) -> None:
    build_shapes(data_dir)
    out = os.path.join(workdir, "llava_shapes")
    marker = os.path.join(out, ".complete")
    if os.path.exists(marker):
        print(f"reusing {out} (complete)")
        return
    _run([sys.executable, "-m", "vlmjax.data.export", "llava", out, "--data_dir", data_dir])
    open(marker, "w").close()


def train(run: Run, data_dir: str, workdir: str) -> None:
    out = os.path.join(workdir, run.name)
    if is_complete(out):
        print(f"reusing {out} (complete)")
        return
    command = [sys.executable, "-m", "vlmjax.train", "--workdir", out,
               "--config", run.config.format(data_dir=data_dir, workdir=workdir)]
    if run.sets_data_dir:
        command.append(f"--config.data.data_dir={data_dir}")
    _run(command)


def final_metrics(workdir: str) -> dict:
    """The last record of a run's metrics.jsonl that holds evaluation results."""
    found = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as file:
        for line in file:
            record = json.loads(line)
            if any(key.startswith("vqa/") for key in record):
                found = record
    if not found:
        raise ValueError(f"{workdir}/metrics.jsonl holds no vqa/ results: did the run finish?")
    return found


def vqa_table(metrics: dict) -> str:
    """Markdown table: one row per split, exact match overall and per question type."""
    head = "| split | exact match | " + " | ".join(QA_TYPES) + " |"
    rows = [head, "|" + " --- |" * (len(QA_TYPES) + 2)]
    for split in SPLITS:
        prefix = f"vqa/{split}_vqa/"
        if prefix + "exact_match" not in metrics:
            continue
        cells = [metrics[prefix + "exact_match"]] + [metrics.get(prefix + t) for t in QA_TYPES]
        rows.append(f"| {split} | " + " | ".join(
            "-" if v is None else f"{100 * v:.1f}%" for v in cells) + " |")
    return "\n".join(rows)


def questions_of(entry: dict) -> list[str]:
    """The questions of a vqa entry's human turns ("<image>\nQ\nINSTRUCTION", the image token
    first or last), without the image token and the short-answer instruction."""
    from vlmjax.data.shapes_instruct import IMAGE_TOKEN
    return [t["value"].replace(IMAGE_TOKEN, "").strip().split("\n")[0]
            for t in entry["conversations"] if t["from"] == "human"]


def sample_answers(data_dir: str, workdir: str) -> list[dict]:
    """Answers of the stage-2 model (python -m vlmjax.generate --image) to every question about
    the first test images, exported as PNG files."""
    from vlmjax.data import export, shapes
    from vlmjax.data.shapes_instruct import SHORT_ANSWER_INSTRUCTION
    from vlmjax.generate import answer_about_image, parser
    from vlmjax.convert import load_pretrained

    out = os.path.join(workdir, "test_samples")
    builder = shapes.make_builder("64px", data_dir)
    export.export_llava(builder, out, "test", kinds=("vqa",), limit=NUM_SAMPLE_IMAGES)
    with open(os.path.join(out, "test_vqa.json")) as file:
        entries = json.load(file)
    model_dir = os.path.join(workdir, "stage2")
    model, params, model_config = load_pretrained(model_dir)
    rows = []
    for entry in entries:
        for question, truth in zip(questions_of(entry), entry["answers"]):
            image = os.path.join(out, "images", entry["image"])
            args = parser().parse_args(["--model", model_dir, "--image", image, "--prompt",
                                        f"{question}\n{SHORT_ANSWER_INSTRUCTION}",
                                        "--max_new_tokens", "8"])
            answer = answer_about_image(args, model, params, model_config, out=open(os.devnull, "w"))
            rows.append(dict(image=image, question=question, answer=answer, truth=truth))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmjax.demos.llava", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="TFDS data dir of vlm_shapes")
    p.add_argument("--workdir", required=True, help="one subdirectory per run of the chain")
    p.add_argument("--stage1_args", default="", help="extra presets for stage 1, e.g. ',steps=100'")
    p.add_argument("--stage2_args", default="", help="extra presets for stage 2")
    args = p.parse_args(argv)
    data_dir, workdir = os.path.abspath(args.data_dir), os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    build_data(data_dir, workdir)
    for run in chain(args.stage1_args, args.stage2_args):
        train(run, data_dir, workdir)
    metrics = final_metrics(os.path.join(workdir, "stage2"))
    print(f"\nLLaVA tiny, stage 2 ({workdir}/stage2): VQA exact match "
          "(normalised; recipe chosen on validation)\n")
    print(vqa_table(metrics))
    print("\nanswers (python -m vlmjax.generate --model WORKDIR/stage2 --image PNG --prompt Q):")
    for row in sample_answers(data_dir, workdir):
        mark = "ok " if row["answer"] == row["truth"] else "BAD"
        print(f"  {mark} {os.path.basename(row['image'])}: {row['question']} -> "
              f"{row['answer']!r} (truth {row['truth']!r})")
    print(f"\nchain wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
