"""When evaluators run: each at its own `every` (steps; 0 = only at the end) and all at the last
step."""
from __future__ import annotations

import time
from typing import Sequence


class Schedule:
    def __init__(self, evaluators: Sequence):
        self.evaluators = list(evaluators)

    def due_evaluators(self, step: int, last: bool) -> list:
        return [e for e in self.evaluators
                if last or (e.every > 0 and step % e.every == 0)]

    def due(self, step: int, last: bool) -> bool:
        return bool(self.due_evaluators(step, last))

    def run(self, params, step: int, last: bool = False, prefix: str = "") -> dict:
        """Metrics of the evaluators due at `step`, each name prefixed by `prefix` (e.g. 'ema/'
        for the EMA params), and `{prefix}eval/seconds`."""
        results, start = {}, time.perf_counter()
        for evaluator in self.due_evaluators(step, last):
            results.update({prefix + k: v for k, v in evaluator(params).items()})
        results[f"{prefix}eval/seconds"] = time.perf_counter() - start
        return results
