"""PrefixLM (LLaVA / PaliGemma style): visual tokens in the image-token rows, feature layers and
select strategies against the ViT itself, prefix attention, KV cache, several images per sample;
and the ViT's `return_layers` against `output_layer` (unrolled and scanned)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import scan_layout
from vlmjax.models.decoder import Decoder
from vlmjax.models.prefix_lm import PrefixLM, instance_standardize
from vlmjax.models.vit import ViT

VOCAB, IMAGE_ID, SIZE = 40, 39, 16
VISION = dict(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=8, pool="cls")  # 4 + CLS
LLM = dict(vocab_size=VOCAB, width=24, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=32)
T = 4  # visual tokens per image with the class token dropped


def make(**overrides):
    return PrefixLM(**{"vision": VISION, "llm": LLM, "image_token_id": IMAGE_ID, **overrides})


def images_of(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(*shape, SIZE, SIZE, 3)),
                       jnp.float32)


def text_tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, IMAGE_ID, (batch, length)).astype(np.int32)


def with_images(tokens, starts, count=T):
    tokens = np.array(tokens)
    for row, start in enumerate(starts):
        if start is not None:
            tokens[row, start:start + count] = IMAGE_ID
    return jnp.asarray(tokens)


def param_shapes(module, *args, **kwargs):
    """The params' shapes (tracing only: no initialiser runs, which is slow on a CPU)."""
    return nn.meta.unbox(jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"])


def random_params(module, *args, seed=1, **kwargs):
    """O(1) random weights (so that differences show) in the module's layout."""
    leaves, treedef = jax.tree.flatten(param_shapes(module, *args, **kwargs))
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[0] if len(x.shape) > 1
                                                             else 1) + (len(x.shape) == 1),
                          jnp.float32) for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def params():
    return random_params(make(), with_images(text_tokens(1, 8), [1]), images=images_of(1))


def vit_states(params, images, layer, pool="none"):
    """The reference: the ViT itself with `output_layer` (a block index), all tokens."""
    tower = ViT(**{**VISION, "pool": pool, "class_token": True, "output_layer": layer})
    return tower.apply({"params": params["vision"]}, images)


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def mlp2x_gelu(p, x):
    return dense(p["linear_2"], jax.nn.gelu(dense(p["linear_1"], x), approximate=False))


def test_parameter_layout_is_vision_projector_llm(params):
    assert set(params) == {"vision", "projector", "llm"}
    vit = param_shapes(ViT(**{**VISION, "output_layer": -2}), images_of(1))
    assert jax.tree.structure(params["vision"]) == jax.tree.structure(vit)
    llm = param_shapes(Decoder(**LLM), jnp.zeros((1, 2), jnp.int32))
    assert jax.tree.structure(params["llm"]) == jax.tree.structure(llm)
    assert set(params["projector"]) == {"linear_1", "linear_2"}
    assert params["projector"]["linear_1"]["kernel"].shape == (16, 24)
    tokens = with_images(text_tokens(1, 6), [0])
    three = param_shapes(make(projector="mlp3x_gelu", vision_feature_layer=[-1, -2]), tokens,
                         images=images_of(1))
    assert set(three["projector"]) == {"linear_1", "linear_2", "linear_3"}
    assert three["projector"]["linear_1"]["kernel"].shape == (32, 24)
    # A ViT module works as the vision config.
    as_module = param_shapes(make(vision=ViT(**VISION)), tokens, images=images_of(1))
    assert jax.tree.structure(as_module) == jax.tree.structure(params)


def test_visual_tokens_fill_exactly_the_image_token_rows(params):
    model = make()
    images = images_of(2, seed=1)
    tokens = with_images(text_tokens(2, 12), [2, 6])
    embeddings, bad = model.apply({"params": params}, tokens, images, method=model.embed_inputs)
    assert not np.asarray(bad).any()
    # By hand: the ViT's penultimate hidden states without CLS, through the MLP projector.
    features = mlp2x_gelu(params["projector"], vit_states(params, images, -2)[:, 1:])
    expected = np.asarray(params["llm"]["embed"]["embedding"])[np.asarray(tokens)]
    expected[0, 2:6] = features[0]
    expected[1, 6:10] = features[1]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    logits = model.apply({"params": params}, tokens, images=images)
    reference = Decoder(**LLM).apply({"params": params["llm"]}, tokens,
                                     embeddings=jnp.asarray(expected))
    assert logits.shape == (2, 12, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=1e-4)


