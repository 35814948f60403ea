"""Rows of a text LM batch from tokenised documents: packed (several documents a row) or padded
(one document a row).

    batch = RowBatch(rows=8, max_len=128, pack=True, pad_id=0)
    sequence, truncated = document_tokens(ids, bos_id=2, eos_id=3, max_len=128)
    placed = batch.add(sequence)          # False: no row has room left (the batch is full)
    arrays = batch.arrays()               # tokens, targets, loss_mask, segment_ids [rows, max_len]

A document is `[BOS] + ids + [EOS]` (either optional), cut to `max_len` tokens (`truncated`:
its tail is dropped; an EOS is kept only if it fits). In a row, document k (1, 2, ...) occupies
consecutive slots with `segment_ids` k; its slot j has `targets` = its token j + 1 and
`loss_mask` True, except its last slot, which has no next token of the same document: no target
crosses a document boundary, and the Decoder's attention (segment_ids, positions restarting per
document) never does either. Padding slots have segment id 0, the pad token, target pad and no
loss. A document of fewer than 2 tokens has no target: the caller skips and counts it
(`no_targets`), never adds it.

Packing places each document in the first row with room for all of it (first fit); padding
gives each document a row of its own ("pad to max_len").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids")


def document_tokens(ids: Sequence[int], bos_id: int | None, eos_id: int | None,
                    max_len: int) -> tuple[list[int], bool]:
    """(BOS + ids + EOS cut to max_len tokens, whether anything was cut)."""
    sequence = ([] if bos_id is None else [bos_id]) + list(ids) + (
        [] if eos_id is None else [eos_id])
    return sequence[:max_len], len(sequence) > max_len


class RowBatch:
    """`rows` rows of `max_len` slots, filled with documents (see the module docstring)."""

    def __init__(self, rows: int, max_len: int, pack: bool, pad_id: int):
        self.rows, self.max_len, self.pack, self.pad_id = rows, max_len, pack, pad_id
        self.tokens = np.full((rows, max_len), pad_id, np.int32)
        self.targets = np.full((rows, max_len), pad_id, np.int32)
        self.loss_mask = np.zeros((rows, max_len), bool)
        self.segment_ids = np.zeros((rows, max_len), np.int32)
        self.fill = np.zeros(rows, np.int64)        # slots used per row
        self.documents = np.zeros(rows, np.int64)   # documents per row

    @property
    def empty(self) -> bool:
        return not self.documents.any()

    def add(self, sequence: Sequence[int]) -> bool:
        """Places one document (2..max_len tokens); False when no row has room for it."""
        n = len(sequence)
        if not 2 <= n <= self.max_len:
            raise ValueError(f"a document row needs 2..{self.max_len} tokens, got {n}")
        room = (self.fill + n <= self.max_len) if self.pack else (self.documents == 0)
        candidates = np.flatnonzero(room)
        if not candidates.size:
            return False
        row = int(candidates[0])
        start, end = int(self.fill[row]), int(self.fill[row]) + n
        self.documents[row] += 1
        self.tokens[row, start:end] = sequence
        self.targets[row, start:end - 1] = sequence[1:]
        self.loss_mask[row, start:end - 1] = True
        self.segment_ids[row, start:end] = self.documents[row]
        self.fill[row] = end
        return True

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "targets": self.targets, "loss_mask": self.loss_mask,
                "segment_ids": self.segment_ids}
