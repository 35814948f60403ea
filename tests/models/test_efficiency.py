"""Efficiency switches give the results they should: remat policies, scan vs unrolled layers
(with layout conversion), bfloat16 compute, fused attention. (That remat saves memory, in the
order none > save-dots > full, is asserted by tests/benchmarks/test_quick.py on memory.py.)"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.losses import contrastive
from vlmjax.models import layers, scan_layout
from vlmjax.models.two_towers import TwoTowers

IMAGE = dict(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, pool="map")
TEXT = dict(vocab_size=50, max_len=10, width=32, depth=2, num_heads=4, mlp_dim=64, pool="last")
IMAGES = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
TOKENS = jax.random.randint(jax.random.key(1), (4, 10), 3, 50)
TEXT_MASK = jnp.arange(10)[None, :] < jnp.array([[10], [7], [4], [10]])


def make_model(dtype=jnp.float32, **switches):
    return TwoTowers(image={**IMAGE, **switches}, text={**TEXT, **switches}, embed_dim=32,
                     image_projection=False, temperature_init=10.0, bias_init=-10.0,
                     dtype=dtype)


def loss_and_grads(model, params):
    def loss_fn(p):
        zimg, ztxt, out = model.apply({"params": p}, IMAGES, TOKENS, TEXT_MASK, train=True)
        return contrastive.siglip_loss_dense(zimg, ztxt, out["temperature"], out["bias"])
    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def unrolled():
    model = make_model()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(2), IMAGES, TOKENS)["params"])
    return params, loss_and_grads(model, params)


def assert_trees_close(a, b, tol=1e-5):
    """Every leaf equal up to `tol` times its largest magnitude (float32 sums in another order
    differ in the last bits relative to the tensor's scale, not each element's), with a floor
    at 1e-3 of the tree's largest magnitude for leaves that are zero up to rounding (the key
    biases: softmax ignores them)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    floor = 1e-3 * max(float(np.abs(y).max()) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(np.abs(y).max(), floor))


def test_remat_full_gives_the_same_loss_and_grads(unrolled):
    # save-dots is compared in the scan test below (one compile less).
    params, (loss, grads) = unrolled
    remat_loss, remat_grads = loss_and_grads(make_model(remat="full"), params)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert_trees_close(remat_grads, grads)


def test_unknown_remat_policy_names_valid_ones():
    with pytest.raises(ValueError, match="'none', 'full', 'save-dots'"):
        make_model(remat="dots").init(jax.random.key(0), IMAGES, TOKENS)


@pytest.mark.parametrize("remat", ["none", "save-dots"])
def test_scanned_layers_equal_unrolled_after_layout_conversion(unrolled, remat):
    params, (loss, grads) = unrolled
    scanned = scan_layout.to_scanned(params)
    assert scanned["image_tower"]["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)
    assert scanned["text_tower"]["encoder"]["blocks"]["attn"]["query"]["kernel"].shape[0] == 2
    model = make_model(scan_layers=True, remat=remat)
    # The converted tree has exactly the structure and shapes of a scanned model's own init.
    init_shapes = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), IMAGES, TOKENS)["params"]))
    assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(lambda x: x.shape, init_shapes)
    scan_loss, scan_grads = loss_and_grads(model, scanned)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
    assert_trees_close(scan_layout.to_unrolled(scan_grads), grads)


def test_layout_conversion_round_trips_and_matches(unrolled):
    params, _ = unrolled
    back = scan_layout.to_unrolled(scan_layout.to_scanned(params))
    assert_trees_close(back, params, tol=0)
    assert not scan_layout.is_scanned(params)
    assert scan_layout.is_scanned(scan_layout.match_layout(params, scan_layout.to_scanned(params)))
    assert_trees_close(scan_layout.match_layout(scan_layout.to_scanned(params), params), params,
                       tol=0)


def test_scan_keeps_the_program_flat_in_depth():
    def hlo_size(depth, scan):
        model = TwoTowers(image=dict(IMAGE, depth=depth, scan_layers=scan), text=None)
        params = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES)["params"])
        grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, IMAGES)[0]))
        return len(jax.jit(grad).lower(params).as_text())

    assert hlo_size(8, True) < 1.1 * hlo_size(2, True)
    assert hlo_size(8, False) > 1.8 * hlo_size(2, False)  # the encoder is most of the program


def test_bfloat16_compute_is_close_to_float32_and_params_stay_float32(unrolled):
    params, (loss, grads) = unrolled
    model = make_model(dtype=jnp.bfloat16)
    init = jax.eval_shape(model.init, jax.random.key(2), IMAGES, TOKENS)["params"]
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(init))} == {jnp.dtype(jnp.float32)}
    bf16_loss, bf16_grads = loss_and_grads(model, params)
    assert bf16_loss.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(bf16_grads)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
    assert abs(float(bf16_loss) - float(loss)) > 1e-6 * abs(float(loss))  # really bfloat16
    # Gradients agree in direction (cosine) per tensor with a visible weight.
    for g16, g32 in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(grads)):
        g16, g32 = np.ravel(g16), np.ravel(g32)
        if np.linalg.norm(g32) > 1e-3:
            cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
            assert cosine > 0.95, cosine


def test_fused_attention_equals_einsum_path(unrolled):
    params, (loss, grads) = unrolled
    fused_loss, fused_grads = loss_and_grads(make_model(fused_attention=True), params)
    np.testing.assert_allclose(fused_loss, loss, rtol=1e-5)
    assert_trees_close(fused_grads, grads)


def test_fused_attention_off_gpu_uses_xla():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    assert not layers._cudnn_applies(q, q)  # this CPU test machine
