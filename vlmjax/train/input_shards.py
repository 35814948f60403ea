"""The training input as a fixed number of data shards, split over the processes.

The global batch is the concatenation of `num_shards` independent streams (each a per-host
pipeline built as if it were host `shard` of `num_shards`, giving global_batch / num_shards
examples a step); process p of P reads shards [p * S/P, (p+1) * S/P) and nothing else. Because the
streams do not depend on P, the same config gives the same global batches on 1 process or on P
(any P dividing S), and a checkpoint's data position resumes on another process count.

The default shard count is the process count of the run that started the workdir (one stream a
host); `config.data_shards` fixes it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class ShardedInput:
    """Iterator of this process's numpy batches (its shards' batches, concatenated in order)."""

    def __init__(self, make_stream: Callable[[int, int, dict | None], object], num_shards: int,
                 process_index: int, process_count: int, states: dict[int, dict] | None = None):
        if num_shards < 1 or num_shards % process_count:
            raise ValueError(f"data_shards={num_shards} is not a positive multiple of the "
                             f"process count {process_count}")
        per_process = num_shards // process_count
        self.num_shards = num_shards
        self.shards = list(range(process_index * per_process, (process_index + 1) * per_process))
        states = states or {}
        self.streams = [make_stream(shard, num_shards, states.get(shard)) for shard in self.shards]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(stream) for stream in self.streams]
        if len(batches) == 1:
            return batches[0]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    @property
    def skip_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for stream in self.streams:
            for reason, count in stream.skip_counts.items():
                total[reason] = total.get(reason, 0) + count
        return total

    def get_state(self) -> dict[int, dict]:
        """{shard: its stream's position} for this process's shards."""
        return {shard: stream.get_state() for shard, stream in zip(self.shards, self.streams)}

    def close(self):
        for stream in self.streams:
            stream.close()


def choose_num_shards(configured: int, saved: int | None, process_count: int) -> tuple[int, str]:
    """(shard count, a note for the log or ''): the config's, else the checkpoint's, else P."""
    if configured:
        if configured % process_count:
            raise ValueError(f"config.data_shards={configured} is not a multiple of the process "
                             f"count {process_count}; use a multiple, or 0 for the default")
        return configured, ""
    if saved is None:
        return process_count, ""
    if saved % process_count:
        return process_count, (
            f"the checkpoint's data position is in {saved} shards, which {process_count} "
            f"processes cannot split; the input restarts as {process_count} fresh streams (set "
            "config.data_shards to a multiple of every process count you will use)")
    return saved, ""
