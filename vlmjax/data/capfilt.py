"""BLIP's CapFilt (Li et al. 2022, section 3.3) on webdataset shards: a BLIP run captions every
image and its ITM head filters the web and the synthetic captions; the kept pairs become new shards.

    python -m vlmjax.data.capfilt SOURCE OUT --model WORKDIR [--threshold 0.5]
        [--prompt "a picture of"] [--top_p 0.9] [--seed 0] [--batch_size 64]
        [--max_new_tokens 32] [--samples_per_shard 10000] [--text_extension txt]

SOURCE: shard paths, a glob or brace notation, comma-separated for several (as align_filter's).
WORKDIR: a trainer workdir of task `blip` (or WORKDIR/checkpoints/<step>; default the latest
step), e.g. configs/blip/tiny.py's. Images are resized and normalised as the run's evaluations do
(input.image_size and the value op of input.preprocess), texts tokenised as in its training
(`[CLS] caption [SEP]`, input.max_text_len, the run's tokenizer).

Captioner: one caption per image, nucleus-sampled (top_p, seed; the same seed, batch size and
input order give the same captions) after `[DEC] + prompt`; the prompt is not part of the
caption. BLIP's captioner is prompted "a picture of"; a run trained without a prompt (the vlmjax
tiny recipe) is captioned with `--prompt ''`. (BLIP's sampling also has a repetition penalty and
a minimum length; vlmjax.inference.generate has neither.) An empty caption is dropped, counted.
Filter: a caption is kept when its ITM p(match) (softmax of the two ITM logits) > --threshold,
the web caption and the synthetic one each on its own. Each kept pair is a sample of
OUT/capfilt-NNNNNN.tar: KEY_web or KEY_syn with the image file unchanged, the caption in
KEY_x.<text_extension> and KEY_x.json = the input's KEY.json fields plus "source" ("web" /
"synthetic"), "itm_probability" and "input_key" (a contrastive or align_filter run reads the
shards as they are; a KEY.json `noise` field still describes the web caption).
Images with no kept caption are dropped and counted; bad samples (no image, an image that does
not decode, no or empty text, a KEY.json that does not parse) are skipped and counted by reason.
When the input's KEY.json has a `noise` field (vlmjax.data.export of vlm_shapes/noisy), the web
captions the filter dropped are scored against it: per group (swapped captions, text junk, all
noise) precision = dropped captions of the group / all dropped web captions, recall = dropped
captions of the group / captions of the group; and the share of clean captions dropped.
It prints the counts; OUT/capfilt_report.json holds the same.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
import tqdm

from vlmjax.config import ConfigError
from vlmjax.convert import blip_workdir
from vlmjax.data import preprocess, shapes_noise, sources, webdataset
from vlmjax.data.tf_cpu import tf
from vlmjax.evals.blip_model import BlipEvalModel
from vlmjax.evals.data import eval_preprocess

DEFAULT_PROMPT = "a picture of"
KEY_SUFFIX = {"web": "_web", "synthetic": "_syn"}


# ------------------------------------------------------------------------------------- the model
@dataclasses.dataclass
class CapFiltModel:
    """A BLIP run's captioner and ITM filter over host numpy images [N, S, S, 3]."""
    eval_model: BlipEvalModel
    params: Any
    mesh: Any
    load_image: Callable[[bytes], np.ndarray]  # encoded bytes -> preprocessed float32 image
    encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # texts -> (ids, mask)
    workdir: str
    step: int

    @property
    def batch_size(self) -> int:
        return self.eval_model.batch_size

    def itm_scores(self, images, texts: Sequence[str]) -> np.ndarray:
        """[N] logit(match) - logit(no match); p(match) = sigmoid(score)."""
        ids, mask = self.encode(list(texts))
        return self.eval_model.itm_scores(self.params, images, ids, mask)


def load_model(path: str, batch_size: int = 64) -> CapFiltModel:
    """A BLIP trainer workdir (or WORKDIR/checkpoints/<step>) as a CapFiltModel."""
    try:
        run = blip_workdir.load_blip_workdir(path)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"--model {error}") from None
    task, config, mesh, params = run.task, run.config, run.mesh, run.params
    model = BlipEvalModel(task.model, task.tokenizer, mesh, task.token_ids,
                          batch_size=batch_size)

    prepare = preprocess.make_preprocess_fn(eval_preprocess(config.input.preprocess),
                                            task.image_size)

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def load(data):
        example = prepare({"image": preprocess.decode(data), "texts": tf.constant([""]),
                           "_seed": tf.zeros([2], tf.int64)})
        return example["image"]

    tokenizer, inp = task.tokenizer, config.input
    return CapFiltModel(
        model, params, mesh, lambda data: np.asarray(load(tf.constant(data)), np.float32),
        lambda texts: tokenizer.encode_batch(texts, task.text_length, add_bos=inp.add_bos,
                                             eos=inp.eos),
        run.workdir, run.step)


