"""benchmarks/cot_search.py: the rows the issue asks for, and its table."""
import os
import sys

import pytest

from tests.benchmarks.test_quick import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import cot_search as bench  # noqa: E402


def test_methods_cover_greedy_stage_beam_1_to_4_best_of_n_and_sentence_beam():
    assert bench.methods(8) == [("greedy", 1), ("stage_beam", 1), ("stage_beam", 2),
                                ("stage_beam", 3), ("stage_beam", 4), ("best_of_n", 8),
                                ("sentence_beam", 2)]


def test_table_prints_accuracy_and_tokens():
    text = bench.table([{"method": "stage_beam", "beams": 4, "seed": 0, "accuracy": 0.625,
                         "generated_tokens": 812.4}])
    assert text.splitlines()[-1] == "| stage_beam | 4 | 0 | 62.5% | 812 |"


def test_methods_filter_keeps_the_named_rows_and_refuses_unknown_names():
    rows = bench.methods(8)
    assert bench.chosen(rows, "") == rows
    assert bench.chosen(rows, "greedy,stage_beam:4") == [("greedy", 1), ("stage_beam", 4)]
    assert bench.chosen(rows, "stage_beam") == [("stage_beam", n) for n in (1, 2, 3, 4)]
    with pytest.raises(SystemExit, match="stage_beam:5"):
        bench.chosen(rows, "stage_beam:5")


def test_table_names_a_judge_other_than_the_model_beside_the_method():
    rows = [{"method": "stage_beam", "beams": 4, "seed": 0, "judge": judge, "accuracy": 0.5,
             "generated_tokens": 10.0} for judge in ("model", "loglik")]
    lines = bench.table(rows).splitlines()
    assert lines[-2].startswith("| stage_beam | 4 |")
    assert lines[-1].startswith("| stage_beam (loglik judge) | 4 |")


def test_plan_runs_greedy_once_one_beam_once_per_seed_and_the_rest_per_judge():
    rows = bench.plan([0, 1], ["model", "loglik"])
    assert [r for r in rows if r[2] == "greedy"] == [(0, "model", "greedy", 1)]
    assert [r for r in rows if r[2:] == ("stage_beam", 1)] == [
        (0, "model", "stage_beam", 1), (1, "model", "stage_beam", 1)]
    # best_of_n at each judge's own N (the model's judge replies cost tokens, loglik's none)
    assert [r for r in rows if r[2] == "best_of_n"] == [
        (0, "model", "best_of_n", 6), (0, "loglik", "best_of_n", 4),
        (1, "model", "best_of_n", 6), (1, "loglik", "best_of_n", 4)]
    assert (1, "loglik", "stage_beam", 4) in rows and len(rows) == 1 + 2 * (1 + 2 * 5)
    assert bench.plan([0], ["loglik"], "best_of_n", best_of_n=9) == [
        (0, "loglik", "best_of_n", 9)]
