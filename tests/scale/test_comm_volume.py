"""The communication volumes quoted in the README, checked against XLA's compiled HLO."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from measure_comm import loss_collectives  # noqa: E402

B, D = 64, 32
CHUNK = B * D * 4  # one device's b x D float32 rows
# Per device, in chunks: all_gather gathers N-1 text chunks and reduce-scatters their gradient;
# CLIP gathers (and reduce-scatters the gradients of) both images and texts. The rings' designs
# (vlmjax/losses/contrastive.py): ppermute sends N-1 text chunks forward and 2N-1 backward (a
# chunk + its gradient per step, the gradient only on the last), 3N-2; ppermute_bidir sends N-1
# text chunks forward and N-1 image + N-1 text chunks backward, 3(N-1), in ceil((N-1)/2) steps.
# XLA merges a backward text send with the identical forward one where both lie outside the
# ring's while loop: one at N=2 (ppermute), every forward one at N <= 4 and the first step's two
# at N=8 (ppermute_bidir).
EXPECTED = {("siglip", "all_gather"): lambda n: 2 * (n - 1),
            ("siglip", "ppermute"): lambda n: 3 * n - 2 - (n == 2),
            ("siglip", "ppermute_bidir"): lambda n: {2: 2, 4: 6, 8: 19}[n],
            ("clip", "all_gather"): lambda n: 4 * (n - 1)}
KINDS = {"all_gather": {"all-gather", "reduce-scatter"}, "ppermute": {"collective-permute"},
         "ppermute_bidir": {"collective-permute"}}


@pytest.mark.parametrize("name, impl", sorted(EXPECTED))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_loss_communication_volume(name, impl, n):
    volume = loss_collectives(name, impl, n, B, D)
    moved = {k: v for k, v in volume.items() if k != "scalars"}
    assert set(moved) == KINDS[impl]
    assert sum(moved.values()) == pytest.approx(EXPECTED[name, impl](n) * CHUNK)
    assert volume.get("scalars", 0) < 64  # the loss and the t, b gradients: a few floats


@pytest.mark.parametrize("n", [2, 4, 8])
def test_the_bidirectional_ring_sends_less_than_the_ring(n):
    """Both ways round the ring, no gradients travel: fewer chunks than ppermute at every N, and
    never more than its design's 3(N-1)."""
    sent = {impl: sum(v for k, v in loss_collectives("siglip", impl, n, B, D).items()
                      if k != "scalars") / CHUNK for impl in ("ppermute", "ppermute_bidir")}
    assert sent["ppermute_bidir"] < sent["ppermute"]
    assert sent["ppermute_bidir"] <= 3 * (n - 1)
