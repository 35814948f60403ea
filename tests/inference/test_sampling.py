"""Warpers against transformers' LogitsWarpers, and the support of the sampled distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.inference import sampling


def hf_warped(logits, temperature, top_k, top_p):
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = torch.tensor(np.asarray(logits))
    for warper in ([TemperatureLogitsWarper(temperature)]
                   + ([TopKLogitsWarper(top_k)] if top_k else [])
                   + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])):
        scores = warper(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8),
                                                     (1.3, 10, 0.5), (1.0, 0, 0.05),
                                                     (2.0, 3, 0.99)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 3
    ours = sampling.warp(jnp.asarray(logits), temperature, top_k, top_p, top_p < 1.0)
    theirs = hf_warped(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    kept = ~np.isinf(theirs)
    np.testing.assert_allclose(np.asarray(ours)[kept], theirs[kept], rtol=1e-6)
    assert kept.sum(1).min() >= 1 and (~kept).any()


def test_sampled_support_and_frequencies():
    # probs 0.5, 0.25, 0.15, 0.1 (and ~0 for the rest)
    probs = np.array([0.5, 0.25, 0.15, 0.1] + [1e-9] * 4)
    logits = jnp.asarray(np.log(probs), jnp.float32)[None].repeat(4000, 0)
    keys = jax.random.key(0)
    # top_p=0.7: the ascending cumulative mass <= 0.3 is removed -> {0, 1} kept (0.1+0.15 <= 0.3,
    # +0.25 > 0.3); renormalised 2/3, 1/3.
    drawn = np.asarray(sampling.sample(keys, logits, 1.0, 0, 0.7, True))
    assert set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).mean() - 2 / 3) < 0.03
    drawn = np.asarray(sampling.sample(keys, logits, 1.0, 3, 1.0, False))
    assert set(drawn.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(drawn, minlength=3)[:3] / len(drawn),
                               np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)
    np.testing.assert_array_equal(sampling.sample(keys, logits, 1.0, 1, 1.0, False), 0)


def test_greedy_equals_argmax_with_ties_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (64, 1000)).astype(np.float32)  # many ties at the maximum
    logits[5, 17] = np.nan
    logits[6, [3, 900]] = np.nan
    expected = np.argmax(logits, axis=-1)  # numpy and torch: the first NaN, else the first max
    np.testing.assert_array_equal(jax.jit(sampling.greedy)(jnp.asarray(logits)), expected)
    assert expected[5] == 17 and expected[6] == 3
