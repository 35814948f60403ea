"""ViT `stem="conv"`: token grid, locality of each token, and config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models.vit import ConvStem, ViT


def _init(module, images):
    return jax.tree.map(lambda x: getattr(x, "value", x), module.init(jax.random.PRNGKey(0), images),
                        is_leaf=lambda x: hasattr(x, "value"))


def test_conv_stem_grid_matches_the_patch_stem():
    images = jnp.ones((2, 32, 32, 3))
    stem = ConvStem(patch_size=8, width=16)
    params = _init(stem, images)
    assert stem.apply(params, images).shape == (2, 4, 4, 16)  # the 8x8-patch grid
    assert sorted(params["params"]) == ["conv0", "conv1", "conv2", "norm0", "norm1", "norm2", "proj"]


def test_conv_stem_tokens_are_local():
    # Three 3x3 stride-2 convs see 15 px: changing pixels far from token (0, 0) must leave it
    # unchanged, and changing pixels inside its receptive field must change it.
    stem = ConvStem(patch_size=8, width=16)
    images = jax.random.normal(jax.random.PRNGKey(1), (1, 32, 32, 3))
    params = _init(stem, images)
    base = stem.apply(params, images)
    far = stem.apply(params, images.at[:, 20:, 20:].add(1.0))
    near = stem.apply(params, images.at[:, 2:5, 2:5].add(1.0))
    np.testing.assert_array_equal(np.asarray(far[0, 0, 0]), np.asarray(base[0, 0, 0]))
    assert float(jnp.abs(near[0, 0, 0] - base[0, 0, 0]).max()) > 1e-3
    assert float(jnp.abs(far[0, 3, 3] - base[0, 3, 3]).max()) > 1e-3


def test_vit_with_conv_stem_runs_end_to_end():
    model = ViT(patch_size=4, stem="conv", width=16, depth=1, num_heads=2, mlp_dim=32, pool="gap")
    images = jnp.ones((2, 16, 16, 3))
    params = _init(model, images)
    assert "conv_stem" in params["params"] and "patch_embed" not in params["params"]
    assert model.apply(params, images).shape == (2, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stem="conv", patch_size=6), "power-of-two patch_size"),
    (dict(stem="pixel", patch_size=8), "stem 'pixel' is not one of"),
])
def test_bad_stem_config_is_a_clear_error(kwargs, message):
    model = ViT(width=16, depth=1, num_heads=2, mlp_dim=32, **kwargs)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 24, 24, 3)))
