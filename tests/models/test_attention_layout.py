"""MultiHeadAttention's BHLK path (an option) computes the same function as the earlier BLHK
path, with the same parameters (names, shapes, logical axes, init), in a ViT and a masked text
tower, forward and backward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import layers
from vlmjax.models.text import TextTransformer
from vlmjax.models.vit import ViT


def _pair(make, inputs, **kwargs):
    ours, old = make(attention_layout="BHLK"), make(attention_layout="BLHK")
    variables = ours.init(jax.random.key(0), *inputs, **kwargs)
    old_variables = old.init(jax.random.key(0), *inputs, **kwargs)
    # The same parameter tree, logical axes and initial values: checkpoints don't see the switch.
    assert jax.tree.structure(variables) == jax.tree.structure(old_variables)
    for a, b in zip(jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
                    jax.tree.leaves(old_variables,
                                    is_leaf=lambda x: isinstance(x, nn.Partitioned))):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    params = nn.meta.unbox(variables)

    def loss(model, params):
        return jnp.sum(jnp.sin(model.apply(params, *inputs, **kwargs)))

    # Jitted: op by op, the two small towers' backward passes take a minute on 2 cores.
    got = jax.tree.leaves(jax.jit(jax.value_and_grad(lambda p: loss(ours, p)))(params))
    want = jax.tree.leaves(jax.jit(jax.value_and_grad(lambda p: loss(old, p)))(params))
    # One scale for all: the key bias's true gradient is zero (softmax shift), only rounding.
    scale = max(float(jnp.max(jnp.abs(w))) for w in want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_vit_bhlk_equals_blhk():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    _pair(lambda **kw: ViT(width=32, depth=2, num_heads=4, patch_size=8, pool="map", **kw),
          (images,))


def test_masked_text_tower_bhlk_equals_blhk():
    tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, 50)
    mask = jnp.arange(10)[None] < jnp.array([[10], [4], [1]])
    _pair(lambda **kw: TextTransformer(vocab_size=50, max_len=10, width=32, depth=2, num_heads=4,
                                       pool="map", **kw), (tokens, mask))


def test_cross_attention_bhlk_equals_blhk():
    x, kv = jax.random.normal(jax.random.key(3), (2, 5, 24)), jax.random.normal(
        jax.random.key(4), (2, 7, 16))
    mask = jnp.broadcast_to(jnp.arange(7) < 5, (2, 1, 5, 7))
    ours = layers.MultiHeadAttention(4, head_dim=8, out_dim=12, layout="BHLK")
    old = layers.MultiHeadAttention(4, head_dim=8, out_dim=12, layout="BLHK")
    params = old.init(jax.random.key(0), x, kv, mask)
    np.testing.assert_allclose(ours.apply(params, x, kv, mask), old.apply(params, x, kv, mask),
                               rtol=1e-5, atol=1e-6)


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="BHLK"):
        layers.MultiHeadAttention(2, layout="BLKH").init(jax.random.key(0), jnp.ones((1, 3, 4)))
