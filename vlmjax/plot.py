"""python -m vlmjax.plot WORKDIR [--out DIR]: a PNG curve per metric in WORKDIR/metrics.jsonl.

Metrics that are zero throughout (skip counters of reasons that never occurred) are left out.

Writes DIR/<metric with '/' replaced by '_'>.png (default DIR: WORKDIR/plots) and prints the paths.
"""
from __future__ import annotations

import argparse
import os
import sys


def plot_metrics(workdir: str, out_dir: str | None = None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmjax.train.metrics import read_jsonl

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a vlmjax workdir?")
    series: dict[str, tuple[list, list]] = {}
    for record in read_jsonl(path):
        for key, value in record.items():
            if key != "step":
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    out_dir = out_dir or os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, (steps, values) in sorted(series.items()):
        if not any(values):  # e.g. the skip counter of a reason that never happened
            continue
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(steps, values, marker="o" if len(steps) < 20 else None)
        axis.set_xlabel("step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        file = os.path.join(out_dir, key.replace("/", "_") + ".png")
        figure.savefig(file, dpi=80)
        plt.close(figure)
        written.append(file)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/plots)")
    args = parser.parse_args(argv)
    try:
        for file in plot_metrics(args.workdir, args.out):
            print(file)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
