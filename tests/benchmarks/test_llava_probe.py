"""benchmarks/llava_probe.py: the ridge probe reads a linearly coded fact and not noise."""
import os
import sys

import numpy as np

from tests.benchmarks.test_quick import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import llava_probe as bench  # noqa: E402


def test_ridge_probe_reads_a_coded_label_and_not_a_random_one():
    rng = np.random.default_rng(0)
    labels = [["red", "blue", "green"][i] for i in rng.integers(0, 3, 600)]
    codes = {"red": 0, "blue": 1, "green": 2}
    x = rng.normal(size=(600, 20))
    x[:, 5] += 4.0 * np.array([codes[label] == 1 for label in labels])
    x[:, 9] += 4.0 * np.array([codes[label] == 2 for label in labels])
    accuracy, majority = bench.ridge_probe(x[:500], labels[:500], x[500:], labels[500:])
    assert accuracy > 0.95 and majority < 0.5
    shuffled = list(rng.permutation(labels))
    accuracy, majority = bench.ridge_probe(x[:500], shuffled[:500], x[500:], shuffled[500:])
    assert accuracy < majority + 0.15
