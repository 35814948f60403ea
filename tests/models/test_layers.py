"""Attention, masks, MLP, norms, position embeddings and MAP head against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import layers


def np_attention(q, k, v, mask):
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshk->bqhk", probs, v)


@pytest.mark.parametrize("fused", [False, True])
def test_dot_product_attention_matches_numpy(fused):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = rng.random((2, 1, 5, 5)) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    out = layers.dot_product_attention(q, k, v, jnp.asarray(mask), fused=fused)
    np.testing.assert_allclose(out, np_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_query_gives_zeros_not_nan():
    q = k = v = jnp.ones((1, 2, 1, 4))
    mask = jnp.array([[[[True, False], [False, False]]]])
    out = layers.dot_product_attention(q, k, v, mask)
    assert np.isfinite(out).all() and np.all(out[0, 1] == 0)


def test_masks():
    np.testing.assert_array_equal(layers.causal_mask(3)[0, 0],
                                  [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    pad = layers.padding_mask(jnp.array([[True, True, False]]))
    np.testing.assert_array_equal(pad[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    cross = layers.padding_mask(jnp.array([[True]]), jnp.array([[True, False]]))
    assert cross.shape == (1, 1, 1, 2) and cross[0, 0, 0].tolist() == [True, False]


def init_apply(module, *args, **kwargs):
    variables = module.init(jax.random.key(0), *args)
    return variables, module.apply(variables, *args, **kwargs)


def test_self_attention_padded_key_changes_nothing_and_causal_is_causal():
    x = jax.random.normal(jax.random.key(1), (2, 6, 16))
    attn = layers.MultiHeadAttention(num_heads=4)
    valid = jnp.array([[True] * 4 + [False] * 2] * 2)
    variables, out = init_apply(attn, x, None, layers.padding_mask(valid))
    x2 = x.at[:, 4:].set(100.0)
    out2 = attn.apply(variables, x2, None, layers.padding_mask(valid))
    np.testing.assert_allclose(out[:, :4], out2[:, :4], rtol=1e-5, atol=1e-5)

    causal = layers.causal_mask(6)
    out = attn.apply(variables, x, None, causal)
    out2 = attn.apply(variables, x.at[:, 3:].set(-7.0), None, causal)
    np.testing.assert_allclose(out[:, :3], out2[:, :3], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, 3:], out2[:, 3:])


def test_cross_attention_and_fused_path_agree():
    x = jax.random.normal(jax.random.key(2), (2, 3, 16))
    kv = jax.random.normal(jax.random.key(3), (2, 7, 24))
    mask = layers.padding_mask(jnp.ones((2, 3), bool), jnp.arange(7)[None].repeat(2, 0) < 5)
    attn = layers.MultiHeadAttention(num_heads=2)
    variables, out = init_apply(attn, x, kv, mask)
    fused = layers.MultiHeadAttention(num_heads=2, fused=True).apply(variables, x, kv, mask)
    assert out.shape == (2, 3, 16)
    np.testing.assert_allclose(out, fused, rtol=1e-5, atol=1e-5)


def test_attention_dropout_only_in_training():
    x = jax.random.normal(jax.random.key(4), (1, 8, 16))
    attn = layers.MultiHeadAttention(num_heads=2, dropout=0.5)
    variables = attn.init(jax.random.key(0), x)
    eval_out = attn.apply(variables, x)
    np.testing.assert_array_equal(eval_out, attn.apply(variables, x))
    train_out = attn.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(eval_out, train_out)


def test_quick_gelu_and_unknown_activation():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(layers.get_activation("quick_gelu")(x),
                               x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        layers.get_activation("gelu_fast")


def test_rmsnorm_and_layernorm():
    x = jax.random.normal(jax.random.key(6), (4, 10)) * 3 + 1
    _, y = init_apply(layers.make_norm("rmsnorm", jnp.float32, 1e-6), x)
    xn = np.asarray(x)
    np.testing.assert_allclose(y, xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6),
                               rtol=1e-5)
    _, y = init_apply(layers.make_norm("layernorm", jnp.float32, 1e-6), x)
    np.testing.assert_allclose(y, (xn - xn.mean(-1, keepdims=True)) / np.sqrt(
        xn.var(-1, keepdims=True) + 1e-6), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        layers.make_norm("batchnorm", jnp.float32, 1e-6)


def test_sincos_2d_layout():
    pe = layers.sincos_2d(3, 4, 8)
    assert pe.shape == (12, 8)
    # token (y=1, x=2) is row 1*4+2; first quarter is sin(x * omega_0) with omega_0 = 1.
    np.testing.assert_allclose(pe[6, 0], np.sin(2.0), rtol=1e-6)
    np.testing.assert_allclose(pe[6, 4], np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        layers.sincos_2d(2, 2, 6)


def test_map_head_ignores_masked_tokens():
    x = jax.random.normal(jax.random.key(7), (2, 5, 16))
    mask = jnp.array([[True, True, True, False, False]] * 2)
    head = layers.MAPHead(num_heads=2, mlp_dim=32)
    variables, out = init_apply(head, x, mask)
    out2 = head.apply(variables, x.at[:, 3:].set(9.0), mask)
    assert out.shape == (2, 16)
    np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-5)
