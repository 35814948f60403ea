"""Zero-shot accuracy on vlm_shapes versus training examples for tiny two-tower recipe variants.

Generates vlm_shapes examples in memory (no TensorFlow), keeps the whole train set on the
device, and trains each variant with vlmjax's model, loss and train step, evaluating zero-shot
top-1 on the test split's single-object images every `--eval_every` steps. Used to choose the
tiny configs' settings on an accelerator, where a variant takes seconds:

    python benchmarks/tiny_recipe_sweep.py --train_size 50000 --steps 3000 --variants base,b512
    python benchmarks/tiny_recipe_sweep.py --quick      # CPU smoke run
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vlmjax.data import shapes_examples, shapes_scene, tokenizers  # noqa: E402
from vlmjax.evals import zero_shot  # noqa: E402
from vlmjax.losses import contrastive  # noqa: E402
from vlmjax.models.two_towers import TwoTowers  # noqa: E402
from vlmjax.train import step as step_lib  # noqa: E402

BASE = dict(image=dict(patch_size=8, width=96, depth=3, num_heads=4, mlp_dim=384, pool="map"),
            text=dict(vocab_size=1000, max_len=24, width=64, depth=2, num_heads=2, mlp_dim=256,
                      pool="last"),
            embed_dim=64, temperature_init=10.0, bias_init=-10.0)
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
}


def _example(args):
    spec, index = args
    example = shapes_examples.make_example(spec, index)
    image = np.asarray(Image.open(io.BytesIO(example["image"])).convert("RGB"))
    return image, list(example["captions"]), int(example["label"])


def generate(split: str, size: int, image_size: int, workers: int):
    spec = shapes_examples.ExampleSpec(split=split, image_size=image_size, seed=0)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        out = pool.map(_example, [(spec, i) for i in range(size)], chunksize=256)
    images = np.stack([o[0] for o in out])
    return images, [o[1] for o in out], np.array([o[2] for o in out])


def merge(base: dict, change: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in change.items():
        if isinstance(value, dict):
            out[key].update(value)
        elif key in out:
            out[key] = value
    return out


def run_variant(name, change, data, tokenizer, args):
    model_cfg = merge(BASE, change)
    if change.get("loss") == "clip":
        model_cfg.update(temperature_init=1 / 0.07, bias_init=None)
    model = TwoTowers(**model_cfg)
    batch, lr = change.get("batch", args.batch), change.get("lr", args.lr)
    images, texts, text_mask, test_images, test_labels = data
    params = model.init(jax.random.PRNGKey(0), images[:1], texts[:1, 0])["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    schedule = optax.join_schedules([optax.linear_schedule(0, lr, args.warmup),
                                     optax.cosine_decay_schedule(lr, args.steps - args.warmup,
                                                                 alpha=0.01)], [args.warmup])
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b2=0.95, weight_decay=1e-4,
                                 mask=jax.tree.map(lambda x: x.ndim >= 2, params)))

    def loss_fn(p, b, rng):
        zimg, ztxt, out = model.apply({"params": p}, b["image"], b["text"], b["text_mask"])
        if change.get("loss") == "clip":
            return contrastive.clip_loss(zimg, ztxt, out["temperature"]), {}
        return contrastive.siglip_loss(zimg, ztxt, out["temperature"], out["bias"]), {}

    train_step = step_lib.make_train_step(loss_fn, tx, schedule)

    @jax.jit
    def step(state, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, images.shape[0])
        cap = jax.random.randint(k2, (batch,), 0, texts.shape[1])
        b = {"image": images[idx], "text": texts[idx, cap], "text_mask": text_mask[idx, cap]}
        return train_step(state, b)

    class_ids, class_mask = tokenizer_batch(tokenizer, [t.format(n) for n in shapes_scene.CLASS_NAMES
                                                        for t in zero_shot.VLM_SHAPES_TEMPLATES])
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    encode_text = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m,
                                                      method=model.encode_text))

    def evaluate(p):
        zcls = np.asarray(encode_text(p, class_ids, class_mask)).reshape(
            len(shapes_scene.CLASS_NAMES), len(zero_shot.VLM_SHAPES_TEMPLATES), -1).mean(1)
        zcls /= np.linalg.norm(zcls, axis=-1, keepdims=True)
        zimg = np.concatenate([np.asarray(encode_image(p, test_images[i:i + 500]))
                               for i in range(0, len(test_images), 500)])
        return zero_shot.topk_accuracy(zimg, test_labels, zcls, (1,))["top1"]

    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    curve, start = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        state, _ = step(state, sub)
        if i % args.eval_every == 0 or i == args.steps:
            curve.append((i, i * batch, evaluate(state.params)))
    seconds = time.perf_counter() - start
    print(f"| {name} | {batch} | {lr:g} | " + " | ".join(
        f"{s} ({e // 1000}k): {acc:.1%}" for s, e, acc in curve) + f" | {seconds:.0f} s |",
        flush=True)


def tokenizer_batch(tokenizer, texts, max_len=24):
    ids, mask = tokenizer.encode_batch(texts, max_len, eos="sticky")
    return jnp.asarray(ids), jnp.asarray(mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_size", type=int, default=50_000)
    parser.add_argument("--test_size", type=int, default=2_000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--variants", default="base")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.steps, args.eval_every = 512, 256, 4, 2
        args.batch, args.warmup, args.workers = 32, 1, 2
    start = time.perf_counter()
    train_images, train_captions, _ = generate("train", args.train_size, args.image_size,
                                               args.workers)
    test_images, _, test_labels = generate("test", args.test_size, args.image_size, args.workers)
    keep = test_labels >= 0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizers.train_sentencepiece(
            [c for caps in train_captions[:20_000] for c in caps], os.path.join(tmp, "sp.model"))
    ids, mask = tokenizer.encode_batch([c for caps in train_captions for c in caps], 24,
                                       eos="sticky")
    n_caps = len(train_captions[0])
    to_float = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1.0  # noqa: E731
    data = (to_float(train_images), jnp.asarray(ids.reshape(len(train_captions), n_caps, -1)),
            jnp.asarray(mask.reshape(len(train_captions), n_caps, -1)),
            to_float(test_images[keep]), test_labels[keep])
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; data in "
          f"{time.perf_counter() - start:.0f} s; zero-shot top-1 on {keep.sum()} single-object "
          "test images at step (examples seen)")
    print("| variant | batch | lr | accuracy over training | train time |")
    print("|---|---|---|---|---|")
    for name in args.variants.split(","):
        run_variant(name, VARIANTS[name], data, tokenizer, args)


if __name__ == "__main__":
    main()
