"""Zero-shot accuracy on vlm_shapes versus training examples for tiny two-tower recipe variants.

Generates vlm_shapes examples in memory (no TensorFlow data pipeline), keeps the whole train set
on the device, and trains each variant with the contrastive task's loss (`ContrastiveTask.loss_fn`),
the trainer's optimiser (`optim.make_optimizer`) and train step (`step.make_train_step`),
evaluating zero-shot top-1 on the `validation` split's single-object images every
`--eval_every` steps. Recipes are chosen on validation; test is for the trainer's final report.
Used to choose the tiny configs' settings on an accelerator, where a variant takes seconds:

    python benchmarks/tiny_recipe_sweep.py --train_size 50000 --steps 3000 --variants base,b512
    python benchmarks/tiny_recipe_sweep.py --steps 600 --eval_every 100 --variants cnn,cnn_hn7
    python benchmarks/tiny_recipe_sweep.py --quick      # CPU smoke run

Variants change the model, the optimiser, or the training text (class-name or object-list
captions, single-object subsets, shape-swapped hard negatives): see VARIANTS. They exist to find
out what limits zero-shot accuracy (README "Measured: tiny models"), not as recipes. Only losses
the task has are swept (the earlier hn_form="both" and hn_weight variants are gone with their
private loss).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pickle
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vlmjax.data import hard_negatives, shapes_examples, shapes_scene, tokenizers  # noqa: E402
from vlmjax.evals import zero_shot  # noqa: E402
from vlmjax.train import optim  # noqa: E402
from vlmjax.train import step as step_lib  # noqa: E402
from vlmjax.train.tasks.contrastive import ContrastiveTask  # noqa: E402

MAX_TEXT_LEN = 24
BASE = dict(image=dict(patch_size=8, width=96, depth=3, num_heads=4, mlp_dim=384, pool="map"),
            text=dict(vocab_size=1000, max_len=24, width=64, depth=2, num_heads=2, mlp_dim=256,
                      pool="last"),
            embed_dim=64, temperature_init=10.0, bias_init=-10.0)
CNN = {"image_arch": "cnn", "image": dict(channels=(32, 64, 96), patch_size=2, pool="max")}
# Besides model and optimiser changes, a variant may set
#   subset="single"         train on the single-object images only;
#   captions="class"|"tags" with probability `caption_mix` replace the caption by the class name
#                           ("red star", single-object images only) or by the list of the objects'
#                           colour + shape names ("blue circle and red star");
#   hard_negatives=K        K negatives per image: its caption with the shape words swapped
#                           (vlmjax.data.hard_negatives, the task's hard-negative loss term);
#   loss="clip"             CLIP's softmax loss (temperature 1/0.07, no bias) instead of SigLIP;
#   steps_scale=s           train s times --steps (e.g. half the batch for the same examples).
VARIANTS = {
    "base": {},
    "b512": {"batch": 512},
    "lr3e-3": {"lr": 3e-3},
    "clip": {"loss": "clip"},
    "wide": {"image": dict(width=128, mlp_dim=512), "embed_dim": 128},
    "small": {"image": dict(width=64, depth=2, mlp_dim=256), "text": dict(width=48, mlp_dim=192)},
    "gap": {"image": dict(pool="gap")},
    "p4": {"image": dict(patch_size=4)},
    "deep": {"image": dict(depth=6)},
    "t30": {"temperature_init": 30.0},
    "cnn": CNN,
    "cnn_t100": {**CNN, "temperature_init": 100.0},
    "cnn_hn1": {**CNN, "hard_negatives": 1},
    "cnn_hn7": {**CNN, "hard_negatives": 7},
    "cnn_single": {**CNN, "subset": "single"},
    "cnn_single_class": {**CNN, "subset": "single", "captions": "class"},
    "cnn_single_tags50": {**CNN, "subset": "single", "captions": "tags", "caption_mix": 0.5},
    "cnn_tags": {**CNN, "captions": "tags"},
    "cnn_tags50": {**CNN, "captions": "tags", "caption_mix": 0.5},
}
HN7 = {**CNN, "hard_negatives": 7}
VARIANTS.update({
    "cnn_hn7_td1": {**HN7, "text": dict(depth=1)},
    "cnn_hn7_lr2e-3": {**HN7, "lr": 2e-3},
    "cnn_hn7_lr3e-3": {**HN7, "lr": 3e-3},
    "cnn_hn7_b64": {**HN7, "batch": 64, "steps_scale": 2},
    "cnn_hn7_clip": {**HN7, "loss": "clip"},
    "cnn_hn7_single": {**HN7, "subset": "single"},
    "cnn_hn7_wide": {**HN7, "image": dict(channels=(48, 96, 128))},
    "cnn_hn7_t30": {**HN7, "temperature_init": 30.0},
})
# The tiny configs' recipe at --steps: no text transformer layers, embeddings + MAP pooling.
BOW = {**HN7, "text": dict(depth=0, pool="map")}
VARIANTS["cnn_hn7_td0"] = BOW
# Variants on the cheaper text towers get the steps that the same CPU time buys (2-core CPU,
# batch 128: hn7 281-285 examples/s, text depth 1 401-407, depth 0 + MAP pooling 679).
TD1 = {**HN7, "text": dict(depth=1), "steps_scale": 1.45}  # text depth 1, 1.45x the steps
VARIANTS.update({
    "cnn_hn7_td1_long": TD1,
    "cnn_hn7_td1_long_lr2e-3": {**TD1, "lr": 2e-3},
    "cnn_hn7_td1_long_b64": {**TD1, "batch": 64, "steps_scale": 2.9},
    "cnn_hn7_td1_long_clip": {**TD1, "loss": "clip"},
})
TD0 = {**BOW, "steps_scale": 2.4}  # text depth 0, 2.4x the steps
VARIANTS.update({
    "cnn_hn7_td0_long": TD0,
    "cnn_hn7_td0_long_lr2e-3": {**TD0, "lr": 2e-3},
    "cnn_hn7_td0_long_clip": {**TD0, "loss": "clip"},
})
# CLIP's other towers in the tiny recipe (configs/clip/cbow_tiny.py; configs/siglip/tiny.py's
# image=resnet preset): CBOW text, and the modified ResNet (its image_size follows --image_size).
RESNET = {"image_arch": "resnet", "image": dict(layers=(1, 1, 1, 1), width=8, num_heads=4,
                                                output_dim=64, norm="groupnorm", norm_groups=4)}
VARIANTS.update({
    "cnn_hn7_cbow": {**HN7, "text_arch": "cbow"},
    "cnn_hn7_cbow_lr3e-3": {**HN7, "text_arch": "cbow", "lr": 3e-3},
    "resnet_hn7_td0": {**BOW, **RESNET},
    "resnet_hn7_td0_lr3e-3": {**BOW, **RESNET, "lr": 3e-3},
})
VARIANTS.update({
    "cnn_hn7_td0_lr2e-3": {**BOW, "lr": 2e-3},
    "cnn_hn7_td0_lr3e-3": {**BOW, "lr": 3e-3},
    "cnn_hn7_td0_clip_lr2e-3": {**BOW, "loss": "clip", "lr": 2e-3},
    "cnn_hn7_td0_clip_lr3e-3": {**BOW, "loss": "clip", "lr": 3e-3},
})


def _example(args):
    spec, index = args
    example = shapes_examples.make_example(spec, index)
    image = np.asarray(Image.open(io.BytesIO(example["image"])).convert("RGB"))
    objects = example["objects"]
    tags = " and ".join(f"{c} {s}" for c, s in zip(objects["colour"], objects["shape"]))
    return image, list(example["captions"]), int(example["label"]), tags


def generate(split: str, size: int, image_size: int, workers: int):
    spec = shapes_examples.ExampleSpec(split=split, image_size=image_size, seed=0)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        out = pool.map(_example, [(spec, i) for i in range(size)], chunksize=256)
    images, captions, labels, tags = zip(*out)
    return np.stack(images), list(captions), np.array(labels), list(tags)


def load_or_generate(args):
    """(train, validation) data; with --cache, read from or written to that file, so that several
    sweeps (e.g. parallel processes on one accelerator) share one generation."""
    sizes = (args.train_size, args.eval_size, args.image_size)
    if args.cache and os.path.exists(args.cache):
        with open(args.cache, "rb") as f:
            cached_sizes, data = pickle.load(f)
        if cached_sizes != sizes:
            raise SystemExit(f"--cache {args.cache} holds (train_size, eval_size, image_size) = "
                             f"{cached_sizes}, not {sizes}; delete it or name another file")
        return data
    data = (generate("train", args.train_size, args.image_size, args.workers),
            generate("validation", args.eval_size, args.image_size, args.workers))
    if args.cache:
        handle, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.cache)))
        with os.fdopen(handle, "wb") as f:  # a private temp file: parallel writers never clash
            pickle.dump((sizes, data), f)
        os.replace(tmp, args.cache)
    return data


def merge(base: dict, change: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    if change.get("image_arch", "vit") != "vit":
        out["image"] = {}  # the ViT keys mean nothing to another tower
    if change.get("text_arch", "transformer") == "cbow":  # a CBOW tower has no layers or heads
        out["text"] = {k: out["text"][k] for k in ("vocab_size", "max_len", "width")}
    for key, value in change.items():
        if isinstance(value, dict):
            out[key].update(value)
        elif key in out or key in ("image_arch", "text_arch"):
            out[key] = value
    return out


def variant_texts(change: dict, corpus: dict, tokenizer) -> dict:
    """The train-set arrays a variant needs beyond images and captions: the pool of example
    indices, the replacement captions and the hard negatives."""
    labels = corpus["labels"]
    single = np.flatnonzero(labels >= 0)
    out = {"pool": jnp.asarray(single if change.get("subset") == "single" else
                               np.arange(len(labels)))}
    kind = change.get("captions")
    if kind:
        if kind == "class" and change.get("subset") != "single":
            raise ValueError("captions='class' needs subset='single' (multi-object images have "
                             "no class)")
        alt = ([shapes_scene.CLASS_NAMES[max(label, 0)] for label in labels] if kind == "class"
               else corpus["tags"])
        ids, mask = tokenizer.encode_batch(alt, MAX_TEXT_LEN, eos="sticky")
        out.update(alt=jnp.asarray(ids), alt_mask=jnp.asarray(mask))
    k = change.get("hard_negatives", 0)
    if k:  # drawn once per caption (the trainer draws afresh every epoch)
        swapper = hard_negatives.WordSwapper(hard_negatives.VOCABULARIES["vlm_shapes"], k)
        captions = [c for caps in corpus["captions"] for c in caps]
        negatives, valid = hard_negatives.batch_negatives(swapper, captions,
                                                          range(len(captions)), seed=0)
        ids, mask = tokenizer.encode_batch(negatives, MAX_TEXT_LEN, eos="sticky")
        shape = (len(labels), corpus["texts"].shape[1], k)
        out.update(neg=jnp.asarray(ids.reshape(*shape, MAX_TEXT_LEN)),
                   neg_mask=jnp.asarray(mask.reshape(*shape, MAX_TEXT_LEN)),
                   neg_valid=jnp.asarray(valid.reshape(shape)))
    return out


def sample_batch(train: dict, change: dict, batch: int, key) -> dict:
    k_idx, k_cap, k_mix = jax.random.split(key, 3)
    idx = train["pool"][jax.random.randint(k_idx, (batch,), 0, train["pool"].shape[0])]
    cap = jax.random.randint(k_cap, (batch,), 0, train["texts"].shape[1])
    text, mask = train["texts"][idx, cap], train["mask"][idx, cap]
    if "alt" in train:
        use = jax.random.uniform(k_mix, (batch, 1)) < change.get("caption_mix", 1.0)
        text = jnp.where(use, train["alt"][idx], text)
        mask = jnp.where(use, train["alt_mask"][idx], mask)
    out = {"image": train["images"][idx], "text": text, "text_mask": mask}
    if "neg" in train:  # the batch keys of the task's hard-negative op
        out.update(neg_text=train["neg"][idx, cap], neg_text_mask=train["neg_mask"][idx, cap],
                   neg_valid=train["neg_valid"][idx, cap])
    return out


def run_options(change: dict, args) -> dict:
    """The variant's batch, lr, steps and eval interval (steps_scale scales both of those)."""
    scale = change.get("steps_scale", 1)
    return dict(batch=change.get("batch", args.batch), lr=change.get("lr", args.lr),
                steps=round(args.steps * scale), eval_every=round(args.eval_every * scale))


