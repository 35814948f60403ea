"""Largest per-device batch under a memory budget for each remat policy, from XLA's compiled
memory analysis of the full train step (SigLIP loss, AdamW, state donated). Nothing is run or
allocated: every probe is an ahead-of-time compile against abstract shapes.

Peak = arguments + outputs - donated (aliased) buffers + temporaries, per device. Memory grows
linearly in the batch, so two compiles give the line, a third checks the predicted maximum and a
few more step to the exact multiple of `--multiple`.

    python benchmarks/memory.py                         # ViT-S/16 towers, 8 GiB budget (CPU)
    python benchmarks/memory.py --shape vit_b16 --dtype bfloat16   # GPU: 90% of device memory
    python benchmarks/memory.py --quick                 # CI: tiny shape, small budget
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402
from vlmjax.models.layers import REMAT_POLICIES  # noqa: E402

GIB = 2 ** 30

HEADER = ("| remat | layers | max batch / device | peak MiB | temp MiB | fixed MiB | "
          "MiB / example | peak without donation MiB | compiles |")
MIB = 2 ** 20
# --quick: micro widths, but deep enough (4 blocks) that remat has something to save.
QUICK_SHAPE = common.Shape("micro_deep", lambda: common.siglip_towers(
    32, 4, 2, 128, patch=8, text_len=8, vocab=100), 32, 8, 8, 8)


def analyse(shape, batch: int, dtype: str, remat: str, scan: bool) -> dict:
    bench = common.make_bench(shape, batch_per_device=batch, dtype=dtype, remat=remat, scan=scan,
                              init_state=False)
    m = common.compile_step(bench)[1].memory_analysis()
    resident = m.argument_size_in_bytes + m.output_size_in_bytes
    return dict(peak=resident - m.alias_size_in_bytes + m.temp_size_in_bytes,
                undonated=resident + m.temp_size_in_bytes, temp=m.temp_size_in_bytes)


def largest_batch(shape, dtype: str, remat: str, scan: bool, budget: float, multiple: int,
                  probe: tuple[int, int]) -> dict:
    cache = {}

    def peak_of(batch):
        if batch not in cache:
            cache[batch] = analyse(shape, batch, dtype, remat, scan)
            if os.environ.get("MEMORY_VERBOSE"):
                print(f"  batch {batch}: {cache[batch]['peak'] / MIB:.1f} MiB", flush=True)
        return cache[batch]["peak"]

    # Secant search: a line through the two largest batches measured so far predicts the
    # largest batch under the budget; the result is bracketed [fits, does not fit] to `multiple`.
    fits, fails = 0, None
    for batch in probe:
        if peak_of(batch) <= budget:
            fits = max(fits, batch)
        else:
            fails = batch if fails is None else min(fails, batch)
    while fails is None or fails - fits > multiple:
        (b0, p0), (b1, p1) = sorted((b, cache[b]["peak"]) for b in cache)[-2:]
        guess = int(b1 + (budget - p1) * (b1 - b0) / max(p1 - p0, 1)) // multiple * multiple
        upper = fails - multiple if fails is not None else max(guess, fits + multiple)
        batch = min(max(guess, fits + multiple), upper)
        if peak_of(batch) <= budget:
            fits = batch
        else:
            fails = batch
    far = max(fits, probe[1])  # the widest span measured gives the slope
    per_example = (cache[far]["peak"] - cache[probe[0]]["peak"]) / (far - probe[0])
    return dict(batch=fits, at=cache[fits or probe[0]], per_example=per_example,
                fixed=cache[probe[0]]["peak"] - per_example * probe[0], compiles=len(cache))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="vit_s16", help=f"one of {sorted(common.SHAPES)}")
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--budget_gib", type=float, default=0.0,
                        help="per-device budget (0: 90%% of the device's memory on GPU/TPU, "
                             "8 GiB on CPU)")
    parser.add_argument("--layouts", default="scan", help="comma-separated: scan, unrolled")
    parser.add_argument("--remat", default=",".join(REMAT_POLICIES))
    parser.add_argument("--multiple", type=int, default=8, help="batch granularity")
    parser.add_argument("--probe", default="8,16", help="the two batches that fit the line")
    parser.add_argument("--quick", action="store_true",
                        help="CI: micro shape (4 blocks), 32 MiB budget")
    args = parser.parse_args(argv)
    shape = common.SHAPES.get(args.shape)
    if args.quick:
        shape, args.budget_gib, args.multiple, args.probe = QUICK_SHAPE, 1 / 32, 32, "32,64"
    if shape is None:
        sys.exit(f"unknown shape {args.shape!r}; valid: {sorted(common.SHAPES)}")
    budget = args.budget_gib * GIB
    if not budget:
        stats = jax.devices()[0].memory_stats() or {}
        budget = 0.9 * stats["bytes_limit"] if "bytes_limit" in stats else 8 * GIB
    probe = tuple(int(v) for v in args.probe.split(","))

    print(f"# {common.machine_line()}")
    print(f"# {shape.name} ({args.dtype}), per-device budget {budget / GIB:.2f} GiB, batch in "
          f"multiples of {args.multiple}; XLA compiled memory analysis of the train step")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for layout in args.layouts.split(","):
        if layout not in ("scan", "unrolled"):
            sys.exit(f"layout {layout!r} is not one of scan, unrolled")
        for remat in args.remat.split(","):
            r = largest_batch(shape, args.dtype, remat, layout == "scan", budget, args.multiple,
                              probe)
            at = r["at"]
            print(f"| {remat} | {layout} | {r['batch']} | {at['peak'] / MIB:.0f} | "
                  f"{at['temp'] / MIB:.0f} | {r['fixed'] / MIB:.0f} | "
                  f"{r['per_example'] / MIB:.2f} | {at['undonated'] / MIB:.0f} | "
                  f"{r['compiles']} |", flush=True)


if __name__ == "__main__":
    main()
