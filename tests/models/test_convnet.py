"""The CNN image tower (`TwoTowers(image_arch="cnn")`): PyTorch reference, shift invariance of
the max-pooled features, and config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlmjax.models.convnet import ConvNet, space_to_depth
from vlmjax.models.two_towers import TwoTowers


def _init(module, *inputs):
    return jax.tree.map(lambda x: getattr(x, "value", x), module.init(jax.random.PRNGKey(0), *inputs),
                        is_leaf=lambda x: hasattr(x, "value"))


def _torch_reference(params, images, block, pool):
    """The same network from torch primitives: pixel_unshuffle, Conv2d, ReLU, MaxPool2d."""
    x = torch.nn.functional.pixel_unshuffle(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2),
                                            block)
    for i in range(len(params)):
        kernel = np.asarray(params[f"conv{i}"]["kernel"])  # [3, 3, in, out]
        if i == 0:  # ours orders a block's channels (row, col, rgb); torch's (rgb, row, col)
            c = kernel.shape[2] // (block * block)
            kernel = kernel.reshape(3, 3, block, block, c, -1).transpose(0, 1, 4, 2, 3, 5)
            kernel = kernel.reshape(3, 3, block * block * c, -1)
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        bias = torch.from_numpy(np.array(params[f"conv{i}"]["bias"]))
        x = torch.nn.functional.conv2d(x, weight, bias, padding=1)
        x = torch.nn.functional.max_pool2d(torch.relu(x), 2)
    return (x.amax(dim=(2, 3)) if pool == "max" else x.mean(dim=(2, 3))).numpy()


@pytest.mark.parametrize("pool,block", [("max", 2), ("gap", 4)])
def test_convnet_matches_torch(pool, block):
    model = ConvNet(channels=(8, 16, 24), patch_size=block, pool=pool)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params = _init(model, images)
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
                          params)  # non-zero biases
    ours = np.asarray(model.apply(params, images))
    assert ours.shape == (2, 24)
    np.testing.assert_allclose(ours, _torch_reference(params["params"], images, block, pool),
                               rtol=1e-4, atol=1e-5)


def test_space_to_depth_layout():
    images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    out = space_to_depth(images, 2)
    assert out.shape == (2, 2, 2, 12)
    # Block (1, 0) of image 1 holds rows 2-3, columns 0-1, each pixel's 3 channels in turn.
    np.testing.assert_array_equal(out[1, 1, 0], images[1, 2:4, 0:2].reshape(-1))


def test_max_pooled_features_ignore_where_the_shape_is():
    # A shape moved by a multiple of the total stride (2 x 2^3 = 16 px) gives the same features;
    # that is what lets the tower learn small shapes anywhere in the image from few examples.
    model = ConvNet(channels=(8, 16, 32), patch_size=2)
    square = jnp.zeros((64, 64, 3)).at[18:28, 20:30].set(jnp.array([1.0, -0.5, 0.3]))
    moved = jnp.roll(square, (16, 16), axis=(0, 1))
    params = _init(model, square[None])
    a, b = model.apply(params, jnp.stack([square, moved]))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    other = jnp.zeros((64, 64, 3)).at[18:28, 20:30].set(jnp.array([-0.5, 1.0, 0.3]))
    assert float(jnp.abs(model.apply(params, other[None])[0] - a).max()) > 1e-3


def test_without_the_last_pool_the_map_is_finer_and_the_global_max_the_same():
    pooled = ConvNet(channels=(8, 16, 24), patch_size=2, pool="none")
    finer = ConvNet(channels=(8, 16, 24), patch_size=2, pool="none", last_stage_pool=False)
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 64, 3))
    params = _init(pooled, images)  # the same parameters serve both
    coarse, fine = pooled.apply(params, images), finer.apply(params, images)
    assert coarse.shape == (2, 4, 4, 24) and fine.shape == (2, 8, 8, 24)
    np.testing.assert_allclose(np.asarray(coarse), np.asarray(
        fine.reshape(2, 4, 2, 4, 2, 24).max(axis=(2, 4))), rtol=1e-6)
    global_max = ConvNet(channels=(8, 16, 24), patch_size=2, last_stage_pool=False)
    np.testing.assert_allclose(np.asarray(global_max.apply(params, images)),
                               np.asarray(coarse.max(axis=(1, 2))), rtol=1e-6)
    assert not np.allclose(np.asarray(fine[:, ::2, ::2]), np.asarray(coarse))  # not a copy


def test_convnet_config_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        _init(ConvNet(channels=(8,)), jnp.zeros((1, 33, 32, 3)))
    with pytest.raises(ValueError, match="pool 'cls' is not one of"):
        _init(ConvNet(channels=(8,), pool="cls"), jnp.zeros((1, 32, 32, 3)))
    text = dict(vocab_size=16, max_len=4, width=8, depth=1, num_heads=2)
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"model.image: unknown key\(s\) \['width'\] for ConvNet"):
        TwoTowers(image=dict(width=8), image_arch="cnn", text=text, embed_dim=8).init(
            jax.random.PRNGKey(0), images, tokens)
    with pytest.raises(ValueError, match="image_arch 'swin' is not one of"):
        TwoTowers(image=dict(), image_arch="swin", text=text, embed_dim=8).init(
            jax.random.PRNGKey(0), images, tokens)


def test_two_towers_with_cnn_image_tower():
    model = TwoTowers(image=dict(channels=(8, 16)), image_arch="cnn",
                      text=dict(vocab_size=16, max_len=4, width=8, depth=1, num_heads=2),
                      embed_dim=12, bias_init=-10.0)
    images, tokens = jnp.ones((3, 32, 32, 3)), jnp.ones((3, 4), jnp.int32)
    params = _init(model, images, tokens)
    zimg, ztxt, out = model.apply(params, images, tokens)
    assert zimg.shape == ztxt.shape == (3, 12)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1.0, rtol=1e-5)
    assert params["params"]["image_tower"]["conv1"]["kernel"].shape == (3, 3, 8, 16)


@pytest.mark.parametrize("size", [8, 9])
def test_max_pool_2x2_equals_flax_max_pool_and_its_gradient(size):
    import flax.linen as nn
    from vlmjax.models.convnet import max_pool_2x2
    x = jax.random.normal(jax.random.PRNGKey(4), (2, size, size, 3))
    x = x.at[0, 0, 0].set(x[0, 0, 1])  # a tie inside a window: both keep the same max
    reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)), np.asarray(reference(x)))
    weights = jax.random.normal(jax.random.PRNGKey(5), max_pool_2x2(x).shape)
    grads = [np.asarray(jax.grad(lambda x: jnp.sum(pool(jax.nn.relu(x)) * weights))(x))
             for pool in (max_pool_2x2, reference)]
    tied = np.zeros(x.shape, bool)
    tied[0, 0, :2] = True  # where the tie's gradient is split instead of given to one
    np.testing.assert_allclose(grads[0][~tied], grads[1][~tied], rtol=1e-6)
    np.testing.assert_allclose(grads[0][tied].reshape(-1, 3).sum(0),
                               grads[1][tied].reshape(-1, 3).sum(0), rtol=1e-6)