# ----------------------------------------------------------------------------------- the samples
@dataclasses.dataclass
class Sample:
    key: str
    text: str
    image: np.ndarray   # preprocessed, float32 [S, S, 3]
    files: dict         # the image file (extension -> bytes) as it came
    metadata: dict      # KEY.json, {} without one


def read_sample(item, text_extension: str, load_image) -> tuple[Sample | None, str]:
    """(sample, "ok") or (None, the skips reason)."""
    if isinstance(item, webdataset.TarProblem):
        return None, item.reason
    found, reason = sources.image_and_text(item.files, text_extension)
    if found is None:
        return None, reason
    image_extension, text = found
    metadata = {}
    if "json" in item.files:
        try:
            metadata = json.loads(item.files["json"])
        except (ValueError, UnicodeDecodeError):
            metadata = None
        if not isinstance(metadata, dict):
            return None, "bad_json"
    data, reason = sources.check_image(item.files[image_extension])
    if reason != "ok":
        return None, reason
    try:
        image = load_image(data)
    except tf.errors.OpError:  # a damaged image whose header reads well
        return None, "corrupt_image"
    return Sample(item.key, text, image, {image_extension: item.files[image_extension]},
                  metadata), "ok"


def score_cut(threshold: float) -> float:
    """The ITM score (logit difference) above which p(match) = sigmoid(score) > threshold."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def match_probability(score: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * score))  # sigmoid, without overflow


def noise_scores(kinds: Sequence[str], dropped: Sequence[bool]) -> dict:
    """The filter's decisions on web captions of known noise kind (KEY.json `noise`): per group
    (swapped, text_junk, all_noise) its captions, how many were dropped, precision (= dropped of
    the group / all dropped) and recall (= dropped of the group / the group); for clean captions
    the drop rate. A ratio with a zero denominator is None."""
    kinds, dropped = list(kinds), [bool(d) for d in dropped]
    all_dropped = sum(dropped)
    by_kind = collections.Counter(kinds)
    dropped_by_kind = collections.Counter(k for k, d in zip(kinds, dropped) if d)
    groups = {"swapped": lambda k: k == shapes_noise.SWAPPED,
              "text_junk": lambda k: k in shapes_noise.TEXT_JUNK_KINDS,
              "all_noise": lambda k: k != "clean"}
    out = {"captions": len(kinds), "dropped": all_dropped,
           "by_kind": {k: {"captions": n, "dropped": dropped_by_kind[k]}
                       for k, n in sorted(by_kind.items())}}
    for name, member in groups.items():
        count = sum(n for k, n in by_kind.items() if member(k))
        hits = sum(n for k, n in dropped_by_kind.items() if member(k))
        out[name] = {"captions": count, "dropped": hits,
                     "precision": hits / all_dropped if all_dropped else None,
                     "recall": hits / count if count else None}
    clean, clean_dropped = by_kind["clean"], dropped_by_kind["clean"]
    out["clean"] = {"captions": clean, "dropped": clean_dropped,
                    "drop_rate": clean_dropped / clean if clean else None}
    return out


# ------------------------------------------------------------------------------------------- run
@dataclasses.dataclass
class Settings:
    threshold: float = 0.5
    prompt: str = DEFAULT_PROMPT
    top_p: float = 0.9
    seed: int = 0
    max_new_tokens: int = 32
    text_extension: str = "txt"
    samples_per_shard: int = 10_000

    def check(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold {self.threshold} must be a probability in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p {self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.samples_per_shard < 1:
            raise ValueError("--max_new_tokens and --samples_per_shard must be >= 1")


class _Filter:
    """Captions and filters batches of samples, writes the kept pairs and counts."""

    def __init__(self, model: CapFiltModel, settings: Settings, writer):
        self.model, self.settings, self.writer = model, settings, writer
        self.rng = jax.random.PRNGKey(settings.seed)
        self.batches = 0
        self.cut = score_cut(settings.threshold)
        self.kept = collections.Counter()
        self.empty_synthetic = self.no_caption = 0
        self.noise_kinds, self.noise_dropped = [], []

    def __call__(self, batch: list[Sample]) -> None:
        images = np.stack([sample.image for sample in batch])
        settings = self.settings
        synthetic = self.model.eval_model.caption(
            self.model.params, images, prompt=settings.prompt, top_p=settings.top_p,
            rng=jax.random.fold_in(self.rng, self.batches),
            max_new_tokens=settings.max_new_tokens)
        self.batches += 1
        scores = self.model.itm_scores(np.concatenate([images, images]),
                                       [s.text for s in batch] + synthetic)
        for sample, caption, web_score, syn_score in zip(batch, synthetic, scores[:len(batch)],
                                                         scores[len(batch):]):
            self.empty_synthetic += not caption
            kept = {"web": (sample.text, float(web_score)) if web_score > self.cut else None,
                    "synthetic": (caption, float(syn_score)) if caption and syn_score > self.cut
                    else None}
            for source, pair in kept.items():
                if pair is not None:
                    self.kept[source] += 1
                    self._write(sample, source, *pair)
            self.no_caption += not any(kept.values())
            if "noise" in sample.metadata:
                self.noise_kinds.append(str(sample.metadata["noise"]))
                self.noise_dropped.append(kept["web"] is None)

    def _write(self, sample: Sample, source: str, text: str, score: float) -> None:
        metadata = {**sample.metadata, "source": source,
                    "itm_probability": match_probability(score), "input_key": sample.key}
        self.writer.write(sample.key + KEY_SUFFIX[source], {
            **sample.files, self.settings.text_extension: text.encode(),
            "json": json.dumps(metadata).encode()})


def run(source: str, out: str, model: CapFiltModel, settings: Settings | None = None,
        log=print, show_progress: bool = False) -> dict:
    settings = settings or Settings()
    settings.check()
    paths = webdataset.expand_paths(source)
    if not paths:
        raise ValueError(f"{source!r} matched no shard files")
    bad = collections.Counter()
    total = images = 0
    with webdataset.ShardWriter(out, prefix="capfilt",
                                max_samples=settings.samples_per_shard) as writer, \
            jax.set_mesh(model.mesh), \
            tqdm.tqdm(unit="img", desc="capfilt", disable=not show_progress) as progress:
        apply = _Filter(model, settings, writer)
        pending = []
        for path in paths:
            for item in webdataset.iter_tar_samples(path):
                total += 1
                progress.update()
                sample, reason = read_sample(item, settings.text_extension, model.load_image)
                if sample is None:
                    bad[reason] += 1
                    continue
                images += 1
                pending.append(sample)
                if len(pending) == model.batch_size:
                    apply(pending)
                    pending = []
        if pending:
            apply(pending)
    if total == 0:
        raise ValueError(f"no samples in {paths}")
    report = {"source": paths, "model": model.workdir, "step": model.step, "total": total,
              "images": images, "skipped_bad_data": dict(bad),
              "web": {"kept": apply.kept["web"], "dropped": images - apply.kept["web"]},
              "synthetic": {"kept": apply.kept["synthetic"],
                            "dropped": images - apply.kept["synthetic"],
                            "empty": apply.empty_synthetic},
              "images_without_caption": apply.no_caption, "written": writer.num_samples,
              "shards": writer.paths,
              "settings": {**dataclasses.asdict(settings), "batch_size": model.batch_size},
              "noise": (noise_scores(apply.noise_kinds, apply.noise_dropped)
                        if apply.noise_kinds else None)}
    with open(os.path.join(out, "capfilt_report.json"), "w") as file:
        json.dump(report, file, indent=1)
    log(format_report(report))
    return report


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(report: dict) -> str:
    images, bad = report["images"], sum(report["skipped_bad_data"].values())
    lines = [f"{report['total']} samples in {len(report['source'])} shard(s): {images} images "
             f"captioned and filtered, {bad} skipped as bad data",
             "| caption | images | kept | dropped |", "| --- | ---: | ---: | ---: |"]
    for source in KEY_SUFFIX:
        counts = report[source]
        empty = f" ({counts['empty']} empty)" if source == "synthetic" and counts["empty"] else ""
        lines.append(f"| {source} | {images} | {counts['kept']} | {counts['dropped']}{empty} |")
    lines.append(f"wrote {report['written']} samples in {len(report['shards'])} shard(s); "
                 f"{report['images_without_caption']} image(s) kept no caption and were dropped")
    for reason, count in sorted(report["skipped_bad_data"].items()):
        lines.append(f"  skipped as bad data ({reason}): {count}")
    noise = report.get("noise")
    if noise:
        lines += [f"web captions by KEY.json noise: {noise['captions']}, of which dropped "
                  f"{noise['dropped']}",
                  "| noise | captions | dropped | precision | recall |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name in ("swapped", "text_junk", "all_noise"):
            group = noise[name]
            lines.append(f"| {name} | {group['captions']} | {group['dropped']} | "
                         f"{_ratio(group['precision'])} | {_ratio(group['recall'])} |")
        clean = noise["clean"]
        lines.append(f"clean web captions dropped: {clean['dropped']} of {clean['captions']} "
                     f"({_ratio(clean['drop_rate'])})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.capfilt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="shard paths / glob / brace pattern")
    parser.add_argument("out", help="output directory for the captioned, filtered shards")
    parser.add_argument("--model", required=True,
                        help="a BLIP trainer workdir or WORKDIR/checkpoints/<step>")
    helps = {"threshold": "keep a caption when ITM p(match) > this (BLIP: 0.5)",
             "prompt": "captioner prompt (BLIP: 'a picture of'; tiny vlmjax runs: '')"}
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default,
                            help=helps.get(field.name))
    parser.add_argument("--batch_size", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    try:
        settings.check()
        if args.batch_size < 1:
            raise ValueError(f"--batch_size {args.batch_size} must be >= 1")
        if not webdataset.expand_paths(args.source):  # before the model: that takes a while
            raise ValueError(f"{args.source!r} matched no shard files")
        model = load_model(args.model, args.batch_size)
        run(args.source, args.out, model, settings, show_progress=True)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
