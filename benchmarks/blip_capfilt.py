"""BLIP's CapFilt against ALIGN's filter and no filter on vlm_shapes/noisy: a tiny contrastive
model trained for the same steps on each, and each filter's precision/recall on the noisy captions.

    python -m vlmjax.data.build vlm_shapes --data_dir D            # the clean 64px build
    python -m vlmjax.train --config configs/blip/tiny.py:image=vit,swaps=0 --workdir W \
        --config.data.data_dir=D                                  # the measured run's BLIP
    python benchmarks/blip_capfilt.py --data_dir D --blip_workdir W [--steps 2000]
        [--train_size N] [--threshold 0.5] [--vocab_top_k 2000] [--batch_size 64]
        [--arms raw,align,capfilt,capfilt_web] [--reuse_filters]
    python benchmarks/blip_capfilt.py --quick --data_dir /tmp/capfilt_quick   # smoke run, minutes

W is a BLIP run trained on the clean 64px train split, our stand-in for BLIP's COCO-finetuned
captioner and filter. The script builds vlm_shapes/noisy (30% of train captions replaced by web
junk or by another image's caption), exports its train split as shards (one caption per image;
KEY.json names its noise kind), runs `python -m vlmjax.data.align_filter` (text rules: the
images are 64 px, below ALIGN's 200) and `python -m vlmjax.data.capfilt --prompt ''` (the tiny
BLIP recipe trains captions without a prompt) on them, then trains configs/siglip/tiny.py for
--steps on each of the raw, ALIGN-filtered and CapFilt shards (data.source=webdataset, the noisy
build's tokenizer) and evaluates zero-shot top-1 and image-text retrieval R@1 on the test split.
Arms: raw, align, capfilt (web and synthetic captions CapFilt kept) and capfilt_web (its web
captions alone: the filter without the captioner, BLIP's Table 1 ablation); `--arms` picks some,
`--reuse_filters` reuses the filters' outputs of an earlier run in --data_dir.
Printed: one markdown table of the runs, then each filter's decisions on the web captions
by noise kind: precision = dropped captions of the kind / all dropped, recall = dropped of the
kind / all of the kind (vlmjax.data.capfilt.noise_scores).

Caveat: the noise replaces captions only, so noisy's train images are 64px's: a BLIP trained on
64px train has seen these very images with clean captions, which a real web corpus would not
give it. `--quick` trains its own runlocal BLIP (2 steps: near-random captions and ITM) on a
tiny build and the contrastive config's runlocal preset; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vlmjax import config as config_lib  # noqa: E402
from vlmjax.data import capfilt, export, shapes, webdataset  # noqa: E402
from vlmjax.train import trainer  # noqa: E402

CONTRASTIVE_CONFIG = "configs/siglip/tiny.py"  # README: 93.4% zero-shot top-1 on clean test
QUICK_SIZES = dict(train_size=128, eval_size=32, novel_size=16)
ARMS = ("raw", "align", "capfilt", "capfilt_web")


def command(args: list[str]) -> float:
    """Runs a vlmjax CLI as a user would; returns its seconds."""
    print("$ python", " ".join(args), flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    return time.perf_counter() - start


def quick_blip(data_dir: str) -> str:
    """A 2-step runlocal BLIP on a tiny clean build (for --quick without --blip_workdir)."""
    workdir = os.path.join(data_dir, "blip_runlocal")
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return workdir  # an earlier --quick run's
    config = config_lib.load_config("configs/blip/tiny.py:runlocal,image=vit,swaps=0")
    config.evals = {}
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "total_steps=2"])
    trainer.train(config, workdir)
    return workdir


def train_contrastive(name: str, shards: str, tokenizer: str, eval_data: dict, steps: int,
                      quick: bool, workdir: str) -> dict:
    preset = f"steps={steps}" + (",runlocal" if quick else "")
    config = config_lib.load_config(f"{CONTRASTIVE_CONFIG}:{preset}")
    config.total_steps = steps
    config.data = dict(source="webdataset", paths=shards)
    config.input.tokenizer = tokenizer
    config.evals = {key: dict(entry, data=dict(eval_data, split="test"))
                    for key, entry in config.evals.to_dict().items()
                    if key in ("test", "test_retrieval")}
    print(f"training {CONTRASTIVE_CONFIG}:{preset} on {name} ({shards})", flush=True)
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)  # a fresh run, not a resume
    return trainer.train(config, os.path.join(workdir, name)).metrics


def web_only(shards: list[str], out: str) -> int:
    """CapFilt's kept web captions (KEY.json source "web") as shards in `out`; their count."""
    shutil.rmtree(out, ignore_errors=True)
    with webdataset.ShardWriter(out, prefix="web", max_samples=10_000) as writer:
        for path in shards:
            for sample in webdataset.iter_tar_samples(path):
                if json.loads(sample.files["json"])["source"] == "web":
                    writer.write(sample.key, sample.files)
    return writer.num_samples


def web_decisions(shards: str, kept_keys: set[str]) -> tuple[list[str], list[bool]]:
    """(noise kind, dropped) of every input sample's web caption."""
    kinds, dropped = [], []
    for path in webdataset.expand_paths(shards):
        for sample in webdataset.iter_tar_samples(path):
            kinds.append(json.loads(sample.files["json"])["noise"])
            dropped.append(sample.key not in kept_keys)
    return kinds, dropped


