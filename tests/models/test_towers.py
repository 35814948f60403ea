"""ViT, text transformer and two-tower model: shapes, pooling, masks, dtype, init, axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.models import two_towers
from vlmjax.models.text import TextTransformer
from vlmjax.models.two_towers import TwoTowers
from vlmjax.models.vit import ViT

VIT = dict(patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)
TEXT = dict(vocab_size=50, max_len=12, width=32, depth=2, num_heads=4, mlp_dim=64)
IMAGES = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 3, 50)


@pytest.mark.parametrize("pool,class_token,shape", [
    ("cls", None, (2, 32)), ("gap", None, (2, 32)), ("map", None, (2, 32)),
    ("none", None, (2, 16, 32)), ("none", True, (2, 17, 32))])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_output_shapes(pool, class_token, shape, posemb):
    vit = ViT(**VIT, pool=pool, class_token=class_token, posemb=posemb)
    variables = vit.init(jax.random.key(0), IMAGES)
    assert vit.apply(variables, IMAGES).shape == shape
    assert ("posemb" in variables["params"]) == (posemb == "learn")


def test_vit_output_layer_is_that_blocks_hidden_state():
    full = ViT(**VIT, pool="none")
    variables = full.init(jax.random.key(0), IMAGES)
    _, state = full.apply(variables, IMAGES, capture_intermediates=True)
    block1 = state["intermediates"]["encoder"]["block1"]["__call__"][0]
    for layer in (1, -2):
        out = ViT(**VIT, pool="none", output_layer=layer).apply(variables, IMAGES)
        np.testing.assert_allclose(out, block1, rtol=1e-6)
    with pytest.raises(ValueError, match="output_layer 3 is outside"):
        ViT(**VIT, output_layer=3).init(jax.random.key(0), IMAGES)


def test_vit_bad_pool_names_valid_ones():
    with pytest.raises(ValueError, match="'cls', 'gap', 'map', 'none'"):
        ViT(**VIT, pool="avg").init(jax.random.key(0), IMAGES)


def text_apply(pool, tokens, mask, causal=False, eos_id=None):
    model = TextTransformer(**TEXT, pool=pool, causal=causal, eos_id=eos_id)
    variables = model.init(jax.random.key(2), TOKENS)
    return model.apply(variables, tokens, mask)


@pytest.mark.parametrize("pool", ["last", "eos", "first", "map"])
@pytest.mark.parametrize("causal", [False, True])
def test_text_padded_tokens_change_nothing(pool, causal):
    mask = jnp.array([[True] * 6 + [False] * 4, [True] * 10])
    tokens = TOKENS.at[0, 4].set(2)  # eos (id 2) at position 4 of the first row
    out = text_apply(pool, tokens, mask, causal, eos_id=2)
    other_padding = tokens.at[0, 6:].set(7)
    np.testing.assert_allclose(out, text_apply(pool, other_padding, mask, causal, eos_id=2),
                               rtol=1e-5, atol=1e-6)
    assert out.shape == (2, 32)


def test_text_pooling_positions():
    mask = jnp.array([[True] * 6 + [False] * 4, [True] * 10])
    tokens = TOKENS.at[0, 4].set(2)
    tokens_out = text_apply("none", tokens, mask)
    np.testing.assert_allclose(text_apply("last", tokens, mask), tokens_out[[0, 1], [5, 9]],
                               rtol=1e-6)
    # Row 0 has an eos at 4; row 1 has none and falls back to its last real token.
    np.testing.assert_allclose(text_apply("eos", tokens, mask, eos_id=2),
                               tokens_out[[0, 1], [4, 9]], rtol=1e-6)
    np.testing.assert_allclose(text_apply("first", tokens, mask), tokens_out[:, 0], rtol=1e-6)


def test_text_causal_earlier_positions_ignore_later_tokens():
    out = text_apply("none", TOKENS, None, causal=True)
    out2 = text_apply("none", TOKENS.at[:, 5:].set(1), None, causal=True)
    np.testing.assert_allclose(out[:, :5], out2[:, :5], rtol=1e-5, atol=1e-6)
    bidirectional = text_apply("none", TOKENS, None), text_apply("none", TOKENS.at[:, 5:].set(1),
                                                                  None)
    assert not np.allclose(bidirectional[0][:, :5], bidirectional[1][:, :5])


def test_text_errors():
    with pytest.raises(ValueError, match="needs eos_id"):
        text_apply("eos", TOKENS, None)
    with pytest.raises(ValueError, match="exceeds the tower's max_len 12"):
        TextTransformer(**TEXT).init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


def make_two_towers(**kwargs):
    config = dict(image=dict(VIT, pool="map"), text=dict(TEXT, pool="last"), embed_dim=24)
    return TwoTowers(**{**config, **kwargs})


def test_two_towers_embeddings_normalised_and_towers_usable_alone():
    model = make_two_towers()
    variables = model.init(jax.random.key(0), IMAGES, TOKENS)
    zimg, ztxt, out = model.apply(variables, IMAGES, TOKENS)
    assert zimg.shape == ztxt.shape == (2, 24) and zimg.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.apply(variables, IMAGES, method=model.encode_image), zimg,
                               rtol=1e-6)
    np.testing.assert_allclose(model.apply(variables, TOKENS, method=model.encode_text), ztxt,
                               rtol=1e-6)
    zimg_only, ztxt_none, _ = model.apply(variables, IMAGES)
    assert ztxt_none is None and np.allclose(zimg_only, zimg)
    # Extra leading dims ([B, K, L], e.g. hard negatives) embed each row like a flat batch.
    mask = jnp.arange(10) < jnp.array([[10, 4], [7, 10]])[..., None]
    grouped = model.apply(variables, jnp.stack([TOKENS, TOKENS[::-1]]), mask,
                          method=model.encode_text)
    flat = model.apply(variables, jnp.concatenate([TOKENS, TOKENS[::-1]]), mask.reshape(4, 10),
                       method=model.encode_text)
    assert grouped.shape == (2, 2, 24)
    np.testing.assert_allclose(grouped.reshape(4, 24), flat, rtol=1e-6)
    assert not np.allclose(grouped[0, 1], ztxt[1])  # the mask reached the tower

    image_only = make_two_towers(text=None)
    image_vars = image_only.init(jax.random.key(0), IMAGES)
    assert "text_tower" not in image_vars["params"]
    with pytest.raises(ValueError, match="no text tower"):
        image_only.apply(image_vars, TOKENS, method=image_only.encode_text)


def test_temperature_and_bias_init():
    clip = make_two_towers()
    params = nn.meta.unbox(clip.init(jax.random.key(0), IMAGES, TOKENS)["params"])
    np.testing.assert_allclose(params["log_temperature"], np.log(1 / 0.07), rtol=1e-6)
    assert "logit_bias" not in params
    siglip = make_two_towers(temperature_init=two_towers.SIGLIP_TEMPERATURE_INIT,
                             bias_init=two_towers.SIGLIP_BIAS_INIT)
    variables = siglip.init(jax.random.key(0), IMAGES, TOKENS)
    params = nn.meta.unbox(variables["params"])
    np.testing.assert_allclose(params["log_temperature"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(params["logit_bias"], -10.0)
    _, _, out = siglip.apply(variables, IMAGES, TOKENS)
    np.testing.assert_allclose(out["temperature"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["bias"], -10.0)


def test_projection_options():
    model = make_two_towers(embed_dim=32, image_projection=False, text_projection_bias=True)
    params = model.init(jax.random.key(0), IMAGES, TOKENS)["params"]
    assert "image_proj" not in params  # identity: SigLIP's image tower
    zimg, _, _ = model.apply({"params": params}, IMAGES, TOKENS)
    assert zimg.shape == (2, 32)
    assert "bias" in params["text_proj"]["dense"]


def test_determinism_with_fixed_rng():
    model = make_two_towers()
    a = model.init(jax.random.key(3), IMAGES, TOKENS)
    b = model.init(jax.random.key(3), IMAGES, TOKENS)
    c = model.init(jax.random.key(4), IMAGES, TOKENS)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    leaves_a, leaves_c = jax.tree.leaves(nn.meta.unbox(a)), jax.tree.leaves(nn.meta.unbox(c))
    assert any(not np.array_equal(x, y) for x, y in zip(leaves_a, leaves_c))


def test_bfloat16_compute_float32_params():
    model = make_two_towers(dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), IMAGES, TOKENS)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype("float32")}
    features = ViT(**VIT, dtype=jnp.bfloat16).apply(
        {"params": variables["params"]["image_tower"]}, IMAGES)
    assert features.dtype == jnp.bfloat16
    zimg, ztxt, _ = model.apply(variables, IMAGES, TOKENS)
    assert zimg.dtype == ztxt.dtype == jnp.float32  # embeddings (loss inputs) in float32
    zimg32, _, _ = make_two_towers().apply(variables, IMAGES, TOKENS)
    np.testing.assert_allclose(zimg, zimg32, atol=5e-2)  # same function, lower precision


def test_every_parameter_has_logical_axes():
    model = make_two_towers(bias_init=-10.0)
    params = model.init(jax.random.key(0), IMAGES, TOKENS)["params"]
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    assert all(len(x.names) == x.value.ndim for x in boxed)
    names = {n for x in boxed for n in x.names if n}
    assert {"embed", "mlp", "heads", "head_dim", "vocab"} <= names
    assert names <= set(sharding.PARAM_AXES)  # never an activation's name (act_*)
    specs = nn.get_partition_spec(params)
    assert specs["text_tower"]["token_embed"]["embedding"] == jax.sharding.PartitionSpec(
        "vocab", "embed")
