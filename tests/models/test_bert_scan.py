"""BERT (BlipText, ALIGN's BertTextTower) with scan_layers: the same function as the unrolled
layers on the same weights (scan_layout), dropout drawn per layer, remat inside the scan, no KV
cache, and scan_layout on trees with both a ViT encoder and BERT layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import scan_layout
from vlmjax.models.bert import BertTextTower
from vlmjax.models.blip import Blip, BlipText

DEPTH = 3
BERT = dict(vocab_size=50, max_len=8, width=16, depth=DEPTH, num_heads=2, mlp_dim=24)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 50)
MASK = jnp.arange(8)[None] < jnp.array([[8], [5]])
IMAGE_EMBEDS = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 12))
WEIGHTS = jax.random.normal(jax.random.PRNGKey(4), (2, 16))  # a loss with gradients everywhere
                                                             # (a LayerNorm'd sum of squares
                                                             # has none)


def init(model, *args, **kwargs):
    return nn.unbox(model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]


def assert_trees_close(got, want, rel=1e-6):
    """Leaf by leaf within `rel` of the leaf's largest entry (float32 sums in another order)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=rel * max(1.0, float(np.abs(b).max()))), got, want)


def tower_loss(model, **kwargs):
    return lambda p: jnp.sum(model.apply({"params": p}, TOKENS, MASK, **kwargs) * WEIGHTS)


def test_unrolled_layer_names_are_unchanged():
    """The converters read layer_{i}: without scan the params are what they always were."""
    params = init(BertTextTower(**BERT), TOKENS, MASK)["bert"]
    assert sorted(params) == ["embed_norm", *[f"layer_{i}" for i in range(DEPTH)],
                              "pos_embedding", "token_embed"]
    scanned = init(BertTextTower(**BERT, scan_layers=True), TOKENS, MASK)["bert"]
    assert sorted(scanned) == ["embed_norm", "layer_scan", "pos_embedding", "token_embed"]


def test_scanned_bert_computes_the_unrolled_function_and_gradients():
    plain, scanned = BertTextTower(**BERT), BertTextTower(**BERT, scan_layers=True)
    params = init(plain, TOKENS, MASK)
    stacked = scan_layout.to_scanned(params)
    # The scanned model's own init has exactly this layout: every layer leaf with [depth, ...].
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
        jnp.shape, init(scanned, TOKENS, MASK))
    np.testing.assert_allclose(scanned.apply({"params": stacked}, TOKENS, MASK),
                               plain.apply({"params": params}, TOKENS, MASK), atol=1e-6)
    grads = jax.grad(tower_loss(plain))(params)
    scan_grads = jax.grad(tower_loss(scanned))(stacked)
    assert_trees_close(scan_layout.to_unrolled(scan_grads), grads)
    assert float(jnp.abs(grads["bert"]["layer_2"]["mlp"]["fc1"]["kernel"]).max()) > 0


def test_scanned_blip_text_keeps_its_part_and_cross_attention():
    """Both self-attentions and the cross-attention to image tokens, closed over by the scan
    body, match the unrolled layers for either part."""
    cfg = dict(BERT, parts=("encoder", "decoder"))
    plain, scanned = BlipText(**cfg), BlipText(**cfg, scan_layers=True)
    causal = MASK[:, None, None, :] & jnp.tril(jnp.ones((8, 8), bool))
    params = init(plain, TOKENS, causal, "decoder", IMAGE_EMBEDS,
                  method=lambda m, *a: [m(*a[:2], part, *a[3:]) for part in m.parts])
    stacked = scan_layout.to_scanned(params)
    outputs = {}
    for part in ("encoder", "decoder"):
        want = plain.apply({"params": params}, TOKENS, causal, part, IMAGE_EMBEDS)
        got = scanned.apply({"params": stacked}, TOKENS, causal, part, IMAGE_EMBEDS)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=part)
        outputs[part] = got
    assert not np.allclose(outputs["encoder"], outputs["decoder"])  # the part mattered


def dropout_masks(model, params, rngs):
    """The 0/1 keep-masks of every layer's MLP dropout in one training call (read off the
    running scan with a debug callback)."""
    masks = []

    def record(kept):
        masks.append(np.asarray(kept))

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.module.name == "mlp_dropout":
            jax.debug.callback(record, out != 0)
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply({"params": params}, TOKENS, MASK, train=True, rngs=rngs)
    jax.effects_barrier()
    return out, masks


def test_scanned_dropout_draws_a_mask_per_layer():
    scanned = BertTextTower(**dict(BERT, dropout=0.5), scan_layers=True)
    params = init(scanned, TOKENS, MASK)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    out, masks = dropout_masks(scanned, params, rngs)
    assert len(masks) == DEPTH
    assert all(0.3 < m.mean() < 0.7 for m in masks)  # rate 0.5: about half kept
    for i in range(DEPTH):  # split rngs: no two layers drop the same units
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), (i, j)
    assert not np.allclose(out, scanned.apply({"params": params}, TOKENS, MASK))
    again = scanned.apply({"params": params}, TOKENS, MASK, train=True, rngs=rngs)
    np.testing.assert_array_equal(out, again)  # the rng, not chance, decides


