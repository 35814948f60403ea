"""Training logs: one progress line per interval on stdout, `metrics.jsonl` and TensorBoard
event files in the workdir (written by process 0 only; the workdir may be a gs:// path)."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np

from vlmjax import gfile


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._remote_lines = None  # gs:// and co. cannot append: keep the lines, rewrite
        if self.enabled and gfile.is_remote(self.path):
            self._remote_lines = (gfile.read_text(self.path).splitlines(keepends=True)
                                  if gfile.exists(self.path) else [])
        self._tb = None
        if self.enabled and tensorboard:
            from vlmjax.data.tf_cpu import tf  # tensorflow without accelerators
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]):
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if self._remote_lines is not None:
            self._remote_lines.append(json.dumps(record) + "\n")
            gfile.write_text(self.path, "".join(self._remote_lines))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            from vlmjax.data.tf_cpu import tf
            with self._tb.as_default(step=int(step)):
                for key, value in metrics.items():
                    tf.summary.scalar(key, float(value))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


RATE = "rate"  # a summary metric shown per second: its per-step value / the step time


def summary_labels(summary_metrics) -> list[tuple[str, str]]:
    """A task's summary_metrics (names, (name, label) pairs or (name, label, "rate") triples)
    as (name, label) pairs."""
    return [(m, m) if isinstance(m, str) else tuple(m)[:2] for m in summary_metrics]


def _rate_names(summary_metrics) -> set[str]:
    return {m[0] for m in summary_metrics if not isinstance(m, str) and len(m) > 2
            and m[2] == RATE}


class Progress:
    """Rate, ETA and MFU over the steps since the last report; loss, learning rate and the
    task's `summary_metrics` (see tasks/base.py) of the interval. A (name, label, "rate")
    summary metric is shown per second (e.g. the LM's counted tokens/s) and logged as
    perf/{name}_per_s."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int,
                 flops_per_example: float = 0.0, peak_flops: float = 0.0,
                 summary_metrics=()):
        self.total, self.batch = total_steps, batch_size
        self.flops, self.peak = flops_per_example, peak_flops
        self.shown = [("loss", "loss", ".4f"), ("learning_rate", "lr", ".2e")] + [
            (name, label, ".2f") for name, label in summary_labels(summary_metrics)]
        self.rates = _rate_names(summary_metrics)
        self.last_step, self.last_time = start_step, time.perf_counter()

    def report(self, step: int, metrics: Mapping[str, float]) -> tuple[str, dict]:
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        step_time = (now - self.last_time) / steps
        self.last_step, self.last_time = step, now
        rates = {"perf/step_time_s": step_time, "perf/examples_per_s": self.batch / step_time}
        if self.flops and self.peak:
            rates["perf/mfu"] = self.flops * rates["perf/examples_per_s"] / self.peak
        parts = [f"step {step}/{self.total}"]
        for key, label, fmt in self.shown:
            if key in metrics and key in self.rates:
                rates[f"perf/{key}_per_s"] = metrics[key] / step_time
                parts.append(f"{label} {rates[f'perf/{key}_per_s']:.0f}")
            elif key in metrics:
                parts.append(f"{label} {metrics[key]:{fmt}}")
        parts += [f"{rates['perf/examples_per_s']:.1f} ex/s", f"{step_time * 1e3:.0f} ms/step",
                  f"ETA {format_duration(step_time * (self.total - step))}"]
        if "perf/mfu" in rates:
            parts.append(f"MFU {rates['perf/mfu']:.1%}")
        skipped = {k: v for k, v in metrics.items() if k.startswith("data/skipped") and v}
        if skipped:
            parts.append("skipped " + ",".join(f"{k.split('/')[-1]}={int(v)}"
                                               for k, v in skipped.items()))
        return " | ".join(parts), rates


def mean_metrics(history: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Average a list of per-step metric dicts (already fetched to host)."""
    keys = history[-1].keys()
    return {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
