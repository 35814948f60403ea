"""Shared pieces of the training benchmarks: model shapes, a jitted SigLIP train step with AdamW,
synthetic batches (on device, or from a host pipeline with or without device prefetch), timing.

Used by train_step.py, vs_pytorch.py and memory.py (run as scripts: this folder is on sys.path).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlmjax import config as config_lib
from vlmjax import sharding
from vlmjax.train import flops, optim, prefetch, step as step_lib
from vlmjax.train.tasks.contrastive import ContrastiveTask

from vlmjax.models.layers import DTYPES  # one table: config name -> compute dtype
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def siglip_towers(width: int, depth: int, heads: int, mlp: int, patch: int = 16,
                  text_len: int = 64, vocab: int = 32_000) -> dict:
    """A SigLIP two-tower model (HF SiglipModel layout): MAP-pooled ViT without projection,
    bidirectional text tower pooled at the last token with a biased projection."""
    tower = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, activation="gelu_tanh")
    return dict(image=dict(tower, patch_size=patch, pool="map", posemb="learn"),
                text=dict(tower, vocab_size=vocab, max_len=text_len, pool="last"),
                embed_dim=width, image_projection=False, text_projection=True,
                text_projection_bias=True, temperature_init=10.0, bias_init=-10.0)


def tiny_model() -> dict:
    """The transformer model of configs/siglip/tiny.py (its ViT preset, the demo's model before
    the CNN recipe; the scan/remat/attention switches need transformer towers)."""
    config = config_lib.load_config(os.path.join(REPO, "configs/siglip/tiny.py") +
                                    ":image=vit,text_depth=2")
    model = config.model.to_dict()
    model.pop("dtype", None)
    return model


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    model: Callable[[], dict]
    image_size: int
    text_len: int
    cpu_batch: int      # per device, fits and runs in reasonable time on a 2-core CPU
    accel_batch: int    # per device, for GPU/TPU


SHAPES = {s.name: s for s in (
    Shape("tiny", tiny_model, 64, 24, 128, 2048),
    Shape("vit_s16", lambda: siglip_towers(384, 12, 6, 1536), 224, 64, 8, 512),
    Shape("vit_b16", lambda: siglip_towers(768, 12, 12, 3072), 224, 64, 4, 256),
    # --large (accelerators): ViT-L/16 and SoViT-400m/14 two-towers.
    Shape("vit_l16", lambda: siglip_towers(1024, 24, 16, 4096), 224, 64, 4, 128),
    Shape("so400m14", lambda: siglip_towers(1152, 27, 16, 4304, patch=14), 224, 64, 4, 64),
)}
DEFAULT_SHAPES = ("tiny", "vit_s16", "vit_b16")
# --quick (CI): one block per tower at 32 px, compiles in seconds.
MICRO = Shape("micro", lambda: siglip_towers(32, 1, 2, 64, patch=8, text_len=8, vocab=100),
              32, 8, 8, 8)
SHAPES[MICRO.name] = MICRO
LARGE_SHAPES = ("vit_l16", "so400m14")


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def with_switches(model: dict, *, remat: str = "none", scan: bool = False,
                  fused_attention: bool = False) -> dict:
    """The model config with the efficiency switches set on both towers."""
    switches = dict(remat=remat, scan_layers=scan, fused_attention=fused_attention)
    return {**model, "image": {**model["image"], **switches}, "text": {**model["text"], **switches}}


@dataclasses.dataclass
class Bench:
    """Everything needed to run and report one configuration's train step."""
    model_config: dict
    mesh: Any
    state: step_lib.TrainState
    step: Any                 # jitted, state donated
    batch_size: int           # global
    image_size: int
    text_len: int
    params: int
    flops_per_example: float  # analytic, forward + backward

    def abstract_batch(self):
        batch_sharding = sharding.batch_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                for k, v in host_batch_spec(self.batch_size, self.image_size,
                                            self.text_len).items()}


def host_batch_spec(batch: int, image_size: int, text_len: int) -> dict:
    return {"image": np.zeros((batch, image_size, image_size, 3), np.float32),
            "text": np.zeros((batch, text_len), np.int32),
            "text_mask": np.ones((batch, text_len), bool)}


