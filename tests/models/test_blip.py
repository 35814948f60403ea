"""BLIP model: the three text modes, parameter sharing, padding and the KV cache (greedy captions
through vlmjax.inference.generate: tests/convert/test_hf_blip.py, token-identical to HF)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models.blip import Blip

VOCAB = 40
IMAGE = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, norm_eps=1e-5)
TEXT = dict(vocab_size=VOCAB, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=48)


def make(**overrides):
    return Blip(**{**dict(image=IMAGE, text=TEXT, embed_dim=16), **overrides})


def randomise(params, seed=1):
    """O(1) weights so that outputs are far from uniform and differences show."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x if x.ndim == 0 else
              jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 1)
              + (x.ndim == 1) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, leaves)


def images_of(batch, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 16, 16, 3)), jnp.float32)


def tokens_of(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, VOCAB, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def model_params():
    model = make()
    init = jax.jit(lambda rng: model.init(rng, images_of(1), tokens_of(1, 4),
                                          method=model.init_all))
    return model, randomise(nn.meta.unbox(init(jax.random.PRNGKey(0))["params"]))


def test_encoder_and_decoder_share_all_but_self_attention(model_params):
    model, params = model_params
    layer = params["text_shared"]["layer_0"]
    assert set(layer) == {"self_attention_encoder", "self_attention_decoder", "cross_attention",
                          "mlp", "mlp_norm"}
    images, tokens = images_of(2), tokens_of(2, 6)
    apply = lambda p, method: model.apply({"params": p}, images, tokens, method=method)  # noqa
    # The decoder's self-attention moves the caption logits only; the encoder's, ITC and ITM.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["text_shared"]["layer_0"]["self_attention_decoder"]["query"]["kernel"] += 1.0
    np.testing.assert_array_equal(apply(params, model.itm_logits), apply(bumped, model.itm_logits))
    assert not np.allclose(apply(params, model.caption_logits),
                           apply(bumped, model.caption_logits))
    # The cross-attention is shared: it moves both image-grounded modes, and not ITC's text.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["text_shared"]["layer_1"]["cross_attention"]["value"]["kernel"] += 1.0
    assert not np.allclose(apply(params, model.itm_logits), apply(bumped, model.itm_logits))
    assert not np.allclose(apply(params, model.caption_logits),
                           apply(bumped, model.caption_logits))
    text = lambda p: model.apply({"params": p}, tokens, method=model.encode_text)  # noqa
    np.testing.assert_array_equal(text(params), text(bumped))


def test_share_nothing_and_parts():
    model = make(share="nothing")
    v = model.init(jax.random.PRNGKey(0), images_of(1), tokens_of(1, 4), method=model.init_all)
    params = nn.meta.unbox(v["params"])
    assert {"text_encoder", "text_decoder"} <= set(params) and "text_shared" not in params
    assert "self_attention_decoder" not in params["text_encoder"]["layer_0"]
    assert "lm_bias" in params["text_decoder"] and "lm_bias" not in params["text_encoder"]
    retrieval = make(parts=("encoder",))
    v = retrieval.init(jax.random.PRNGKey(0), images_of(1), tokens_of(1, 4),
                       method=retrieval.init_all)
    assert "lm_bias" not in v["params"]["text_shared"]
    with pytest.raises(ValueError, match="no text decoder"):
        retrieval.apply(v, images_of(1), tokens_of(1, 4), method=retrieval.caption_logits)
    with pytest.raises(ValueError, match="share"):
        make(share="some").init(jax.random.PRNGKey(0), images_of(1), tokens_of(1, 4),
                                method=Blip.init_all)


def test_padding_never_changes_real_tokens(model_params):
    model, params = model_params
    images, tokens = images_of(2), tokens_of(2, 5)
    padded = jnp.concatenate([tokens, jnp.zeros((2, 3), jnp.int32)], axis=1)
    mask = jnp.arange(8)[None] < 5
    full_mask = jnp.broadcast_to(mask, (2, 8))
    run = lambda method, t, m: model.apply({"params": params}, images, t, m, method=method)  # noqa
    text = lambda t, m: model.apply({"params": params}, t, m, method=model.encode_text)  # noqa
    np.testing.assert_allclose(text(tokens, None), text(padded, full_mask), atol=1e-5)
    np.testing.assert_allclose(run(model.itm_logits, tokens, None),
                               run(model.itm_logits, padded, full_mask),
                               atol=1e-5)
    np.testing.assert_allclose(run(model.caption_logits, tokens, None),
                               run(model.caption_logits, padded, full_mask)[:, :5], atol=1e-5)


def test_itc_features_are_unit_vectors_and_temperature_is_clamped(model_params):
    model, params = model_params
    z = model.apply({"params": params}, images_of(3), method=model.encode_image)
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
    hot = dict(params, temp=jnp.float32(2.0))
    t, grad = jax.value_and_grad(
        lambda p: model.apply({"params": p}, method=model.temperature))(hot)
    assert float(t) == pytest.approx(0.5) and float(grad["temp"]) == 1.0  # straight through


def test_cached_decoding_equals_teacher_forcing_on_left_padded_prompts(model_params):
    model, params = model_params
    images, tokens = images_of(2), tokens_of(2, 7)
    embeds = model.apply({"params": params}, images, method=model.image_features)
    full = model.apply({"params": params}, tokens, image_embeds=embeds)
    np.testing.assert_allclose(full, model.apply({"params": params}, images, tokens,
                                                 method=model.caption_logits), atol=1e-5)
    # Row 1 is left-padded by 2: its prompt is tokens[1, :3]; prefill 3 slots, then one by one.
    prompt = jnp.stack([tokens[0, :3], jnp.array([0, 0, tokens[1, 0]])])
    seg = jnp.array([[1, 1, 1], [0, 0, 1]])
    pos = jnp.array([[0, 1, 2], [0, 0, 0]])
    cache = model.init_cache(2, 8)
    logits, cache = model.apply({"params": params}, prompt, segment_ids=seg, positions=pos,
                                cache=cache, image_embeds=embeds)
    np.testing.assert_allclose(logits[0], full[0, :3], atol=1e-4)
    np.testing.assert_allclose(logits[1, 2], full[1, 0], atol=1e-4)
    next_pos = jnp.array([3, 1])
    for t in range(3):
        step_tokens = jnp.stack([tokens[0, 3 + t], tokens[1, 1 + t]])[:, None]
        logits, cache = model.apply({"params": params}, step_tokens,
                                    segment_ids=jnp.ones((2, 1), jnp.int32),
                                    positions=(next_pos + t)[:, None], cache=cache,
                                    image_embeds=embeds)
        np.testing.assert_allclose(logits[0, 0], full[0, 3 + t], atol=1e-4)
        np.testing.assert_allclose(logits[1, 0], full[1, 1 + t], atol=1e-4)


def test_fan_in_init_scales_kernels_and_lets_itm_learn_a_colour_match():
    """init_scheme="fan_in": attention kernels have std 1 / sqrt(fan_in) (BERT's 0.02 at width 768), and
    ITM trained from scratch on solid-colour images vs their colour word leaves its prior (with
    BERT's 0.02 at width 32 it stays at the prior: the cross-attention barely reaches [ENC])."""
    import optax

    from vlmjax.losses import matching
    model = make(image={**IMAGE, "stem": "conv"}, text={**TEXT, "depth": 1, "init_scheme": "fan_in"})
    with pytest.raises(ValueError, match="not one of"):
        make(text={**TEXT, "init_scheme": "xavier"}).init(jax.random.PRNGKey(0), images_of(1),
                                                   tokens_of(1, 3), method=Blip.init_all)
    params = nn.meta.unbox(jax.jit(lambda r: model.init(r, images_of(1), tokens_of(1, 3),
                                                        method=model.init_all))(
        jax.random.PRNGKey(0))["params"])
    cross = params["text_shared"]["layer_0"]["cross_attention"]
    assert float(jnp.std(cross["key"]["kernel"])) == pytest.approx(1 / np.sqrt(32), rel=0.1)
    assert float(jnp.std(cross["out"]["kernel"])) == pytest.approx(1 / np.sqrt(32), rel=0.1)
    rng = np.random.default_rng(0)
    colours = rng.uniform(-1, 1, (6, 3)).astype(np.float32)
    tx = optax.adam(1e-3)

    def loss(p, images, tokens, negatives):
        embeds = model.apply({"params": p}, images, method=model.image_features)
        itm = lambda t: model.apply({"params": p}, None, t, image_embeds=embeds,  # noqa: E731
                                    method=model.itm_logits)
        return matching.itm_loss(itm(tokens), itm(negatives), jnp.ones(len(tokens), bool))

    @jax.jit
    def step(p, state, images, tokens, negatives):
        (_, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(p, images, tokens,
                                                                       negatives)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, accuracy

    state = tx.init(params)
    for _ in range(80):
        colour = rng.integers(0, 6, 32)
        other = (colour + rng.integers(1, 6, 32)) % 6
        images = np.broadcast_to(colours[colour][:, None, None], (32, 16, 16, 3))
        tokens = np.stack([np.full(32, 1), 10 + colour, np.full(32, 2)], 1)
        negatives = tokens.copy()
        negatives[:, 1] = 10 + other
        params, state, accuracy = step(params, state, jnp.asarray(images), jnp.asarray(tokens),
                                       jnp.asarray(negatives))
    assert float(accuracy) >= 0.95  # the prior (half the pairs) is 0.5


def test_cnn_image_tower_tokens_are_its_max_then_its_positions():
    """image_arch 'cnn': the feature map's positions, after their max in the class token's
    place; the ITC feature is vision_proj of that max; an unknown arch is named."""
    from vlmjax.models.convnet import ConvNet
    cnn = dict(channels=(8, 16), patch_size=2)
    model = make(image=cnn, image_arch="cnn")
    images = images_of(2)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, tokens_of(2, 4),
                                      method=model.init_all)["params"])
    tokens = model.apply({"params": params}, images, method=model.image_features)
    grid = ConvNet(**cnn, pool="none").apply({"params": params["vision"]}, images)
    assert tokens.shape == (2, 1 + 2 * 2, 16) and grid.shape == (2, 2, 2, 16)
    np.testing.assert_allclose(tokens[:, 1:], grid.reshape(2, 4, 16), rtol=1e-6)
    np.testing.assert_allclose(tokens[:, 0], grid.max(axis=(1, 2)), rtol=1e-6)
    feat = model.apply({"params": params}, images, method=model.encode_image)
    proj = params["vision_proj"]
    expected = grid.max(axis=(1, 2)) @ proj["kernel"] + proj["bias"]
    np.testing.assert_allclose(feat, expected / np.linalg.norm(expected, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"image_arch 'resnet' is not one of \('vit', 'cnn'\)"):
        make(image_arch="resnet").init(jax.random.PRNGKey(0), images, tokens_of(2, 4),
                                       method=Blip.init_all)
