"""The masked next-token loss: the chunked loss against the dense one (values, metrics and
gradients), the dense one against a reference written here from the formulas, masking, input
checks, a mesh, and the compiled-memory figure of benchmarks/lm_loss_memory.py."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.losses import lm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import lm_loss_memory  # noqa: E402

B, L, D, V = 3, 12, 8, 37
RTOL = 2e-5
OPTIONS = [dict(z_loss=0.0, label_smoothing=0.0), dict(z_loss=1e-3, label_smoothing=0.0),
           dict(z_loss=0.0, label_smoothing=0.1), dict(z_loss=1e-2, label_smoothing=0.2)]
METRICS = ("loss", "nll", "z_loss", "accuracy", "num_tokens")


def make_inputs(batch=B, length=L, width=D, vocab=V, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, width)).astype(np.float32)
    kernel = (rng.normal(size=(width, vocab)) / np.sqrt(width)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    mask = rng.random((batch, length)) < 0.7
    mask[0, -1] = True  # the ragged last chunk has a counted position
    mask[-1, :] = False  # a row with no counted token
    # some targets the logits' argmax, so that accuracy is neither 0 nor 1
    argmax = np.argmax(hidden @ kernel, axis=-1)
    targets[:, ::3] = argmax[:, ::3]
    return hidden, kernel, targets, mask


def assert_close(actual, expected, rtol=RTOL):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        scale = max(float(np.abs(e).max()), 0.1) if e.size else 1.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def value_and_grads(loss_fn, hidden, kernel, targets, mask, **kw):
    """((loss, metrics), (d hidden, d kernel)), jitted."""
    def f(h, k):
        return loss_fn(h, k, targets, mask, **kw)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, kernel)


# ------------------------------------------------------------ references written from formulas
def numpy_reference(hidden, kernel, targets, mask, z_loss=0.0, label_smoothing=0.0):
    """float64: log_softmax over the full logits, mean over the counted positions."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    logp = logits - lse[..., None]
    nll = -np.take_along_axis(logp, np.where(mask, targets, 0)[..., None], -1)[..., 0]
    ce = (1 - label_smoothing) * nll + label_smoothing * np.mean(-logp, axis=-1)
    z = z_loss * lse**2
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    n = mask.sum()
    mean = (lambda x: x[mask].sum() / n) if n else (lambda x: 0.0)
    return {"loss": mean(ce + z), "nll": mean(nll), "z_loss": mean(z),
            "accuracy": mean(correct), "num_tokens": float(n)}