def make_bench(shape: Shape, *, batch_per_device: int, dtype: str = "float32",
               remat: str = "none", scan: bool = False, fused_attention: bool = False,
               donate: bool = True, init_state: bool = True) -> Bench:
    """The contrastive task's SigLIP loss + AdamW (constant lr, no clipping) through the
    trainer's train step, for `shape`, data parallel over all devices. `init_state=False` leaves
    the state abstract (for memory analysis only)."""
    mesh = sharding.make_mesh({"data": -1})
    model_config = with_switches(shape.model(), remat=remat, scan=scan,
                                 fused_attention=fused_attention)
    batch_size = batch_per_device * mesh.size
    task = ContrastiveTask(ml_collections.ConfigDict(dict(
        model={**model_config, "dtype": dtype},
        loss=dict(name="siglip", impl="dense" if mesh.size == 1 else "ppermute"),
        data=dict(source="vlm_shapes", split="train"),  # never read: batches are synthetic
        input=dict(image_size=shape.image_size, max_text_len=shape.text_len))), mesh)

    def init_params(rng):
        return nn.meta.unbox(task.init_params(rng))

    abstract_params = jax.eval_shape(init_params, jax.random.key(0))
    optim_config = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, schedule="constant", weight_decay=1e-4, clip_norm=0.0))
    tx, schedule = optim.make_optimizer(optim_config, 1000, abstract_params)
    replicated = NamedSharding(mesh, P())

    def make_state(rng):
        return step_lib.init_state(init_params(rng), tx, jax.random.key_data(rng))

    if init_state:
        state = jax.jit(make_state, out_shardings=replicated)(jax.random.key(0))
    else:
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                             jax.eval_shape(make_state, jax.random.key(0)))
    step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=mesh),
                   donate_argnums=0 if donate else ())
    return Bench(model_config, mesh, state, step, batch_size, shape.image_size, shape.text_len,
                 sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)),
                 flops.two_towers_train_flops_per_example(model_config, shape.image_size,
                                                          shape.text_len, batch_size))


# ------------------------------------------------------------------------------------ input
class SyntheticHostInput:
    """Fresh host batches with some per-batch host work, like a decoded input pipeline's
    output stage: uint8 pixels -> random flip -> float32 in [-1, 1], random token ids."""

    def __init__(self, batch: int, image_size: int, text_len: int, vocab: int, seed: int = 0):
        self.batch, self.image_size, self.text_len, self.vocab = batch, image_size, text_len, vocab
        self.rng = np.random.default_rng(seed)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        pixels = self.rng.integers(0, 256, (self.batch, self.image_size, self.image_size, 3),
                                   dtype=np.uint8)
        flip = self.rng.random(self.batch) < 0.5
        pixels[flip] = pixels[flip, :, ::-1]
        image = pixels.astype(np.float32) * (2 / 255) - 1
        text = self.rng.integers(0, self.vocab, (self.batch, self.text_len), dtype=np.int32)
        self.position += 1
        return {"image": image, "text": text, "text_mask": np.ones(text.shape, bool)}

    def get_state(self) -> dict:
        return {"position": self.position}


DATA_MODES = ("device", "host", "prefetch")


def batches(bench: Bench, mode: str, vocab: int) -> tuple[Iterator[dict], Callable[[], None]]:
    """Global batches for `bench`: `device` = one batch kept on device (no input cost),
    `host` = fresh host batches transferred in the loop, `prefetch` = the same through
    `prefetch.DevicePrefetcher` (the next batch is made and transferred while the step runs).
    Returns the iterator and a close function."""
    to_device = lambda b: sharding.host_batch_to_global(b, bench.mesh)  # noqa: E731
    source = SyntheticHostInput(bench.batch_size, bench.image_size, bench.text_len, vocab)
    if mode == "device":
        fixed = to_device(next(source))
        return iter(lambda: fixed, None), lambda: None
    if mode == "host":
        return map(to_device, source), lambda: None
    if mode == "prefetch":
        prefetcher = prefetch.DevicePrefetcher(source, to_device, size=2)
        return prefetcher, prefetcher.close
    raise ValueError(f"data mode {mode!r} is not one of {DATA_MODES}")


# ----------------------------------------------------------------------------------- timing
def compile_step(bench: Bench):
    """Lower and compile the step (seconds, compiled executable)."""
    start = time.perf_counter()
    compiled = bench.step.lower(bench.state, bench.abstract_batch()).compile()
    return time.perf_counter() - start, compiled


def time_steps(compiled, state, batch_iter, *, warmup: int, steps: int):
    """Per-step wall times (s) of `steps` steps after `warmup`; each step is waited for."""
    times = []
    for i in range(warmup + steps):
        batch = next(batch_iter)
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return state, times


def median(values):
    return statistics.median(values)


def peak_flops(dtype: str) -> dict:
    """The MFU denominator of this machine, measured in this run: on CPU the median rate of a
    large float32 matmul through JAX; on GPU/TPU the data-sheet peak for `dtype`, with the
    measured matmul rate of `dtype` beside it."""
    device = jax.devices()[0]
    if not on_accelerator():
        measured = flops.measure_matmul_flops(2048, jnp.float32, repeats=7)
        return {"peak": measured, "measured": measured,
                "source": "measured float32 2048^3 matmul (median of 7)"}
    measured = flops.measure_matmul_flops(8192, DTYPES[dtype], repeats=10)
    sheet = flops.device_peak_flops(device, dtype)  # the one table: vlmjax/train/flops.py
    return {"peak": sheet or measured, "measured": measured,
            "source": (f"data-sheet {dtype} peak of {device.device_kind}" if sheet else
                       f"measured {dtype} 8192^3 matmul ({device.device_kind} not in the table)")}


def machine_line() -> str:
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), {cores} CPU "
            f"cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
