"""Communication volume of the contrastive losses, read from XLA's compiled HLO.

    python benchmarks/measure_comm.py [--b 1024 --d 768]   # prints the README table

For `jit(value_and_grad(loss))` over N devices (each with b rows of width D, float32) it sums,
per device, the bytes each collective moves in (ring algorithms), counting an op inside a while
loop once per iteration (XLA's known trip count):
  all-gather (N-1)/N x result, reduce-scatter (N-1) x result, all-reduce 2(N-1)/N x operand,
  collective-permute and all-to-all: the result.
Scalar collectives (the loss and the temperature/bias gradients) are counted apart.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "pred": 1}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_OP = re.compile(r"=\s*(\(.*?\)|[\w\[\],{}:\d ]+?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def _shape_bytes(text: str) -> list[int]:
    return [DTYPE_BYTES[t] * eval("*".join(d.split(",")) or "1")  # noqa: S307 (digits only)
            for t, d in _SHAPE.findall(text) if t in DTYPE_BYTES]


def _group_size(line: str, default: int) -> int:
    groups = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    return int(iota.group(2)) if iota else default


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
    """{kind: bytes per device, 'scalars': bytes of scalar collectives} for one execution."""
    ops, whiles, current = defaultdict(list), [], None
    for line in hlo.splitlines():
        start = _COMPUTATION.match(line)
        if start and line.rstrip().endswith("{"):
            current = start.group(1)
            continue
        if " while(" in line:
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            whiles.append((current, body, int(trips.group(1)) if trips else 1))
        op = _OP.search(line)
        if op and "-done" not in line:
            kind, sizes = op.group(2), _shape_bytes(op.group(1))
            n = _group_size(line, num_devices)
            factor = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                      "all-reduce": 2 * (n - 1) / n}.get(kind, 1.0)
            if kind == "collective-permute" and "source_target_pairs={}" in line:
                factor = 0.0
            scalar = all(s <= 8 for s in sizes)
            ops[current].append(("scalars" if scalar else kind, factor * sum(sizes)))
    repeats = defaultdict(lambda: 1)
    for _ in range(len(whiles)):  # nested loops: propagate until stable
        for parent, body, trips in whiles:
            repeats[body] = repeats[parent] * trips
    totals = defaultdict(float)
    for computation, entries in ops.items():
        for kind, size in entries:
            totals[kind] += size * repeats[computation]
    return dict(totals)


def loss_collectives(name: str, impl: str, n: int, b: int, d: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vlmjax.losses import contrastive
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
    rows = jax.ShapeDtypeStruct((n * b, d), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    if name == "clip":
        def loss(zimg, ztxt, t, bias):
            return contrastive.clip_loss(zimg, ztxt, t, mesh=mesh, batch_axes=("data",))
    else:
        def loss(zimg, ztxt, t, bias):
            return contrastive.siglip_loss(zimg, ztxt, t, bias, mesh=mesh, batch_axes=("data",),
                                           impl=impl)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    hlo = step.lower(rows, rows, scalar, scalar).compile().as_text()
    return collective_bytes(hlo, n)


LOSSES = (("siglip", "all_gather"), ("siglip", "ppermute"), ("siglip", "ppermute_bidir"),
          ("clip", "all_gather"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b", type=int, default=1024, help="rows per device")
    parser.add_argument("--d", type=int, default=768, help="embedding width")
    parser.add_argument("--devices", default="2,4,8")
    args = parser.parse_args()
    counts = [int(n) for n in args.devices.split(",")]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={max(counts)}")
    unit = args.b * args.d * 4  # one device's b x D float32 chunk
    print(f"per-device bytes moved by jit(value_and_grad(loss)), b={args.b}, D={args.d}, "
          f"float32; in units of one b x D chunk ({unit / 2**20:.2f} MiB) and MiB")
    print("| loss | collectives | " + " | ".join(f"N={n}" for n in counts) + " |")
    print("|---|---|" + "---|" * len(counts))
    for name, impl in LOSSES:
        cells, kinds = [], set()
        for n in counts:
            volume = loss_collectives(name, impl, n, args.b, args.d)
            kinds |= {k for k in volume if k != "scalars"}
            moved = sum(v for k, v in volume.items() if k != "scalars")
            cells.append(f"{moved / unit:.2f} ({moved / 2**20:.1f} MiB)")
        label = f"{name}/{impl}" if name == "siglip" else name
        print(f"| {label} | {', '.join(sorted(kinds))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