def test_projector_posemb_adds_one_vector_per_token_position_of_each_image(params):
    """Two images per row: both get the same [T, D] position vectors on top of the MLP."""
    model = make(projector_posemb=True)
    images = images_of(1, 2, seed=2)
    tokens = with_images(with_images(text_tokens(1, 14), [1]), [7])
    shapes = param_shapes(model, tokens, images=images)
    assert shapes["projector"]["posemb"].shape == (T, 24)
    posemb = np.random.default_rng(3).normal(size=(T, 24)).astype(np.float32)
    with_posemb = {**params, "projector": {**params["projector"], "posemb": posemb}}
    embeddings, _ = model.apply({"params": with_posemb}, tokens, images,
                                method=model.embed_inputs)
    features = mlp2x_gelu(params["projector"], vit_states(params, images[0], -2)[:, 1:])
    np.testing.assert_allclose(embeddings[0, 1:5], features[0] + posemb, atol=1e-5)
    np.testing.assert_allclose(embeddings[0, 7:11], features[1] + posemb, atol=1e-5)


def test_projector_norm_instance_standardises_each_channel_over_its_image(params):
    """Each image's [T, C] features, per channel: minus the mean over T, over the std (by
    hand in numpy), then the MLP; a channel constant over an image maps to 0."""
    model = make(projector_norm="instance")
    images = images_of(1, 2, seed=4)
    tokens = with_images(with_images(text_tokens(1, 14), [1]), [7])
    embeddings, _ = model.apply({"params": params}, tokens, images, method=model.embed_inputs)
    for image, start in ((0, 1), (1, 7)):
        states = np.asarray(vit_states(params, images[0, image:image + 1], -2)[:, 1:],
                            np.float64)
        standard = (states - states.mean(1, keepdims=True)) / states.std(1, keepdims=True)
        np.testing.assert_allclose(embeddings[0, start:start + T],
                                   mlp2x_gelu(params["projector"], standard)[0], atol=1e-4)
    constant = instance_standardize(jnp.ones((1, T, 3)) * jnp.array([1.0, -2.0, 5.0]))
    np.testing.assert_array_equal(constant, np.zeros((1, T, 3)))
    with pytest.raises(ValueError, match="projector_norm 'batch' is not one of"):
        make(projector_norm="batch").init(jax.random.PRNGKey(0), tokens, images=images)


@pytest.mark.parametrize("layer,strategy", [(-1, "full"), ([-1, -3], "default"),
                                            ([1, -2], "full")])
def test_feature_layers_and_select_strategy_pick_the_vits_states(layer, strategy):
    model = make(vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                 projector="linear")
    images = images_of(2, seed=2)
    tokens = with_images(text_tokens(2, 8), [0, 0], count=5 if strategy == "full" else 4)
    params = random_params(model, tokens, images=images, seed=3)
    got = model.apply({"params": params}, images, method=model.image_features)
    layers = [layer] if isinstance(layer, int) else layer
    # HF hidden_states index i >= 0 is the output of i blocks: output_layer i - 1.
    states = [vit_states(params, images, i - 1 if i > 0 else i) for i in layers]
    if strategy == "default":
        states = [s[:, 1:] for s in states]
    expected = dense(params["projector"]["linear_1"], jnp.concatenate(states, axis=-1))
    assert got.shape == (2, 5 if strategy == "full" else 4, 24)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("layer", [-1, -2, [-3, 1]])
