"""The matmul FLOPs that XLA's cost analysis leaves out: it counts a while loop's body once,
so a model that scans its layers (`scan_layers`) or a train step that scans its micro-batches
(`optim.accum_steps`) is undercounted by the loops' trip counts. Read from the compiled HLO
text: every `dot` (inside fusions too) counts 2 x its output size x its contracted size, and
a while body counts `known_trip_count` times (XLA's own annotation; a loop without one is
counted once, as XLA does). Elementwise work in loop bodies stays counted once: a few percent
of a transformer's FLOPs.

    missed = loop_dot_flops_missed(compiled.as_text())   # add to cost_analysis()["flops"]
"""
from __future__ import annotations

import functools
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_ARRAY = re.compile(r"^(?:ROOT )?%([\w.\-]+) = [a-z]\w*\[([\d,]*)\]")
_DOT = re.compile(r"= [a-z]\w*\[([\d,]*)\]\S* dot\(%([\w.\-]+)")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    computations, entry, name = {}, "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line) if not line.startswith(" ") else None
        if header:
            name = header.group(1)
            computations[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            computations[name].append(line.strip())
    return computations, entry


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _dot_flops(lines: list[str]) -> float:
    """2 x output size x contracted size of every dot among `lines` (one computation)."""
    shapes = {m.group(1): _dims(m.group(2)) for m in map(_ARRAY.match, lines) if m}
    total = 0.0
    for line in lines:
        dot = _DOT.search(line)
        if not dot:
            continue
        lhs = shapes.get(dot.group(2))
        contracting = _CONTRACTING.search(line)
        if lhs is None or contracting is None:
            raise ValueError(f"cannot read the operand shapes of HLO dot: {line[:200]}")
        contracted = math.prod(lhs[i] for i in _dims(contracting.group(1)))
        total += 2.0 * math.prod(_dims(dot.group(1))) * contracted
    return total


def loop_dot_flops_missed(hlo_text: str) -> float:
    """Dot FLOPs of the program with every while body run its known trip count, minus the same
    with every body run once (what XLA's cost analysis counts)."""
    computations, entry = _computations(hlo_text)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")

    @functools.cache
    def flops(name: str, with_trips: bool) -> float:
        total = _dot_flops(computations.get(name, []))
        for line in computations.get(name, []):
            trips = _TRIP_COUNT.search(line)
            for role, callee in _CALLEES.findall(line):
                times = int(trips.group(1)) if (with_trips and role == "body" and trips) else 1
                total += times * flops(callee, with_trips)
        return total

    return flops(entry, True) - flops(entry, False)
