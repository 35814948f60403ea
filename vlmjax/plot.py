"""python -m vlmjax.plot WORKDIR [--out DIR]: a PNG curve per metric in WORKDIR/metrics.jsonl.

Metrics that are zero throughout (skip counters of reasons that never occurred) are left out.

Writes DIR/<metric with '/' replaced by '_'>.png (default DIR: WORKDIR/plots) and prints the paths.
`--together M1,M2,... --out FILE.png` draws those metrics as curves of one figure instead (e.g.
BLIP-2's three stage-1 losses: train/loss_itc,train/loss_itm,train/loss_lm).
"""
from __future__ import annotations

import argparse
import os
import sys


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_series(workdir: str) -> dict[str, tuple[list, list]]:
    """metric -> (steps, values) of WORKDIR/metrics.jsonl."""
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
    return series


def plot_together(workdir: str, metrics, out_file: str, title: str | None = None) -> str:
    """One figure with a curve per metric of `metrics` (all must be in the run's log)."""
    series = read_series(workdir)
    missing = [m for m in metrics if m not in series]
    if missing:
        raise ValueError(f"{workdir}/metrics.jsonl has no {missing}; it has "
                         f"{sorted(series)[:12]}...")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for metric in metrics:
        steps, values = series[metric]
        axis.plot(steps, values, label=metric, marker="o" if len(steps) < 20 else None)
    axis.set_xlabel("step")
    axis.set_title(title or os.path.basename(os.path.normpath(workdir)))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    figure.savefig(out_file, dpi=80)
    plt.close(figure)
    return out_file


def plot_metrics(workdir: str, out_dir: str | None = None) -> list[str]:
    series = read_series(workdir)
    plt = _pyplot()
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
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/plots); "
                                                    "with --together, the PNG file")
    parser.add_argument("--together", default="", help="comma-separated metrics drawn in one "
                                                       "figure")
    args = parser.parse_args(argv)
    try:
        if args.together:
            metrics = [m.strip() for m in args.together.split(",") if m.strip()]
            out = args.out or os.path.join(args.workdir, "plots", "together.png")
            print(plot_together(args.workdir, metrics, out))
            return 0
        for file in plot_metrics(args.workdir, args.out):
            print(file)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