def test_cnn_tower_tokens_are_its_feature_maps_row_major(layer):
    """vision_arch='cnn': the ConvNet's stage outputs (the tower itself, pool 'none', cut after
    that stage) flattened row-major are the visual tokens; later stages are not built."""
    from vlmjax.models.convnet import ConvNet
    channels = (4, 6, 8)  # 16 px: 8 -> 4 -> 2 -> 1 grid
    model = make(vision=dict(channels=channels, patch_size=2), vision_arch="cnn",
                 vision_feature_layer=layer, vision_feature_select_strategy="full",
                 projector="linear")
    layers = [layer] if isinstance(layer, int) else layer
    stage = max(i % 4 for i in layers)
    images = images_of(2, seed=5)
    count = (SIZE // 2 // 2 ** stage) ** 2
    params = random_params(model, with_images(text_tokens(2, count + 2), [0, 1], count=count),
                           images=images, seed=6)
    assert set(params["vision"]) == {f"conv{i}" for i in range(stage)}
    got = model.apply({"params": params}, images, method=model.image_features)
    maps = ConvNet(channels=channels[:stage], pool="none").apply(
        {"params": params["vision"]}, images)
    tokens = maps.reshape(2, count, channels[stage - 1])
    expected = dense(params["projector"]["linear_1"],
                     jnp.concatenate([tokens] * len(layers), axis=-1))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cnn_feature_layers_of_different_grids_are_an_error():
    model = make(vision=dict(channels=(4, 6), patch_size=2), vision_arch="cnn",
                 vision_feature_layer=[-1, -2], vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match=r"feature maps of different sizes"):
        param_shapes(model, with_images(text_tokens(1, 20), [0], count=16), images=images_of(1))


def test_vit_return_layers_equal_output_layer_unrolled_and_scanned():
    images = images_of(2, seed=4)
    vit = ViT(**{**VISION, "return_layers": (-1, 0, 2, -3)})
    params = random_params(vit, images)
    assert "final_norm" not in params and sorted(params["encoder"]) == [
        "block0", "block1", "block2"]
    states = vit.apply({"params": params}, images)
    for state, block in zip(states[::2], (-1, 1)):
        np.testing.assert_allclose(state, vit_states({"vision": params}, images, block),
                                   atol=1e-5)
    np.testing.assert_allclose(states[3], vit_states({"vision": params}, images, 0), atol=1e-5)
    # Index 0 is the embedded tokens: what the blocks start from (zero blocks built).
    embedded = ViT(**{**VISION, "return_layers": (0,)})
    assert "encoder" not in param_shapes(embedded, images)
    np.testing.assert_allclose(embedded.apply({"params": params}, images)[0], states[1],
                               atol=1e-6)
    scanned = ViT(**{**VISION, "return_layers": (-1, 0, 2, -3), "scan_layers": True})
    for got, want in zip(scanned.apply({"params": scan_layout.to_scanned(params)}, images),
                         states):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="return_layers entry 5 is outside"):
        param_shapes(ViT(**{**VISION, "return_layers": (5,)}), images)


def test_image_token_count_mismatch_is_an_error(params):
    model = make()
    images = images_of(2)
    tokens = with_images(with_images(text_tokens(2, 12), [2, None]), [None, 3], count=T - 1)
    with pytest.raises(ValueError, match=r"row 1 holds 3 image tokens.*4 visual tokens"):
        model.apply({"params": params}, tokens, images=images)
    with pytest.raises(ValueError, match=r"row 0 holds 8 image tokens.*4 visual tokens"):
        model.apply({"params": params}, with_images(text_tokens(2, 12), [0, None], count=8),
                    images=images)
    # Under jit the counts are unknown while tracing: the bad row's logits are NaN.
    logits = jax.jit(lambda p, t, i: model.apply({"params": p}, t, images=i))(
        params, tokens, images)
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all()
    with pytest.raises(ValueError, match="'default' drops the class token"):
        param_shapes(make(vision={**VISION, "pool": "map"}), tokens, images=images)
    with pytest.raises(ValueError, match="mlp2x_relu"):
        param_shapes(make(projector="mlp2x_relu"), tokens, images=images)


def test_several_images_per_sample_and_text_only_rows(params):
    model = make()
    images = images_of(3, 2, seed=5)  # [B=3, N=2]
    tokens = np.array(text_tokens(3, 14, seed=6))
    tokens[0, 1:9] = IMAGE_ID     # both images
    tokens[1, 4:8] = IMAGE_ID     # only the first image (the second is padding)
    embeddings, _ = model.apply({"params": params}, jnp.asarray(tokens), images,
                                method=model.embed_inputs)
    first = model.apply({"params": params}, images[:, 0], method=model.image_features)
    second = model.apply({"params": params}, images[:, 1], method=model.image_features)
    np.testing.assert_allclose(embeddings[0, 1:5], first[0], atol=1e-5)
    np.testing.assert_allclose(embeddings[0, 5:9], second[0], atol=1e-5)
    np.testing.assert_allclose(embeddings[1, 4:8], first[1], atol=1e-5)
    table = np.asarray(params["llm"]["embed"]["embedding"])
    np.testing.assert_allclose(embeddings[2], table[tokens[2]], atol=1e-6)  # text only
    logits = model.apply({"params": params}, jnp.asarray(tokens), images=images)
    text_only = Decoder(**LLM).apply({"params": params["llm"]}, jnp.asarray(tokens[2:]))
    np.testing.assert_allclose(logits[2:], text_only, atol=1e-4)