@pytest.mark.parametrize("policy", ["full", "save-dots"])
def test_remat_inside_the_scan_changes_nothing_but_memory(policy):
    cfg = dict(BERT, dropout=0.3)
    scanned = BertTextTower(**cfg, scan_layers=True)
    remat = BertTextTower(**cfg, scan_layers=True, remat=policy)
    params = init(scanned, TOKENS, MASK)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init(remat, TOKENS, MASK))
    rngs = {"dropout": jax.random.PRNGKey(3)}
    for kwargs in ({}, {"train": True, "rngs": rngs}):  # dropout: the same draws when recomputed
        np.testing.assert_allclose(remat.apply({"params": params}, TOKENS, MASK, **kwargs),
                                   scanned.apply({"params": params}, TOKENS, MASK, **kwargs),
                                   atol=1e-6)
        assert_trees_close(jax.grad(tower_loss(remat, **kwargs))(params),
                           jax.grad(tower_loss(scanned, **kwargs))(params))
    jaxpr = str(jax.make_jaxpr(lambda p: remat.apply({"params": p}, TOKENS, MASK))(params))
    assert "scan" in jaxpr and jaxpr.count("checkpoint") + jaxpr.count("remat") >= 1


def test_a_kv_cache_needs_unrolled_layers():
    text = BlipText(**BERT, parts=("decoder",), scan_layers=True)
    params = init(text, TOKENS, MASK[:, None, None, :], "decoder")
    with pytest.raises(ValueError, match="scan_layers takes no KV cache.*to_unrolled"):
        text.apply({"params": params}, TOKENS, MASK[:, None, None, :], "decoder",
                   cache={"k": (), "v": ()}, index=0)


def test_layouts_convert_bert_layers_beside_their_siblings_and_vit_blocks():
    """A BLIP model (ViT blocks, BERT layers with a prediction head beside them): to_scanned
    is the scanned model's layout, to_unrolled undoes it exactly."""
    image = dict(patch_size=8, width=12, depth=2, num_heads=2)
    text = dict(BERT, vocab_size=50)
    images, tokens = jnp.zeros((1, 16, 16, 3)), TOKENS[:1]
    params = init(Blip(image=image, text=text, embed_dim=8), images, tokens,
                  method=Blip.init_all)
    scanned = init(Blip(image=dict(image, scan_layers=True), text=dict(text, scan_layers=True),
                        embed_dim=8), images, tokens, method=Blip.init_all)
    assert "layer_scan" in scanned["text_shared"] and "lm_bias" in scanned["text_shared"]
    assert "blocks" in scanned["vision"]["encoder"]
    stacked = scan_layout.to_scanned(params)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned)
    assert scan_layout.is_scanned(stacked) and not scan_layout.is_scanned(params)
    back = scan_layout.to_unrolled(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # match_layout, both ways and with only the text scanned.
    jax.tree.map(np.testing.assert_array_equal, scan_layout.match_layout(stacked, params),
                 params)
    text_only = scan_layout.match_layout(params, {**params, "text_shared": stacked[
        "text_shared"]})
    assert "layer_scan" in text_only["text_shared"] and "block0" in text_only["vision"][
        "encoder"]


def test_match_layout_scans_only_what_the_model_scans():
    """BLIP-2's Q-Former names its layers layer_{i} too: a model with a scanned ViT and an
    unrolled Q-Former keeps the Q-Former's layers unrolled."""
    layer = {"dense": {"kernel": np.ones((2, 2))}}
    params = {"vision": {"encoder": {"block0": layer, "block1": layer}, "norm": {"scale": 1.0}},
              "qformer": {"layer_0": layer, "layer_1": layer, "query_tokens": np.zeros(3)}}
    like = {**params, "vision": {**params["vision"], "encoder": {"blocks": layer}}}
    fitted = scan_layout.match_layout(params, like)
    assert set(fitted["vision"]["encoder"]) == {"blocks"}
    assert fitted["vision"]["encoder"]["blocks"]["dense"]["kernel"].shape == (2, 2, 2)
    assert set(fitted["qformer"]) == {"layer_0", "layer_1", "query_tokens"}
    assert set(scan_layout.to_scanned(params)["qformer"]) == {"layer_scan", "query_tokens"}
    # Numbered siblings that are not an encoder's only keys (EfficientNet's block{i} beside
    # its stem) stay as they are.
    convnet = {"stem": layer, "block0": layer, "block1": {"other": np.ones(1)}}
    assert set(scan_layout.to_scanned(convnet)) == set(convnet)