def task_config(change: dict, args) -> ml_collections.ConfigDict:
    """The contrastive task's config sections for a variant (no evals: the sweep scores on its
    in-memory validation images)."""
    model = merge(BASE, change)
    if model.get("image_arch") == "resnet":  # a ResNet is built for one image size
        model["image"]["image_size"] = args.image_size
    loss = change.get("loss", "siglip")
    if loss == "clip":  # CLIP's initial temperature and no bias
        model.update(temperature_init=1 / 0.07, bias_init=None)
    return ml_collections.ConfigDict(dict(
        model={**model, "dtype": "float32"},
        loss=dict(name="clip") if loss == "clip" else dict(name="siglip", impl="dense"),
        data=dict(source="vlm_shapes", split="train"),
        input=dict(image_size=args.image_size, max_text_len=MAX_TEXT_LEN)))


def optim_config(lr: float, warmup: int) -> dict:
    """config.optim of the sweep: AdamW, warmup then cosine to lr / 100, clipping at 1."""
    return dict(name="adamw", lr=lr, schedule="cosine", warmup_steps=warmup, end_lr=lr / 100,
                weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0)


def run_variant(name, change, corpus, evaluation, tokenizer, args):
    task = ContrastiveTask(task_config(change, args), mesh=None)
    model = task.model
    options = run_options(change, args)
    batch, lr, steps, eval_every = (options[k] for k in ("batch", "lr", "steps", "eval_every"))
    train = {k: corpus[k] for k in ("images", "texts", "mask")}
    train.update(variant_texts(change, corpus, tokenizer))
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    tx, schedule = optim.make_optimizer(optim_config(lr, args.warmup), steps, params)
    train_step = step_lib.make_train_step(task.loss_fn, tx, schedule)

    @jax.jit
    def step(state, train, key):
        return train_step(state, sample_batch(train, change, batch, key))

    prompts = [template.format(name) for name in shapes_scene.CLASS_NAMES
               for template in zero_shot.VLM_SHAPES_TEMPLATES]
    class_ids, class_mask = tokenizer_batch(tokenizer, prompts)
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    encode_text = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m,
                                                      method=model.encode_text))
    eval_images, eval_labels = evaluation

    def evaluate(p):
        zcls = np.asarray(encode_text(p, class_ids, class_mask)).reshape(
            len(shapes_scene.CLASS_NAMES), len(zero_shot.VLM_SHAPES_TEMPLATES), -1).mean(1)
        zcls /= np.linalg.norm(zcls, axis=-1, keepdims=True)
        zimg = np.concatenate([np.asarray(encode_image(p, eval_images[i:i + 500]))
                               for i in range(0, len(eval_images), 500)])
        return zero_shot.topk_accuracy(zimg, eval_labels, zcls, (1,))["top1"]

    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    curve, start, other_seconds = [], time.perf_counter(), 0.0
    for i in range(1, steps + 1):
        key, sub = jax.random.split(key)
        state, _ = step(state, train, sub)
        # examples/s leaves out the compiling first step and the evaluations
        if i == 1 or i % eval_every == 0 or i == steps:
            jax.block_until_ready(state)
            if i == 1:
                other_seconds += time.perf_counter() - start
            if i % eval_every == 0 or i == steps:
                tick = time.perf_counter()
                curve.append((i, i * batch, evaluate(state.params)))
                other_seconds += time.perf_counter() - tick
    seconds = time.perf_counter() - start
    speed = f"{(steps - 1) * batch / (seconds - other_seconds):.0f}" if steps > 1 else "-"
    print(f"| {name} | {batch} | {lr:g} | " + " | ".join(
        f"{s} ({e // 1000}k): {acc:.1%}" for s, e, acc in curve) +
        f" | {seconds:.0f} s | {speed} |", flush=True)