def test_full_prefix_attention_is_bidirectional_over_the_prefix_only(params):
    full, causal = make(prefix_attention="full"), make()
    images = images_of(2, seed=7)
    tokens = with_images(text_tokens(2, 12, seed=8), [0, 1])
    prefix = jnp.asarray(np.arange(12)[None] < np.array([[7], [8]]))  # image + prompt

    def run(model, t, **kw):
        return np.asarray(model.apply({"params": params}, t, images=images, **kw))

    base = run(full, tokens, prefix_mask=prefix)
    prompt_changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % IMAGE_ID)  # a later prompt token
    seen = np.abs(run(full, prompt_changed, prefix_mask=prefix)[:, :6] - base[:, :6])
    assert (seen.max(axis=(1, 2)) > 1e-3).all()  # earlier prefix positions see it under `full`
    np.testing.assert_allclose(run(causal, prompt_changed)[:, :6], run(causal, tokens)[:, :6],
                               atol=1e-5)  # ... never under `causal`
    answer_changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % IMAGE_ID)
    np.testing.assert_allclose(run(full, answer_changed, prefix_mask=prefix)[:, :10],
                               base[:, :10], atol=1e-5)  # answers stay causal
    with pytest.raises(ValueError, match="needs prefix_mask"):
        run(full, tokens)
    with pytest.raises(ValueError, match="prefix_attention='full'"):
        run(causal, tokens, prefix_mask=prefix)


@pytest.mark.parametrize("attention", ["causal", "full"])
def test_cached_prefill_and_decode_equal_the_uncached_forward(params, attention):
    model = make(prefix_attention=attention)
    images = images_of(2, 2, seed=9)
    prompt_len, length = 11, 14
    tokens = np.array(text_tokens(2, length, seed=10))
    tokens[0, 1:9] = IMAGE_ID  # two images
    tokens[1, 2:6] = IMAGE_ID  # one
    tokens = jnp.asarray(tokens)
    extra = {"prefix_mask": jnp.asarray(np.arange(length)[None] < prompt_len)} if (
        attention == "full") else {}
    reference = model.apply({"params": params}, tokens, images=images,
                            **{k: jnp.broadcast_to(v, tokens.shape) for k, v in extra.items()})
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    ones = jnp.ones(tokens.shape, jnp.int32)

    @jax.jit
    def run(p):
        cache = model.init_cache(2, 16)
        logits, cache = model.apply({"params": p}, tokens[:, :prompt_len], images=images,
                                    segment_ids=ones[:, :prompt_len],
                                    positions=positions[:, :prompt_len], cache=cache)
        steps = [logits]
        for t in range(prompt_len, length):
            logits, cache = model.apply({"params": p}, tokens[:, t:t + 1],
                                        segment_ids=ones[:, t:t + 1],
                                        positions=positions[:, t:t + 1], cache=cache)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1), cache

    cached, cache = run(params)
    assert int(cache["index"]) == length
    np.testing.assert_allclose(cached, reference, atol=1e-4)
    reordered = model.reorder_cache(cache, jnp.array([1, 0]))
    np.testing.assert_array_equal(reordered["k"][-1][0], cache["k"][-1][1])
    assert set(model.cache_logical_axes()) == set(cache)


def test_generate_with_images_matches_uncached_greedy(params):
    from vlmjax.inference import generate

    model = make()
    images = images_of(2, seed=11)
    tokens = with_images(text_tokens(2, 7, seed=12), [1, 2])
    out = generate(model, params, tokens, images=images, max_new_tokens=3, prompt_buckets=None)
    sequence = tokens
    for _ in range(3):  # greedy by hand with the uncached forward
        logits = model.apply({"params": params}, sequence, images=images)
        sequence = jnp.concatenate([sequence, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(out.tokens, sequence[:, 7:])