def jnp_reference_loss(hidden, kernel, targets, mask, z_loss=0.0, label_smoothing=0.0):
    """The same in plain jnp (float32), differentiable: an independent gradient reference."""
    logits = hidden @ kernel
    logp = jax.nn.log_softmax(logits, axis=-1)
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    onehot = jax.nn.one_hot(targets, logits.shape[-1])
    nll = -jnp.sum(onehot * logp, axis=-1)
    ce = (1 - label_smoothing) * nll + label_smoothing * -jnp.mean(logp, axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum((ce + z_loss * lse**2) * w) / jnp.maximum(jnp.sum(w), 1.0)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_naive_matches_formula_references(options):
    hidden, kernel, targets, mask = make_inputs()
    (loss, metrics), grads = value_and_grads(lm.naive_next_token_loss, hidden, kernel, targets,
                                             mask, **options)
    expected = numpy_reference(hidden, kernel, targets, mask, **options)
    assert 0.0 < expected["accuracy"] < 1.0 and expected["num_tokens"] == mask.sum()
    assert float(loss) == float(metrics["loss"])
    for name in METRICS:
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    ref_grads = jax.grad(jnp_reference_loss, argnums=(0, 1))(
        jnp.asarray(hidden), jnp.asarray(kernel), targets, mask, **options)
    assert_close(grads, ref_grads)


def test_references_detect_a_wrong_formula():
    """The references are sharp enough to see a mistake of the size of the smoothing term."""
    hidden, kernel, targets, mask = make_inputs()
    smooth = numpy_reference(hidden, kernel, targets, mask, label_smoothing=0.1)["loss"]
    plain = numpy_reference(hidden, kernel, targets, mask)["loss"]
    loss, _ = lm.naive_next_token_loss(hidden, kernel, targets, mask, label_smoothing=0.1)
    assert abs(smooth - plain) > 100 * RTOL * abs(plain)
    np.testing.assert_allclose(loss, smooth, rtol=1e-5)


# -------------------------------------------------------------------- chunked equals dense
# every option set at chunk 5 (L = 12: chunks of 5, 5 and a ragged 2); other sizes with both on
@pytest.mark.parametrize("chunk_size,options",
                         [(5, o) for o in OPTIONS]
                         + [(c, OPTIONS[-1]) for c in (1, 4, 12, 64)],  # 4 divides L; 64 > L
                         ids=lambda x: str(x))
def test_chunked_equals_naive(chunk_size, options):
    inputs = make_inputs(seed=chunk_size)
    (loss, metrics), grads = value_and_grads(lm.next_token_loss, *inputs,
                                             chunk_size=chunk_size, **options)
    (loss_ref, metrics_ref), grads_ref = value_and_grads(lm.naive_next_token_loss, *inputs,
                                                         **options)
    assert set(metrics) == set(METRICS) == set(metrics_ref)
    assert_close(loss, loss_ref)
    for name in METRICS:
        assert metrics[name].dtype == jnp.float32
        assert_close(metrics[name], metrics_ref[name])
    assert_close(grads, grads_ref)
    assert np.abs(np.asarray(grads[1])).max() > 1e-3  # the gradients are not trivially zero


def test_chunked_equals_naive_with_an_uncounted_prefix():
    """LLaVA rows: an uncounted prefix (image tokens, prompt) of different lengths per row, so
    the counted positions move to the front of each row and the last chunks are skipped."""
    hidden, kernel, targets, mask = make_inputs(seed=11)
    for row, prefix in enumerate((7, 10, 12)):
        mask[row, :prefix] = False
    mask[1, -1] = False  # a gap among the counted positions
    (loss, metrics), grads = value_and_grads(lm.next_token_loss, hidden, kernel, targets, mask,
                                             chunk_size=2, **OPTIONS[-1])
    expected = value_and_grads(lm.naive_next_token_loss, hidden, kernel, targets, mask,
                               **OPTIONS[-1])
    assert_close(((loss, metrics), grads), expected)
    assert metrics["num_tokens"] == 6
    dhidden = np.asarray(grads[0])  # back in the input's order: zero where nothing counts
    assert not dhidden[~mask].any() and np.abs(dhidden[mask]).min() > 0


def test_chunked_low_precision_inputs_compute_in_float32():
    hidden, kernel, targets, mask = make_inputs()
    h16, k16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    loss, _ = lm.next_token_loss(h16, k16, targets, mask, chunk_size=5, z_loss=1e-3)
    expected, _ = lm.naive_next_token_loss(h16.astype(jnp.float32), k16.astype(jnp.float32),
                                           targets, mask, z_loss=1e-3)
    assert loss.dtype == jnp.float32
    assert_close(loss, expected)


# ---------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("loss_fn", [lm.naive_next_token_loss,
                                     functools.partial(lm.next_token_loss, chunk_size=5)],
                         ids=["naive", "chunked"])
@pytest.mark.parametrize("garbage", [1e6, np.nan])  # NaN: e.g. a fully masked attention row
def test_masked_positions_do_not_matter(loss_fn, garbage):
    hidden, kernel, targets, mask = make_inputs()
    bad_hidden, bad_targets = hidden.copy(), targets.copy()
    bad_hidden[~mask] = garbage
    bad = np.array([V, V + 100, -1, -7, 2**30, np.iinfo(np.int32).min], np.int32)
    bad_targets[~mask] = np.resize(bad, (~mask).sum())
    options = dict(z_loss=1e-3, label_smoothing=0.1)
    (_, metrics), (dh, dk) = value_and_grads(loss_fn, hidden, kernel, targets, mask, **options)
    (_, bad_metrics), (bad_dh, bad_dk) = value_and_grads(loss_fn, bad_hidden, kernel,
                                                         bad_targets, mask, **options)
    for name in METRICS:
        np.testing.assert_allclose(bad_metrics[name], metrics[name], rtol=1e-6, err_msg=name)
    assert np.isfinite(bad_dk).all() and np.isfinite(bad_dh).all()
    assert_close(bad_dk, dk)
    assert_close(bad_dh, dh)
    assert not np.asarray(bad_dh)[~mask].any()  # no gradient reaches a masked position


@pytest.mark.parametrize("loss_fn", [lm.naive_next_token_loss,
                                     functools.partial(lm.next_token_loss, chunk_size=5)],
                         ids=["naive", "chunked"])
