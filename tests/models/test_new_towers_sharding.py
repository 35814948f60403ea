"""The ResNet, CBOW, EfficientNet and BERT towers inside TwoTowers: every parameter carries
logical axis names the mesh rules know, and EfficientNet's remat changes only memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.models.bert import BertTextTower
from vlmjax.models.blip import BlipText
from vlmjax.models.efficientnet import EfficientNet
from vlmjax.models.two_towers import TwoTowers

RESNET = dict(layers=(1, 1, 1, 1), width=8, num_heads=4, output_dim=16, image_size=64,
              norm="groupnorm", norm_groups=4)
EFFICIENTNET = dict(width_coefficient=0.5, depth_coefficient=1.0, kernel_sizes=[3, 3],
                    in_channels=[32, 16], out_channels=[16, 24], strides=[1, 2],
                    num_block_repeats=[1, 2], expand_ratios=[1, 6])
PAIRS = {"resnet+cbow": dict(image=RESNET, image_arch="resnet", text_arch="cbow",
                             text=dict(vocab_size=50, max_len=8, width=16, projection=True)),
         "efficientnet+bert": dict(image=EFFICIENTNET, image_arch="efficientnet",
                                   text_arch="bert", text=dict(vocab_size=50, max_len=8, width=16,
                                                               depth=1, num_heads=2))}
PAIRS["efficientnet+bert(scan)"] = dict(PAIRS["efficientnet+bert"], text=dict(
    PAIRS["efficientnet+bert"]["text"], depth=2, scan_layers=True))


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_parameter_has_logical_axes(pair):
    model = TwoTowers(**PAIRS[pair], embed_dim=16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                        jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)
    names = {n for x in leaves for n in x.names if n}
    assert {"embed", "vocab"} <= names <= set(sharding.PARAM_AXES)
    specs = nn.get_partition_spec(params)
    if pair == "resnet+cbow":  # the attention pool's heads shard like a transformer's
        assert specs["image_tower"]["attn_pool"]["query"]["kernel"] == jax.sharding.PartitionSpec(
            "embed", "heads", "head_dim")
        assert specs["text_tower"]["token_embed"]["embedding"] == jax.sharding.PartitionSpec(
            "vocab", "embed")
    if pair == "efficientnet+bert(scan)":  # one [depth, ...] array per weight, depth unsharded
        layer = specs["text_tower"]["bert"]["layer_scan"]
        assert layer["self_attention_encoder"]["query"]["kernel"] == jax.sharding.PartitionSpec(
            None, "embed", "heads", "head_dim")
        assert params["text_tower"]["bert"]["layer_scan"]["mlp"]["fc1"]["kernel"].value.shape[
            0] == 2


def test_efficientnet_remat_changes_nothing_but_memory():
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    plain, remat = (EfficientNet(**EFFICIENTNET, remat=r) for r in ("none", "full"))
    params = nn.unbox(plain.init(jax.random.PRNGKey(0), images))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.unbox(remat.init(jax.random.PRNGKey(0), images))["params"])  # same checkpoints

    def grads(model):
        return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))(
            params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads(plain), grads(remat))
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, images))(params))
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= 3  # one per MBConv block


def test_efficientnet_remat_keeps_drop_connect_in_training():
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    cfg = dict(EFFICIENTNET, drop_connect_rate=0.9)
    plain, remat = EfficientNet(**cfg), EfficientNet(**cfg, remat="full")
    params = plain.init(jax.random.PRNGKey(0), images)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    trained = remat.apply(params, images, train=True, rngs=rngs)
    np.testing.assert_allclose(trained, plain.apply(params, images, train=True, rngs=rngs),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained, remat.apply(params, images))  # dropped blocks in training


def test_bert_remat_changes_nothing_but_memory():
    """ALIGN's BERT (BLIP's text transformer) recomputes each layer in the backward: same
    params, same gradients, dropout kept in training, one checkpoint per layer."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 50)
    mask = jnp.arange(8)[None] < jnp.array([[8], [5]])
    cfg = dict(vocab_size=50, max_len=8, width=16, depth=2, num_heads=2, dropout=0.3)
    plain, remat = BertTextTower(**cfg), BertTextTower(**cfg, remat="full")
    params = nn.unbox(plain.init(jax.random.PRNGKey(0), tokens, mask))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.unbox(remat.init(jax.random.PRNGKey(0), tokens, mask))["params"])
    rngs = {"dropout": jax.random.PRNGKey(3)}
    weights = jax.random.normal(jax.random.PRNGKey(4), (2, 16))  # a LayerNorm'd sum of squares
                                                                 # would have no gradient

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, mask, train=True,  # noqa
                                             rngs=rngs) * weights)
        return jax.jit(jax.grad(loss))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads(plain), grads(remat))
    assert not np.allclose(remat.apply({"params": params}, tokens, mask, train=True, rngs=rngs),
                           remat.apply({"params": params}, tokens, mask))
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, tokens, mask))(params))
    assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= 2
    text = BlipText(**cfg, parts=("encoder",), remat="full")
    with pytest.raises(ValueError, match="remat takes no KV cache"):
        text.apply({"params": params["bert"]}, tokens, mask[:, None, None, :], "encoder",
                   cache={"k": (), "v": ()})
