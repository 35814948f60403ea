"""benchmarks/cot_judge_bias.py's summary on scripted choices."""
import numpy as np
import pytest

from benchmarks.cot_judge_bias import bias_summary


def test_a_judge_that_always_names_response_1_is_half_right_and_never_agrees():
    summary = bias_summary(np.ones(10, int), np.ones(10, int))
    assert summary["accuracy_right_first"] == 1.0 and summary["accuracy_right_second"] == 0.0
    assert summary["accuracy"] == 0.5 and summary["names_response_1"] == 1.0
    assert summary["orders_agree"] == 0.0 and np.isnan(summary["accuracy_when_orders_agree"])


def test_agreement_counts_pairs_judged_the_same_text_in_both_orders():
    first = np.array([1, 1, 2, 2, 0])   # right text first: 1 is right
    second = np.array([2, 1, 1, 2, 2])  # right text second: 2 is right
    summary = bias_summary(first, second)
    # pairs 0 (right twice) and 2 (wrong twice) agree; 1 and 3 split; 4 is unparsed once
    assert summary["orders_agree"] == pytest.approx(2 / 5)
    assert summary["accuracy_when_orders_agree"] == pytest.approx(1 / 2)
    assert summary["unparsed"] == pytest.approx(1 / 10)
    assert summary["accuracy"] == pytest.approx((2 + 3) / 10)
