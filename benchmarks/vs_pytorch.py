"""vlmjax against PyTorch (HF transformers' SiglipModel) on the same SigLIP two-tower shape.

Both sides: random init, the same widths, depths, patching and text length, the same batch,
SigLIP's sigmoid loss, AdamW (no clipping), float32, the same thread count. They are timed in
one process, alternating in rounds, so machine load affects both alike. Before the steps, a
float32 2048^3 matmul is timed through JAX and through torch (GFLOP/s): what each side's
matmul kernel reaches on this machine. `--variants` times several vlmjax variants (XLA:CPU
compiler options, model switches; VARIANTS) in the same rounds. The last line is
`ratio vlmjax/pytorch examples/s: X` for the first variant.

    python benchmarks/vs_pytorch.py                      # ViT-S/16 towers, batch 16
    python benchmarks/vs_pytorch.py --quick              # CI: tiny towers, a few steps
    python benchmarks/vs_pytorch.py --variants base,bhlk,eigen   # A/B in one run
    python benchmarks/vs_pytorch.py --profile /tmp/prof  # + a jax.profiler trace summary
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from vlmjax.convert.hf import model_config_from_hf  # noqa: E402
from vlmjax.train import flops  # noqa: E402

# vlmjax variants `--variants` can compare in one run: (tower fields set on both towers,
# XLA compiler options of the step's compile). "base" is what vlmjax does by default.
VARIANTS = {
    "base": ({}, {}),
    # Attention in [B, H, L, K] with one QKV matmul (the default is [B, L, H, K], whose
    # activations carry the mesh's sharding constraints).
    "bhlk": ({"attention_layout": "BHLK"}, {}),
    # XLA:CPU's own dot emitter (Eigen) instead of its default YNNPACK dot fusions.
    "eigen": ({}, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    # YNNPACK fusions that also take the elementwise ops (bias, GELU) / reductions round a dot.
    "ynn_eltwise": ({}, {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}),
    "ynn_eltwise_reduce": ({}, {"xla_cpu_experimental_ynn_fusion_type":
                                "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,"
                                "LIBRARY_FUSION_TYPE_REDUCE"}),
    # Unsafe float math (reassociation, approximate functions): measured, not a default.
    "fast_math": ({}, {"xla_cpu_enable_fast_math": True}),
    "concurrency_scheduler": ({}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
}


def torch_matmul_flops(size: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of a float32 size^3 matmul through torch (its threads as set)."""
    a = torch.randn(size, size)
    torch.mm(a, a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, a)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)

def hf_config(shape: common.Shape):
    """SiglipConfig with the shape's widths, depths, patching and text length; checked to map
    back (through vlmjax's HF converter) onto exactly the vlmjax model benchmarked."""
    from transformers import SiglipConfig
    model = shape.model()
    image, text = model["image"], model["text"]
    act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
    config = SiglipConfig(
        vision_config=dict(hidden_size=image["width"], intermediate_size=image["mlp_dim"],
                           num_hidden_layers=image["depth"], num_attention_heads=image["num_heads"],
                           image_size=shape.image_size, patch_size=image["patch_size"],
                           hidden_act=act[image["activation"]], layer_norm_eps=1e-6),
        text_config=dict(vocab_size=text["vocab_size"], hidden_size=text["width"],
                         intermediate_size=text["mlp_dim"], num_hidden_layers=text["depth"],
                         num_attention_heads=text["num_heads"], max_position_embeddings=shape.text_len,
                         hidden_act=act[text["activation"]], layer_norm_eps=1e-6,
                         projection_size=model["embed_dim"], pad_token_id=1, bos_token_id=0,
                         eos_token_id=1))
    ours, _ = model_config_from_hf(config.to_dict())
    for tower in ("image", "text"):
        for key, value in model[tower].items():
            if ours[tower].get(key, value) != value:
                raise AssertionError(f"HF config differs from vlmjax {tower}.{key}: "
                                     f"{ours[tower][key]} vs {value}")
    return config


class TorchSide:
    def __init__(self, shape: common.Shape, batch: int, threads: int):
        from transformers import SiglipModel
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.model = SiglipModel(hf_config(shape)).train()
        self.attention = self.model.config._attn_implementation
        try:  # torch's fastest AdamW on CPU where available
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                               weight_decay=1e-4, fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                               weight_decay=1e-4, foreach=True)
        rng = np.random.default_rng(0)
        self.pixels = torch.from_numpy(rng.standard_normal(
            (batch, 3, shape.image_size, shape.image_size), dtype=np.float32))
        self.ids = torch.from_numpy(rng.integers(0, shape.model()["text"]["vocab_size"],
                                                 (batch, shape.text_len))).long()
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, pixel_values=self.pixels, return_loss=True).loss
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


