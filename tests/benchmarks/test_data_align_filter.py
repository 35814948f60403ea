"""benchmarks/data_align_filter.py: the per-kind precision/recall table."""
import os
import sys

from tests.benchmarks.test_quick import REPO, tables

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import data_align_filter as bench  # noqa: E402


def test_score_table_scores_each_kind_against_the_clean_pairs():
    noise_of = {"c1": "clean", "c2": "clean", "c3": "clean", "c4": "clean", "s1": "size_string",
                "s2": "size_string", "g1": "gibberish", "w1": "swapped", "w2": "swapped"}
    removed = {"c1", "s1", "s2", "g1"}  # one clean pair removed, no swapped one
    text = bench.score_table(noise_of, removed)
    assert text.startswith("clean pairs: 4, of which removed: 1")
    (table,) = tables(text)
    rows = {row[0]: row[1:] for row in table[1:]}
    assert table[0] == ["noise kind", "pairs", "removed", "precision", "recall"]
    assert rows["size_string"] == ["2", "2", f"{2 / 3:.4f}", "1.0000"]
    assert rows["gibberish"] == ["1", "1", "0.5000", "1.0000"]
    assert rows["swapped"] == ["2", "0", "0.0000", "0.0000"]
    assert rows["generic"] == ["0", "0", "-", "-"]  # no pairs of the kind, none removed
    assert rows["all text junk"] == ["3", "3", "0.7500", "1.0000"]
    assert rows["all noise"] == ["5", "3", "0.7500", "0.6000"]
