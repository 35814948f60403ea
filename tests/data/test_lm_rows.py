"""LM rows: packed / padded documents against a direct construction, document by document."""
import numpy as np
import pytest

from vlmjax.data import lm_rows

PAD, BOS, EOS = 0, 2, 3


def documents_of(arrays):
    """Per row, the token lists of its documents, read back by segment id."""
    out = []
    for row in range(arrays["tokens"].shape[0]):
        segments = arrays["segment_ids"][row]
        out.append([arrays["tokens"][row][segments == s].tolist()
                    for s in range(1, segments.max() + 1)])
    return out


def expected_row(sequences, max_len):
    """The row a list of documents must give: built slot by slot, independently of RowBatch."""
    tokens, targets = [PAD] * max_len, [PAD] * max_len
    mask, segments, slot = [False] * max_len, [0] * max_len, 0
    for number, sequence in enumerate(sequences, start=1):
        for j, token in enumerate(sequence):
            tokens[slot], segments[slot] = token, number
            if j + 1 < len(sequence):  # the next token of the same document, else no target
                targets[slot], mask[slot] = sequence[j + 1], True
            slot += 1
    return tokens, targets, mask, segments


@pytest.mark.parametrize("pack", [True, False])
def test_rows_match_a_direct_construction_and_documents_never_mix(pack):
    rng = np.random.default_rng(0)
    rows, max_len = 6, 16
    batch = lm_rows.RowBatch(rows, max_len, pack=pack, pad_id=PAD)
    placed = []
    while True:  # random documents until one does not fit
        length = int(rng.integers(2, max_len + 1))
        sequence = [BOS, *rng.integers(4, 50, length - 2).tolist(), EOS]
        if not batch.add(sequence):
            break
        placed.append(sequence)
    arrays = batch.arrays()
    got = documents_of(arrays)
    assert sorted(map(tuple, (d for row in got for d in row))) == sorted(map(tuple, placed))
    if not pack:
        assert all(len(row) == 1 for row in got) and len(placed) == rows
    else:
        assert len(placed) > rows  # packing put several documents in some row
    for row in range(rows):
        tokens, targets, mask, segments = expected_row(got[row], max_len)
        np.testing.assert_array_equal(arrays["tokens"][row], tokens)
        np.testing.assert_array_equal(arrays["targets"][row], targets)
        np.testing.assert_array_equal(arrays["loss_mask"][row], mask)
        np.testing.assert_array_equal(arrays["segment_ids"][row], segments)
    # No target crosses a document boundary; padding never counts.
    seg = arrays["segment_ids"]
    assert not (arrays["loss_mask"][:, :-1] & (seg[:, :-1] != seg[:, 1:])).any()
    assert not (arrays["loss_mask"] & (seg == 0)).any()
    assert arrays["loss_mask"].sum() == sum(len(s) - 1 for s in placed)
    assert {k: v.dtype for k, v in arrays.items()} == {
        "tokens": np.int32, "targets": np.int32, "loss_mask": bool, "segment_ids": np.int32}


def test_first_fit_fills_earlier_rows_first():
    batch = lm_rows.RowBatch(2, 8, pack=True, pad_id=PAD)
    assert batch.add([1, 1, 1, 1, 1]) and batch.add([2, 2, 2, 2, 2])  # rows 0 and 1
    assert batch.add([3, 3, 3])  # fits in row 0's 3 free slots
    assert not batch.add([4, 4, 4, 4])  # no row has 4 free slots
    assert documents_of(batch.arrays()) == [[[1] * 5, [3] * 3], [[2] * 5]]


def test_document_tokens_bos_eos_and_truncation():
    assert lm_rows.document_tokens([7, 8], BOS, EOS, 8) == ([BOS, 7, 8, EOS], False)
    assert lm_rows.document_tokens([7, 8, 9], BOS, EOS, 4) == ([BOS, 7, 8, 9], True)
    assert lm_rows.document_tokens([7], None, None, 4) == ([7], False)  # no target: caller skips
    with pytest.raises(ValueError, match="2..4 tokens"):
        lm_rows.RowBatch(1, 4, True, PAD).add([7])