class JaxSide:
    def __init__(self, shape: common.Shape, batch: int, variant: str = "base"):
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not one of {sorted(VARIANTS)}")
        fields, self.compiler_options = VARIANTS[variant]
        if fields:  # the same towers with the variant's switches on both
            model = shape.model
            shape = dataclasses.replace(shape, model=lambda: {
                **model(), **{t: {**model()[t], **fields} for t in ("image", "text")}})
        self.variant = variant
        self.bench = common.make_bench(shape, batch_per_device=batch)
        start = time.perf_counter()
        lowered = self.bench.step.lower(self.bench.state, self.bench.abstract_batch())
        self.compiled = lowered.compile(compiler_options=self.compiler_options or None)
        self.compile_s = time.perf_counter() - start
        self.batches, _ = common.batches(self.bench, "device",
                                         self.bench.model_config["text"]["vocab_size"])
        self.batch = next(self.batches)

    def step(self):
        self.bench.state, metrics = self.compiled(self.bench.state, self.batch)
        return float(metrics["loss"])  # waits for the step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_summary(jax_side: JaxSide, directory: str, steps: int = 3, top: int = 12):
    """Trace a few vlmjax steps with jax.profiler and print where the time goes."""
    import profile_summary as summary
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            jax_side.step()
    summary.print_summary(directory, top=top)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="vit_s16", help=f"one of {sorted(common.SHAPES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: the cores this process may use, as XLA does)")
    parser.add_argument("--profile", default="", help="directory for a jax.profiler trace "
                        "(of the first variant)")
    parser.add_argument("--variants", default="base",
                        help=f"comma-separated vlmjax variants timed in the same rounds: "
                             f"{sorted(VARIANTS)}; the ratio line is the first one's")
    parser.add_argument("--quick", action="store_true", help="CI: micro towers, a few steps")
    args = parser.parse_args(argv)
    if common.on_accelerator():
        print("# note: PyTorch runs on the CPU here; this comparison is meant for CPU runs")
    shape = common.MICRO if args.quick else common.SHAPES[args.shape]
    if args.quick:
        args.batch, args.rounds, args.steps = 8, 2, 2
    threads = args.threads or len(os.sched_getaffinity(0))

    variants = args.variants.split(",")
    jax_sides = [JaxSide(shape, args.batch, variant) for variant in variants]
    torch_side = TorchSide(shape, args.batch, threads)
    # The matmul kernels alone, before the steps (the same threads as the steps use).
    jax_matmul, torch_matmul = flops.measure_matmul_flops(2048, repeats=7), torch_matmul_flops()
    for side in (*jax_sides, torch_side):
        side.step()  # warm-up
    jax_times, torch_times = {v: [] for v in variants}, []
    for _ in range(args.rounds):
        for side in jax_sides:
            jax_times[side.variant] += [timed(side.step) for _ in range(args.steps)]
        torch_times += [timed(torch_side.step) for _ in range(args.steps)]
        print("# round: " + ", ".join(f"{v} {t[-1] * 1e3:.0f} ms" for v, t in
                                      (*jax_times.items(), ("torch", torch_times))),
              file=sys.stderr, flush=True)  # progress of long runs on a loaded machine

    torch_s = common.median(torch_times)
    print(f"# {common.machine_line()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads, attention {torch_side.attention})")
    print(f"# shape {shape.name}: batch {args.batch}, image {shape.image_size}, text length "
          f"{shape.text_len}, float32, SigLIP loss, AdamW; {args.rounds} alternating rounds of "
          f"{args.steps} steps, median step time")
    print("| framework | params | step ms | examples/s | vs PyTorch |")
    print("|---|---|---|---|---|")
    for side in jax_sides:
        jax_s = common.median(jax_times[side.variant])
        name = "" if len(variants) == 1 else f" {side.variant}"
        print(f"| vlmjax{name} (jax {jax.__version__}) | {side.bench.params / 1e6:.2f}M | "
              f"{jax_s * 1e3:.0f} | {args.batch / jax_s:.1f} | {torch_s / jax_s:.2f} |")
    print(f"| PyTorch {torch.__version__} (HF SiglipModel) | {torch_side.params / 1e6:.2f}M | "
          f"{torch_s * 1e3:.0f} | {args.batch / torch_s:.1f} | 1.00 |")
    if args.profile:
        profile_summary(jax_sides[0], args.profile)
    jax_s = common.median(jax_times[variants[0]])
    # The kernels' rates right beside the ratio (the last line, which CI parses, stays alone).
    print(f"float32 2048^3 matmul GFLOP/s: jax {jax_matmul / 1e9:.0f}, torch "
          f"{torch_matmul / 1e9:.0f}")
    print(f"ratio vlmjax/pytorch examples/s: {torch_s / jax_s:.2f}")


if __name__ == "__main__":
    main()
