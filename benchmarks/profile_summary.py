"""Summarise a `jax.profiler.trace(..., create_perfetto_trace=True)` directory: the time of the
XLA operations executed, grouped into kinds (matmuls, convolutions, elementwise fusions, ...)
and the largest single operations.

    python benchmarks/profile_summary.py /tmp/prof [--top 15]
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Host-side bookkeeping of the runtime and Python frames, not XLA work.
_NOT_OPS = re.compile(r"^(\$|end: |PjitFunction|CommonPjRt|Allocate|Handle |ParseArguments|"
                      r"PythonRefManager|Wait for|ThreadpoolListener|ThunkExecutor|TfrtCpu|"
                      r"CreateOutputs|Execute)")


def kind_of(name: str) -> str:
    base = re.sub(r"[._]\d+$", "", name)
    if base.startswith("ynn_fusion") or base.startswith("xnn_fusion") or "dot" in base or \
            base.startswith("onednn") or "matmul" in base or "gemm" in base:
        return "matmul (dot / YNNPACK fusion)"
    if "convolution" in base or base.startswith("conv"):
        return "convolution"
    if base.startswith(("wrapped_", "loop_", "fusion", "input_", "multiply", "add",
                        "subtract", "divide", "exp", "tanh", "select", "compare", "convert",
                        "maximum", "negate", "rsqrt", "log")):
        return "elementwise / loop fusion"
    if "reduce" in base:
        return "reduction"
    if base.startswith(("copy", "transpose", "broadcast", "reshape", "slice", "concatenate",
                        "dynamic", "pad", "gather", "scatter", "bitcast", "iota")):
        return "data movement (copy, transpose, slice, ...)"
    if base.startswith(("while", "call", "conditional", "scan")):
        return "control flow"
    return "other"


def load_events(directory: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}; trace with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def op_times(events: list[dict]) -> collections.Counter:
    """Total microseconds per XLA operation name (complete events on XLA threads)."""
    threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
               for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    times = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or _NOT_OPS.match(e.get("name", "")):
            continue
        if "python" in threads.get((e.get("pid"), e.get("tid")), "").lower():
            continue
        times[e["name"]] += e.get("dur", 0.0)
    return times


def print_summary(directory: str, top: int = 12):
    times = op_times(load_events(directory))
    total = sum(times.values()) or 1.0
    kinds = collections.Counter()
    for name, us in times.items():
        kinds[kind_of(name)] += us
    print(f"# jax.profiler trace {directory}: {total / 1e3:.0f} ms of XLA operations "
          "(summed over threads)")
    print("| kind | ms | share |")
    print("|---|---|---|")
    for kind, us in kinds.most_common():
        print(f"| {kind} | {us / 1e3:.0f} | {100 * us / total:.1f}% |")
    print(f"| top {top} operations | ms | share |")
    for name, us in times.most_common(top):
        print(f"| {name} ({kind_of(name)}) | {us / 1e3:.0f} | {100 * us / total:.1f}% |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    print_summary(args.directory, args.top)


if __name__ == "__main__":
    main()
