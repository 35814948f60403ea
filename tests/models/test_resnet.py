"""CLIP's modified ResNet image tower against a PyTorch reference written here from its
description, the CBOW text tower against a numpy masked mean, both inside TwoTowers, and config
errors."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlmjax.models.cbow import CBOW
from vlmjax.models.resnet import ResNet
from vlmjax.models.two_towers import TwoTowers

# (2, 1, 1, 1): stage 0 has a block with an identity shortcut, the others a strided one.
TINY = dict(layers=(2, 1, 1, 1), width=4, num_heads=4, output_dim=12, image_size=64,
            norm_groups=4)


def random_params(module, *inputs, seed=0):
    """Every parameter random (norm scales near 1, variances positive), so no branch is dead:
    init zeroes each block's last norm scale, which would hide its whole residual branch."""
    params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), *inputs))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name or "var" in name:
            out.append(rng.uniform(0.5, 1.5, leaf.shape))
        else:
            fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
            out.append(rng.normal(0, fan_in ** -0.5 if "kernel" in name else 0.3, leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out])


# ------------------------------------------------------------------------ PyTorch reference
def t(array):
    return torch.from_numpy(np.array(array, np.float32))  # a writable copy


def torch_conv(p, stride=1):
    kernel = np.asarray(p["kernel"])  # [kh, kw, in, out] -> [out, in, kh, kw]
    conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride,
                           padding=kernel.shape[0] // 2, bias=False)
    conv.weight.data = t(kernel.transpose(3, 2, 0, 1))
    return conv


def torch_norm(p, kind, groups, eps=1e-5):
    channels = p["scale"].shape[0]
    if kind == "batchnorm":
        norm = torch.nn.BatchNorm2d(channels, eps=eps).eval()  # eval: the running statistics
        norm.running_mean.data, norm.running_var.data = t(p["mean"]), t(p["var"])
    else:
        norm = torch.nn.GroupNorm(math.gcd(groups, channels), channels, eps=eps)
    norm.weight.data, norm.bias.data = t(p["scale"]), t(p["bias"])
    return norm


class TorchBottleneck(torch.nn.Module):
    def __init__(self, p, stride, kind, groups):
        super().__init__()
        self.branch = torch.nn.Sequential(
            torch_conv(p["conv1"]), torch_norm(p["norm1"], kind, groups), torch.nn.ReLU(),
            torch_conv(p["conv2"]), torch_norm(p["norm2"], kind, groups), torch.nn.ReLU(),
            torch.nn.AvgPool2d(stride) if stride > 1 else torch.nn.Identity(),
            torch_conv(p["conv3"]), torch_norm(p["norm3"], kind, groups))
        self.shortcut = torch.nn.Identity()
        if "downsample_conv" in p:
            self.shortcut = torch.nn.Sequential(
                torch.nn.AvgPool2d(stride), torch_conv(p["downsample_conv"]),
                torch_norm(p["downsample_norm"], kind, groups))

    def forward(self, x):
        return torch.relu(self.branch(x) + self.shortcut(x))


def torch_attention_pool(p, x, num_heads):
    """x [B, C, h, w]: tokens = [mean, positions] + pos, torch MultiheadAttention, mean queries."""
    x = x.flatten(2).permute(0, 2, 1)  # [B, hw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + t(p["pos_embedding"])
    dim = x.shape[-1]
    out_dim = p["out"]["kernel"].shape[-1]
    attention = torch.nn.MultiheadAttention(dim, num_heads, batch_first=True)
    attention.out_proj = torch.nn.Linear(dim, out_dim)
    attention.in_proj_weight.data = torch.cat([t(p[n]["kernel"]).reshape(dim, dim).T
                                               for n in ("query", "key", "value")])
    attention.in_proj_bias.data = torch.cat([t(p[n]["bias"]).reshape(-1)
                                             for n in ("query", "key", "value")])
    attention.out_proj.weight.data = t(p["out"]["kernel"]).reshape(dim, out_dim).T
    attention.out_proj.bias.data = t(p["out"]["bias"])
    out, _ = attention(x[:, :1], x, x, need_weights=False)
    return out[:, 0]


