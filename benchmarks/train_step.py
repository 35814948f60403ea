"""Training throughput and MFU of SigLIP two-tower shapes, and the effect of the efficiency
switches, measured in one run.

Table 1, one row per shape: parameters, analytic model FLOPs per example (forward + backward,
`vlmjax.train.flops`), compile time, median step time over the timed steps after warm-up,
examples/s, achieved FLOP/s and MFU. MFU's denominator is measured in the same run: on CPU the
median rate of a large float32 matmul through JAX; on GPU/TPU the device's data-sheet bf16 peak
(the measured matmul rate is printed beside it).
Table 2, one row per switch setting on one shape: layers scanned, remat policy, fused attention,
bfloat16 compute, and where batches come from (`device`: one batch kept on device; `host`: fresh
host batches transferred in the loop; `prefetch`: the same through the device prefetcher).

    python benchmarks/train_step.py                          # CPU: tiny, ViT-S/16, ViT-B/16
    python benchmarks/train_step.py --dtype bfloat16 --large # GPU/TPU: + ViT-L/16, So400m/14
    python benchmarks/train_step.py --quick                  # CI: tiny shape, a few steps
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402

SWITCH_VARIANTS = ("base", "scan", "scan+remat=full", "scan+remat=save-dots", "fused",
                   "dtype=bfloat16", "data=host", "data=prefetch")
QUICK_VARIANTS = ("base", "scan+remat=save-dots+fused", "data=prefetch")
HEADER = ("| shape | dtype | batch | params | GFLOP/example | compile s | step ms | examples/s | "
          "TFLOP/s | peak TFLOP/s | MFU |")
SWITCH_HEADER = ("| switches | scan | remat | attention | dtype | data | compile s | step ms | "
                 "examples/s | peak TFLOP/s | MFU |")


def parse_variant(text: str, dtype: str) -> dict:
    """'scan+remat=full+data=prefetch' -> switch settings (unnamed ones at their defaults)."""
    out = dict(scan=False, remat="none", fused_attention=False, dtype=dtype, data="device")
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key == "base":
            continue
        if key == "scan":
            out["scan"] = True
        elif key == "fused":
            out["fused_attention"] = True
        elif key in ("remat", "dtype", "data") and value:
            out[key] = value
        else:
            raise SystemExit(f"unknown switch {part!r} in variant {text!r}; valid: base, scan, "
                             "fused, remat=none|full|save-dots, dtype=float32|bfloat16, "
                             f"data={'|'.join(common.DATA_MODES)}")
    return out


_COMPILED: dict = {}  # switch settings -> (bench, compile seconds, executable): the data
                      # mode does not change the program, so its rows share one compile


def run(shape: common.Shape, batch: int, switches: dict, warmup: int, steps: int, peak: float):
    """One row. On CPU the matmul peak is measured again right before the row's steps: a shared
    machine's load drifts within a run, and MFU must compare like with like."""
    key = (shape.name, batch, switches["dtype"], switches["remat"], switches["scan"],
           switches["fused_attention"])
    if key not in _COMPILED:
        bench = common.make_bench(shape, batch_per_device=batch, dtype=switches["dtype"],
                                  remat=switches["remat"], scan=switches["scan"],
                                  fused_attention=switches["fused_attention"])
        _COMPILED[key] = (bench, *common.compile_step(bench))
    bench, compile_s, compiled = _COMPILED[key]
    if not common.on_accelerator():
        peak = common.peak_flops("float32")["peak"]
    batch_iter, close = common.batches(bench, switches["data"],
                                       bench.model_config["text"]["vocab_size"])
    try:
        bench.state, times = common.time_steps(compiled, bench.state, batch_iter, warmup=warmup,
                                               steps=steps)  # the old state was donated
    finally:
        close()
    step_s = common.median(times)
    examples_s = bench.batch_size / step_s
    achieved = bench.flops_per_example * examples_s
    return dict(bench=bench, compile_s=compile_s, step_ms=step_s * 1e3, examples_s=examples_s,
                tflops=achieved / 1e12, peak=peak / 1e12,
                mfu=achieved / (peak * bench.mesh.size))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(common.DEFAULT_SHAPES),
                        help=f"comma-separated, of {sorted(common.SHAPES)}")
    parser.add_argument("--large", action="store_true",
                        help=f"add {', '.join(common.LARGE_SHAPES)} (accelerators)")
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--batch", type=int, default=0,
                        help="per-device batch for every shape (0: the shape's CPU or "
                             "accelerator default)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--switch_shape", default="vit_s16",
                        help="shape of the switch table ('' = no switch table)")
    parser.add_argument("--switch_batch", type=int, default=0,
                        help="per-device batch of the switch table (0: CPU 4, else default)")
    parser.add_argument("--variants", default=",".join(SWITCH_VARIANTS),
                        help="switch-table rows, e.g. 'base,scan+remat=full,data=prefetch'")
    parser.add_argument("--quick", action="store_true",
                        help="CI: the tiny shape at batch 16, 3 steps; a few switch rows on a "
                             "micro shape")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.batch, args.steps, args.warmup = "tiny", 16, 3, 1
        args.switch_shape, args.switch_batch = "micro", 16
        args.variants = ",".join(QUICK_VARIANTS)
    names = [n for n in args.shapes.split(",") if n] + (
        list(common.LARGE_SHAPES) if args.large else [])
    unknown = [n for n in names + [args.switch_shape] if n and n not in common.SHAPES]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; valid: {sorted(common.SHAPES)}")
    accelerator = common.on_accelerator()

    def default_batch(shape):
        return args.batch or (shape.accel_batch if accelerator else shape.cpu_batch)

    peak = common.peak_flops(args.dtype)
    print(f"# {common.machine_line()}")
    print(f"# MFU denominator: {peak['peak'] / 1e12:.3f} TFLOP/s per device ({peak['source']}"
          f"{'; on CPU measured again before every row' if not accelerator else ''}); "
          f"measured {args.dtype if accelerator else 'float32'} matmul: "
          f"{peak['measured'] / 1e12:.3f} TFLOP/s")
    print(f"# median of {args.steps} timed steps after {args.warmup} warm-up; SigLIP loss, "
          "AdamW, state donated; batch = per device x devices")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for name in names:
        shape = common.SHAPES[name]
        r = run(shape, default_batch(shape), parse_variant("base", args.dtype), args.warmup,
                args.steps, peak["peak"])
        b = r["bench"]
        print(f"| {name} | {args.dtype} | {b.batch_size} | {b.params / 1e6:.1f}M | "
              f"{b.flops_per_example / 1e9:.2f} | {r['compile_s']:.1f} | {r['step_ms']:.0f} | "
              f"{r['examples_s']:.1f} | {r['tflops']:.3f} | {r['peak']:.3f} | "
              f"{100 * r['mfu']:.1f}% |", flush=True)

    if not args.switch_shape:
        return
    shape = common.SHAPES[args.switch_shape]
    batch = args.switch_batch or (4 if not accelerator else default_batch(shape))
    print(f"\n# switches on {args.switch_shape}, per-device batch {batch}")
    print(SWITCH_HEADER)
    print("|" + "---|" * (SWITCH_HEADER.count("|") - 1))
    for variant in args.variants.split(","):
        switches = parse_variant(variant, args.dtype)
        r = run(shape, batch, switches, args.warmup, args.steps, peak["peak"])
        attention = "dot_product_attention" if switches["fused_attention"] else "einsum"
        print(f"| {variant} | {'yes' if switches['scan'] else 'no'} | {switches['remat']} | "
              f"{attention} | {switches['dtype']} | {switches['data']} | {r['compile_s']:.1f} | "
              f"{r['step_ms']:.0f} | {r['examples_s']:.1f} | {r['peak']:.3f} | "
              f"{100 * r['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
