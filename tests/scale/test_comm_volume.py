"""The communication volumes quoted in the README, checked against XLA's compiled HLO."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from measure_comm import loss_collectives  # noqa: E402

B, D = 64, 32
CHUNK = B * D * 4  # one device's b x D float32 rows
# Per device, in chunks: all_gather gathers N-1 text chunks and reduce-scatters their gradient;
# ppermute passes a text chunk N-1 times forward and a chunk + its gradient N times backward;
# CLIP gathers (and reduce-scatters the gradients of) both images and texts.
EXPECTED = {("siglip", "all_gather"): lambda n: 2 * (n - 1),
            ("siglip", "ppermute"): lambda n: 3 * n - 1,
            ("clip", "all_gather"): lambda n: 4 * (n - 1)}
KINDS = {"all_gather": {"all-gather", "reduce-scatter"}, "ppermute": {"collective-permute"}}


@pytest.mark.parametrize("name, impl", sorted(EXPECTED))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_loss_communication_volume(name, impl, n):
    volume = loss_collectives(name, impl, n, B, D)
    moved = {k: v for k, v in volume.items() if k != "scalars"}
    assert set(moved) == KINDS[impl]
    assert sum(moved.values()) == pytest.approx(EXPECTED[name, impl](n) * CHUNK)
    assert volume.get("scalars", 0) < 64  # the loss and the t, b gradients: a few floats