def results_table(rows: list[tuple[str, int, dict]]) -> str:
    lines = ["| training data | pairs | zero-shot top-1 (test) | i2t R@1 | t2i R@1 |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, pairs, metrics in rows:
        lines.append(f"| {name} | {pairs} | {metrics['zero_shot/test/top1']:.4f} | "
                     f"{metrics['retrieval/test_retrieval/i2t_r1']:.4f} | "
                     f"{metrics['retrieval/test_retrieval/t2i_r1']:.4f} |")
    return "\n".join(lines)


def filter_table(scores: dict[str, dict]) -> str:
    """Each filter's noise_scores as one markdown table."""
    ratio = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
    lines = ["| filter | web captions | captions | dropped | precision | recall |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, score in scores.items():
        for group in ("swapped", "text_junk", "all_noise"):
            g = score[group]
            lines.append(f"| {name} | {group} | {g['captions']} | {g['dropped']} | "
                         f"{ratio(g['precision'])} | {ratio(g['recall'])} |")
        clean = score["clean"]
        lines.append(f"| {name} | clean | {clean['captions']} | {clean['dropped']} | - | "
                     f"drop rate {ratio(clean['drop_rate'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--blip_workdir", default=None, help="required unless --quick")
    parser.add_argument("--steps", type=int, default=None, help="default 2000 (--quick: 6)")
    parser.add_argument("--train_size", type=int, default=None, help="noisy train size")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--vocab_top_k", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {ARMS}")
    parser.add_argument("--reuse_filters", action="store_true",
                        help="reuse the ALIGN / CapFilt outputs of an earlier run")
    args = parser.parse_args()
    arms_wanted = args.arms.split(",")
    if set(arms_wanted) - set(ARMS):
        parser.error(f"--arms {args.arms!r}: each must be one of {ARMS}")
    if not args.quick and not args.blip_workdir:
        parser.error("--blip_workdir is needed (a BLIP run on clean 64px train) unless --quick")
    steps = args.steps or (6 if args.quick else 2000)
    sizes = dict(QUICK_SIZES) if args.quick else {}
    if args.train_size:
        sizes["train_size"] = args.train_size

    blip = args.blip_workdir or quick_blip(args.data_dir)
    builder = shapes.prepare(shapes.make_builder("noisy", args.data_dir, **sizes))
    name = builder.builder_config.name
    raw = os.path.join(args.data_dir, f"wds_{name}")
    if not webdataset.expand_paths(f"{raw}/train-*.tar"):
        export.export(builder, raw, split="train", captions="one")
    raw_shards = f"{raw}/train-*.tar"
    align_out, capfilt_out = f"{raw}_align", f"{raw}_capfilt"
    reports = {align_out: "filter_report.json", capfilt_out: "capfilt_report.json"}
    reuse = args.reuse_filters and all(os.path.exists(os.path.join(out, report))
                                       for out, report in reports.items())
    seconds = {}
    if not reuse:
        for out in (align_out, capfilt_out):  # no shards of an earlier run may stay behind
            shutil.rmtree(out, ignore_errors=True)
        seconds["align"] = command(
            ["-m", "vlmjax.data.align_filter", raw_shards, align_out, "--no_image_size",
             "--no_aspect_ratio", "--vocab_top_k", str(args.vocab_top_k)])
        seconds["capfilt"] = command(
            ["-m", "vlmjax.data.capfilt", raw_shards, capfilt_out, "--model", blip, "--prompt",
             "", "--threshold", str(args.threshold), "--batch_size", str(args.batch_size)]
            + (["--max_new_tokens", "8"] if args.quick else []))
    align_report = json.load(open(os.path.join(align_out, "filter_report.json")))
    capfilt_report = json.load(open(os.path.join(capfilt_out, "capfilt_report.json")))

    align_kept = {s.key for p in align_report["shards"] for s in webdataset.iter_tar_samples(p)}
    scores = {"ALIGN": capfilt.noise_scores(*web_decisions(raw_shards, align_kept)),
              "CapFilt": capfilt_report["noise"]}
    eval_data = dict(source="vlm_shapes", config="noisy", data_dir=args.data_dir, **sizes)
    tokenizer = shapes.tokenizer_path(builder)
    workdir = os.path.join(args.data_dir, f"capfilt_bench_{name}_{steps}")
    web_out = f"{capfilt_out}_web"
    web_pairs = web_only(capfilt_report["shards"], web_out)
    arms = {"raw": ("raw noisy", raw_shards, align_report["total"]),
            "align": ("ALIGN filter", f"{align_out}/*.tar", align_report["kept"]),
            "capfilt": ("CapFilt", f"{capfilt_out}/*.tar", capfilt_report["written"]),
            "capfilt_web": ("CapFilt, web captions only", f"{web_out}/*.tar", web_pairs)}
    rows = [(label, pairs, train_contrastive(arm, shards, tokenizer, eval_data, steps,
                                             args.quick, workdir))
            for arm, (label, shards, pairs) in arms.items() if arm in arms_wanted]

    synthetic = capfilt_report["synthetic"]["kept"]
    print(f"\nvlm_shapes/{name}: {align_report['total']} image-caption pairs; "
          f"{CONTRASTIVE_CONFIG} for {steps} steps on each; BLIP {blip}")
    timing = (f"ALIGN filter {seconds['align']:.0f} s, CapFilt {seconds['capfilt']:.0f} s"
              if seconds else "filters' outputs reused")
    print(f"{timing} (threshold {args.threshold}; {capfilt_report['web']['kept']} web + "
          f"{synthetic} synthetic captions kept)\n")
    print(results_table(rows))
    print()
    print(filter_table(scores))


if __name__ == "__main__":
    main()
