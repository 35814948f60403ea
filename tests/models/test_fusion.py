"""FusionLM (Flamingo-style): zero gates give the frozen LM exactly, text before any image is
the LM's (no NaN) with any gates, media masks (immediate / all, end of chunk), the resampler
against a numpy reference, added-token embeddings, and cached vs uncached decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.test_prefix_lm import images_of, random_params
from vlmjax.models.decoder import Decoder
from vlmjax.models.fusion import FusionLM, PerceiverResampler, media_mask_from_tokens

VOCAB, IMAGE_ID, END_ID = 40, 38, 39
VISION = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8, pool="none")
LLM = dict(vocab_size=VOCAB, width=24, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=32)
RESAMPLER = dict(num_latents=3, depth=2, num_heads=2, head_dim=8)


def make(**overrides):
    return FusionLM(**{"vision": VISION, "llm": LLM, "image_token_id": IMAGE_ID,
                       "end_of_chunk_id": END_ID, "resampler": RESAMPLER,
                       "cross_attn_every": 2, **overrides})


def interleaved(seed=0):
    """Row 0: text, image 0, text, end, text, image 1, text. Row 1: image 0 first, then text."""
    tokens = np.random.default_rng(seed).integers(0, IMAGE_ID, (2, 12)).astype(np.int32)
    tokens[0, [3, 8]] = IMAGE_ID
    tokens[0, 6] = END_ID
    tokens[1, 0] = IMAGE_ID
    return jnp.asarray(tokens)


@pytest.fixture(scope="module")
def params():
    """Random weights everywhere, gates included (tanh(gate) ~ +-0.8: the blocks matter)."""
    return random_params(make(), interleaved(), images=images_of(2, 2))


def test_media_mask_immediate_all_and_end_of_chunk():
    tokens = np.array([[5, IMAGE_ID, 6, END_ID, 7, IMAGE_ID, 8, 9]])
    immediate = media_mask_from_tokens(tokens, IMAGE_ID, 2, END_ID, True, xp=np)
    np.testing.assert_array_equal(immediate[0].T.astype(int), [[0, 1, 1, 1, 0, 0, 0, 0],
                                                               [0, 0, 0, 0, 0, 1, 1, 1]])
    every = media_mask_from_tokens(jnp.asarray(tokens), IMAGE_ID, 2, END_ID, False)
    np.testing.assert_array_equal(np.asarray(every)[0].T.astype(int),
                                  [[0, 1, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    no_end = media_mask_from_tokens(tokens, IMAGE_ID, 2, None, True, xp=np)
    assert no_end[0, 4, 0] and not no_end[0, 4, 1]  # without an end token image 0 carries on


def test_zero_gates_give_the_frozen_lms_logits_exactly(params):
    model, tokens = make(), interleaved()
    fresh = model.init(jax.random.PRNGKey(0), tokens, images=images_of(2, 2))["params"]
    logits = model.apply({"params": fresh}, tokens, images=images_of(2, 2, seed=3))
    lm_logits = Decoder(**LLM).apply({"params": fresh["llm"]}, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(lm_logits))
    for block in ("xattn0", "xattn1"):
        assert float(jnp.abs(fresh["llm"]["layers"][block]["alpha_attn"].unbox())) == 0.0
    # and the random (non-zero) gates do change them: the test above can fail
    moved = model.apply({"params": params}, tokens, images=images_of(2, 2, seed=3))
    lm_moved = Decoder(**LLM).apply({"params": params["llm"]}, tokens)
    assert float(jnp.abs(moved[1] - lm_moved[1]).max()) > 1e-3


@pytest.mark.parametrize("skip", [True, False])
def test_text_before_any_image_is_the_lms_output_without_nan(params, skip):
    model, tokens = make(cross_attention={"skip_without_media": skip}), interleaved()
    logits = model.apply({"params": params}, tokens, images=images_of(2, 2, seed=4))
    lm_logits = Decoder(**LLM).apply({"params": params["llm"]}, tokens)
    assert np.isfinite(np.asarray(logits)).all()
    if skip:  # row 0's first three tokens and the text after the end token see no image
        np.testing.assert_allclose(logits[0, :3], lm_logits[0, :3], atol=1e-6)
    else:  # Idefics: only the attention output is zeroed, the gated FFN still applies
        assert float(jnp.abs(logits[0, :3] - lm_logits[0, :3]).max()) > 1e-3


def test_only_immediate_media_reads_the_latest_image_only(params):
    tokens = interleaved()
    images = images_of(2, 2, seed=5)
    changed = images.at[:, 0].set(images_of(2, seed=6))  # image 0 replaced
    # Two documents, so self-attention carries nothing from the text after image 0 to the text
    # after image 1: what changes there came through the cross-attention.
    segments = jnp.asarray(np.repeat([[1] * 8 + [2] * 4], 2, axis=0))
    for immediate, after_image1_changes in ((True, False), (False, True)):
        model = make(only_attend_immediate_media=immediate)
        a, b = (model.apply({"params": params}, tokens, images=x, segment_ids=segments)
                for x in (images, changed))
        # row 0, tokens 8.. follow image 1; the earlier ones follow image 0
        assert (float(jnp.abs(a[0, 8:] - b[0, 8:]).max()) > 1e-4) == after_image1_changes
        assert float(jnp.abs(a[0, 3:6] - b[0, 3:6]).max()) > 1e-4


def test_image_mask_argument_equals_the_derived_one(params):
    model, tokens, images = make(), interleaved(), images_of(2, 2, seed=7)
    derived = model.apply({"params": params}, tokens, images=images)
    mask = media_mask_from_tokens(np.asarray(tokens), IMAGE_ID, 2, END_ID, xp=np)
    given = model.apply({"params": params}, tokens, images=images, image_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(derived), np.asarray(given))
    with pytest.raises(ValueError, match="image_mask has shape"):
        model.apply({"params": params}, tokens, images=images, image_mask=jnp.asarray(mask)[:, 1:])


def _layer_norm(x, p, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_perceiver_resampler_equals_a_numpy_reference():
    module = PerceiverResampler(**RESAMPLER)
    features = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    p = random_params(module, jnp.asarray(features))
    out = np.asarray(module.apply({"params": p}, jnp.asarray(features)))
    p = jax.tree.map(np.asarray, p)
    x = np.broadcast_to(p["latents"], (2, 3, 16))
    for i in range(RESAMPLER["depth"]):
        a = p[f"block{i}_attn"]
        f, lat = _layer_norm(features, a["features_norm"]), _layer_norm(x, a["latents_norm"])
        both = np.concatenate([f, lat], axis=1)
        q = np.einsum("bld,dhk->bhlk", lat, a["query"]["kernel"])
        k = np.einsum("bld,dhk->bhlk", both, a["key"]["kernel"])
        v = np.einsum("bld,dhk->bhlk", both, a["value"]["kernel"])
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("bhlk,hkd->bld", w @ v, a["out"]["kernel"])
        h = np.maximum(_layer_norm(x, p[f"block{i}_mlp_norm"]) @ p[f"block{i}_fc"]["kernel"], 0)
        x = x + h @ p[f"block{i}_proj"]["kernel"]
    np.testing.assert_allclose(out, _layer_norm(x, p["final_norm"]), atol=2e-5)


def test_added_tokens_read_their_own_rows_and_logits(params):
    model = make(additional_vocab_size=2)
    tokens = interleaved().at[1, 5].set(VOCAB + 1)
    p = random_params(model, tokens, images=images_of(2, 2))
    logits = model.apply({"params": p}, tokens, images=images_of(2, 2))
    assert logits.shape[-1] == VOCAB + 2
    embedded = model.apply({"params": p}, tokens, method=model.embed)
    np.testing.assert_array_equal(np.asarray(embedded[1, 5]),
                                  np.asarray(p["additional_embed"][1]))


def test_cached_decoding_equals_uncached(params):
    from vlmjax.inference import generate

    model, images = make(), images_of(2, 2, seed=8)
    # Both rows hold both images: a generated image token (frequent with random weights) then
    # refers to no image, in the cache as in the uncached forward.
    prompt = interleaved(seed=2)[:, :10].at[1, 5].set(IMAGE_ID)
    out = generate(model, params, prompt, images=images, max_new_tokens=4, prompt_buckets=None)
    sequence = prompt
    for _ in range(4):  # greedy by hand, every step a full uncached forward
        logits = model.apply({"params": params}, sequence, images=images)
        sequence = jnp.concatenate([sequence, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(sequence[:, 10:]))
    # the same through the cache step by step: the logits agree, not just their argmax
    length = sequence.shape[1]
    reference = model.apply({"params": params}, sequence, images=images)
    ones = jnp.ones(sequence.shape, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), sequence.shape)
    cache = model.init_cache(2, 16)
    logits, cache = model.apply({"params": params}, sequence[:, :10], images=images,
                                segment_ids=ones[:, :10], positions=positions[:, :10],
                                cache=cache)
    steps = [logits]
    for t in range(10, length):
        logits, cache = model.apply({"params": params}, sequence[:, t:t + 1],
                                    segment_ids=ones[:, t:t + 1],
                                    positions=positions[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), reference, atol=1e-4)
    assert set(cache) <= set(model.cache_logical_axes())
    beams = model.reorder_cache(cache, jnp.array([1, 0]))
    np.testing.assert_array_equal(beams["media_k"][0][0], cache["media_k"][0][1])