def torch_resnet(params, images, cfg, kind):
    groups = cfg["norm_groups"]
    x = t(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        for i in range(3):
            x = torch_conv(params[f"stem_conv{i}"], 2 if i == 0 else 1)(x)
            x = torch.relu(torch_norm(params[f"stem_norm{i}"], kind, groups)(x))
        x = torch.nn.AvgPool2d(2)(x)
        for stage, blocks in enumerate(cfg["layers"]):
            for j in range(blocks):
                stride = 2 if stage > 0 and j == 0 else 1
                x = TorchBottleneck(params[f"stage{stage}_block{j}"], stride, kind, groups)(x)
        return torch_attention_pool(params["attn_pool"], x, cfg["num_heads"]).numpy()


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_resnet_matches_torch_reference(norm):
    model = ResNet(**TINY, norm=norm)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    params = random_params(model, images)
    assert "downsample_conv" not in params["stage0_block1"]  # identity shortcut covered
    assert params["attn_pool"]["pos_embedding"].shape == (2 * 2 + 1, 32 * 4)  # 64 px / 32
    ours = np.asarray(jax.jit(model.apply)({"params": params}, images))
    assert ours.shape == (2, 12)
    reference = torch_resnet(jax.tree.map(np.asarray, params), np.asarray(images), TINY, norm)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    assert np.abs(ours).max() > 0.1  # the comparison is not of near-zeros


def test_frozen_batchnorm_statistics_get_no_gradient():
    model = ResNet(**TINY)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    params = random_params(model, images)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(params)
    norm = grads["stage1_block0"]["norm2"]
    assert float(jnp.abs(norm["scale"]).sum()) > 0 and float(jnp.abs(norm["bias"]).sum()) > 0
    assert float(jnp.abs(norm["mean"]).sum()) == 0 and float(jnp.abs(norm["var"]).sum()) == 0


def test_init_starts_every_block_at_its_shortcut():
    params = nn.unbox(jax.jit(ResNet(**TINY).init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    for stage in range(4):
        np.testing.assert_array_equal(params["params"][f"stage{stage}_block0"]["norm3"]["scale"],
                                      0.0)


def test_remat_changes_nothing_but_memory():
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    plain, remat = (ResNet(**TINY, norm="groupnorm", remat=r) for r in ("none", "full"))
    params = random_params(plain, images)

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(params)

    # Recomputation reorders float32 sums: equal to rounding, not bit for bit.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grads(plain), grads(remat))
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, images))(params))
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= sum(TINY["layers"])


@pytest.mark.parametrize("change,match", [
    (dict(layers=(1, 1, 1)), "4 block counts"),
    (dict(layers=(1, 0, 1, 1)), "4 block counts"),
    (dict(width=5), "even"),
    (dict(image_size=48), "multiple of 32"),
    (dict(num_heads=5), "num_heads 5 must divide"),
    (dict(norm="layernorm"), "norm 'layernorm' is not one of"),
    (dict(remat="some"), "remat 'some' is not one of"),
])
def test_bad_resnet_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        ResNet(**{**TINY, **change}).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_images_of_another_size_than_image_size_raise():
    with pytest.raises(ValueError, match="got 32x32 images but was built for image_size 64"):
        ResNet(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------- CBOW
@pytest.mark.parametrize("projection", [False, True])
def test_cbow_is_the_masked_mean_of_token_embeddings(projection):
    model = CBOW(vocab_size=20, max_len=6, width=5, projection=projection)
    tokens = jnp.array([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 12], [1, 1, 1, 1, 1, 1]])
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    params = random_params(model, tokens, mask)
    table = np.asarray(params["token_embed"]["embedding"])
    expected = np.stack([table[[3, 4, 5]].mean(0), table[7:13].mean(0), np.zeros(5)])
    if projection:
        expected = expected @ np.asarray(params["projection"]["kernel"]) + np.asarray(
            params["projection"]["bias"])
    else:
        assert "projection" not in params
    ours = model.apply({"params": params}, tokens, mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # Padding is ignored: other ids under a False mask give the same features.
    np.testing.assert_allclose(model.apply({"params": params}, tokens.at[0, 3:].set(19), mask),
                               ours, rtol=1e-6)
    # No mask: every token counts.
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens[:1])[0],
        (table[[3, 4, 5, 0, 0, 0]].mean(0) @ np.asarray(params["projection"]["kernel"])
         + np.asarray(params["projection"]["bias"])) if projection else
        table[[3, 4, 5, 0, 0, 0]].mean(0), rtol=1e-5, atol=1e-6)


def test_cbow_rejects_texts_longer_than_max_len():
    with pytest.raises(ValueError, match="text length 9 exceeds the tower's max_len 8"):
        CBOW(vocab_size=10, max_len=8, width=4).init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, 9), jnp.int32))


# ------------------------------------------------------------------------------- TwoTowers
def test_two_towers_with_resnet_and_cbow():
    model = TwoTowers(image=dict(TINY, norm="groupnorm"), image_arch="resnet",
                      text=dict(vocab_size=30, max_len=8, width=6), text_arch="cbow",
                      embed_dim=12, image_projection=False)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 64, 64, 3))
    tokens = jnp.array([[1, 2, 3, 0, 0, 0, 0, 0], [4, 5, 0, 0, 0, 0, 0, 0],
                        [6, 7, 8, 9, 10, 11, 12, 13]])
    mask = tokens > 0
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, tokens, mask))
    assert set(params["params"]["text_tower"]) == {"token_embed"}
    assert "dense" not in params["params"].get("image_proj", {})  # the pool outputs embed_dim
    zimg = jax.jit(lambda p, x: model.apply(p, x, method=model.encode_image))(params, images)
    ztxt = model.apply(params, tokens, mask, method=model.encode_text)
    assert zimg.shape == (3, 12) and ztxt.shape == (3, 12)
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(zimg[0] - zimg[1]).max()) > 1e-3  # images are told apart
    padded_elsewhere = model.apply(params, jnp.where(mask, tokens, 29), mask,
                                   method=model.encode_text)
    np.testing.assert_allclose(padded_elsewhere, ztxt, rtol=1e-6)


def test_two_towers_names_unknown_tower_keys():
    model = TwoTowers(image=dict(TINY, depth=3), image_arch="resnet")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\] for ResNet"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