def test_no_counted_token_gives_zero_loss_and_zero_gradients(loss_fn):
    hidden, kernel, targets, _ = make_inputs()
    mask = np.zeros((B, L), bool)
    targets[:, 0] = -3  # garbage too: nothing counts
    (loss, metrics), (dh, dk) = value_and_grads(loss_fn, hidden, kernel, targets, mask,
                                                z_loss=1e-3, label_smoothing=0.1)
    assert float(loss) == 0.0
    assert all(float(metrics[name]) == 0.0 for name in METRICS)
    assert np.isfinite(dh).all() and np.isfinite(dk).all()
    assert not np.asarray(dh).any() and not np.asarray(dk).any()


def test_integer_loss_mask_is_a_mask():
    hidden, kernel, targets, mask = make_inputs()
    as_bool, _ = lm.next_token_loss(hidden, kernel, targets, mask, chunk_size=5)
    as_int, _ = lm.next_token_loss(hidden, kernel, targets, mask.astype(np.int32), chunk_size=5)
    assert float(as_int) == float(as_bool)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("loss_fn", [lm.naive_next_token_loss, lm.next_token_loss],
                         ids=["naive", "chunked"])
def test_shape_errors_name_the_shapes(loss_fn):
    hidden, kernel, targets, mask = make_inputs()
    with pytest.raises(ValueError, match=r"\(12, 8\).*\(8, 37\)"):
        loss_fn(hidden[0], kernel, targets, mask)  # hidden without its batch axis
    with pytest.raises(ValueError, match=r"\(3, 12, 8\).*\(7, 37\)"):
        loss_fn(hidden, kernel[:7], targets, mask)  # D mismatch
    with pytest.raises(ValueError, match=r"\(3, 12, 8\).*\(8,\)"):
        loss_fn(hidden, kernel[:, 0], targets, mask)  # kernel not [D, V]
    with pytest.raises(ValueError, match=r"targets \(3, 11\).*\(3, 12\)"):
        loss_fn(hidden, kernel, targets[:, 1:], mask)
    with pytest.raises(ValueError, match=r"loss_mask \(12,\).*\(3, 12\)"):
        loss_fn(hidden, kernel, targets, mask[0])


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_chunk_size_must_be_positive(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        lm.next_token_loss(*make_inputs(), chunk_size=chunk_size)


# ------------------------------------------------------------------------------------ mesh
def test_sharded_batch_matches_single_device():
    hidden, kernel, targets, mask = make_inputs(batch=8, seed=3)
    options = dict(chunk_size=5, z_loss=1e-3, label_smoothing=0.1)
    (loss_1, metrics_1), grads_1 = value_and_grads(lm.next_token_loss, hidden, kernel, targets,
                                                   mask, **options)
    mesh = sharding.make_mesh({"data": 8})
    split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    h, t, m = jax.device_put((hidden, targets, mask), split)
    k = jax.device_put(kernel, whole)
    assert len(h.sharding.device_set) == 8 and h.addressable_shards[0].data.shape == (1, L, D)

    @jax.jit
    def step(h, k, t, m):
        return jax.value_and_grad(
            lambda h, k: lm.next_token_loss(h, k, t, m, **options), argnums=(0, 1),
            has_aux=True)(h, k)

    (loss_8, metrics_8), grads_8 = step(h, k, t, m)
    assert_close(loss_8, loss_1)
    for name in METRICS:
        assert_close(metrics_8[name], metrics_1[name])
    assert_close(grads_8, grads_1)


# ------------------------------------------------------------------ compiled memory figure
def test_chunked_temp_memory_is_at_most_a_quarter_of_naive_at_llama3_vocab():
    """The issue's figure at full size (V = 128256, L = 2048, B = 1, D = 512), compile only
    (about 2 s on the 2-core CPU). It holds at chunk_size 128, the default; 512 does not meet it
    (0.38, benchmarks/README.md)."""
    rows = lm_loss_memory.measure(vocab=128256, length=2048, batch=1, width=512, chunks=[128])
    (naive, _, naive_temp, _, _), (chunked, chunk, temp, ratio, _) = rows
    assert (naive, chunked, chunk) == ("naive", "chunked", 128)
    assert naive_temp >= 2048 * 128256 * 4  # at least the dense [B, L, V] float32 logits
    assert ratio == temp / naive_temp <= 0.25, ratio


def test_benchmark_prints_its_table(capsys):
    lm_loss_memory.main(["--vocab", "1000", "--length", "64", "--width", "16",
                         "--chunks", "8,15"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == ["impl", "naive", "chunked", "chunked"]
    assert [r[1].strip() for r in rows[1:]] == ["-", "8", "15"]
    assert float(rows[1][3]) == 1.0 and all(float(r[2]) > 0 for r in rows[1:])
    assert "kernel [D, V] f32" in out