def tokenizer_batch(tokenizer, texts, max_len=MAX_TEXT_LEN):
    ids, mask = tokenizer.encode_batch(texts, max_len, eos="sticky")
    return jnp.asarray(ids), jnp.asarray(mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_size", type=int, default=50_000)
    parser.add_argument("--eval_size", type=int, default=2_000,
                        help="validation images generated (the single-object ones are scored)")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--variants", default="base",
                        help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--cache", default="",
                        help="pickle file to read the generated data from, or write it to "
                             "(for parallel sweeps, write it first with --cache_only)")
    parser.add_argument("--cache_only", action="store_true",
                        help="write the --cache file and stop")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = parser.parse_args(argv)
    if args.cache_only and not args.cache:
        parser.error("--cache_only needs --cache FILE")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.train_size, args.eval_size, args.steps, args.eval_every = 512, 256, 4, 2
        args.batch, args.warmup, args.workers = 32, 1, 2
    start = time.perf_counter()
    (train_images, train_captions, train_labels, train_tags), (eval_images, _, eval_labels, _) = (
        load_or_generate(args))
    if args.cache_only:
        return
    keep = eval_labels >= 0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizers.train_sentencepiece(
            [c for caps in train_captions[:20_000] for c in caps], os.path.join(tmp, "sp.model"))
    ids, mask = tokenizer.encode_batch([c for caps in train_captions for c in caps], MAX_TEXT_LEN,
                                       eos="sticky")
    n_caps = len(train_captions[0])
    to_float = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1.0  # noqa: E731
    corpus = {"images": to_float(train_images), "captions": train_captions,
              "labels": train_labels, "tags": train_tags,
              "texts": jnp.asarray(ids.reshape(len(train_captions), n_caps, -1)),
              "mask": jnp.asarray(mask.reshape(len(train_captions), n_caps, -1))}
    evaluation = (to_float(eval_images[keep]), eval_labels[keep])
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; data in "
          f"{time.perf_counter() - start:.0f} s; zero-shot top-1 on {keep.sum()} single-object "
          "validation images at step (examples seen)")
    print("| variant | batch | lr | accuracy over training | train time | train examples/s |")
    print("|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        run_variant(name, VARIANTS[name], corpus, evaluation, tokenizer, args)


if __name__ == "__main__":
    main()
