"""Decoder: packing, KV cache, GQA, sliding window, layouts and sharding against references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.models import layers, scan_layout
from vlmjax.models.decoder import Decoder, attention_mask, output_kernel, segment_positions

VOCAB = 61
CONFIG = dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


def make(**overrides):
    return Decoder(**{**CONFIG, **overrides})


@pytest.fixture(scope="module")
def model_params():
    model = make()
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    # O(1) weights so that the logits are far from uniform and differences show.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 1) + (x.ndim == 1)
              for k, x in zip(keys, leaves)]
    return model, jax.tree.unflatten(treedef, leaves)


def tokens_of(batch, length, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)), jnp.int32)


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_attention_mask_causal_within_document_and_window():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    slots = jnp.arange(6)
    mask = np.asarray(attention_mask(seg, seg, slots, slots))[0, 0]
    expected = np.zeros((6, 6), bool)
    for q in range(6):
        for k in range(q + 1):
            expected[q, k] = seg[0, q] == seg[0, k] != 0
    np.testing.assert_array_equal(mask, expected)
    windowed = np.asarray(attention_mask(seg, seg, slots, slots, sliding_window=2))[0, 0]
    np.testing.assert_array_equal(windowed, expected & (slots[:, None] - slots[None] < 2))


def test_packed_documents_equal_documents_run_separately(model_params):
    model, params = model_params
    docs = [tokens_of(1, n, seed=n) for n in (5, 3, 4)]
    packed = jnp.concatenate(docs + [jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 3 + [3] * 4 + [0] * 2])
    logits = model.apply({"params": params}, packed, segment_ids=seg)
    start = 0
    for doc in docs:
        alone = model.apply({"params": params}, doc)
        np.testing.assert_allclose(logits[:, start:start + doc.shape[1]], alone, atol=1e-5)
        start += doc.shape[1]


def test_cached_decoding_equals_full_forward_on_left_padded_prompts(model_params):
    model, params = model_params
    lengths = [6, 3]
    full = tokens_of(2, 10, seed=3)
    # Left-pad row 1 by 3: its real tokens are full[1, :7] shifted right.
    pad = 6 - lengths[1]
    mask = np.ones((2, 10), bool)
    mask[1, :pad] = False
    padded = np.asarray(full).copy()
    padded[1, pad:] = np.asarray(full)[1, :10 - pad]
    padded[1, :pad] = 0
    segment_ids = jnp.asarray(mask, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = model.init_cache(2, 10)
    prefill, cache = model.apply({"params": params}, jnp.asarray(padded[:, :6]),
                                 segment_ids=segment_ids[:, :6], positions=positions[:, :6],
                                 cache=cache)
    steps = [prefill]
    for t in range(6, 10):
        step, cache = model.apply({"params": params}, jnp.asarray(padded[:, t:t + 1]),
                                  segment_ids=segment_ids[:, t:t + 1],
                                  positions=positions[:, t:t + 1], cache=cache)
        steps.append(step)
    cached = np.concatenate(steps, axis=1)
    assert int(cache["index"]) == 10
    # Reference: each row's real tokens alone, no padding, no cache.
    for row in range(2):
        real = jnp.asarray(padded[row][mask[row]])[None]
        alone = model.apply({"params": params}, real)
        np.testing.assert_allclose(cached[row][mask[row]], alone[0], atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv(model_params):
    model, params = model_params
    mha = make(num_kv_heads=4)
    repeated = jax.tree.map(lambda x: x, params)
    for block in repeated["layers"].values():
        for name in ("key", "value"):
            block[name]["kernel"] = jnp.repeat(block[name]["kernel"], 2, axis=1)
    tokens = tokens_of(2, 7)
    np.testing.assert_allclose(mha.apply({"params": repeated}, tokens),
                               model.apply({"params": params}, tokens), atol=1e-5)


def test_sliding_window_equals_dense_within_window_and_differs_beyond(model_params):
    model, params = model_params
    windowed = make(sliding_window=3)
    tokens = tokens_of(1, 8)
    dense = model.apply({"params": params}, tokens)
    local = windowed.apply({"params": params}, tokens)
    np.testing.assert_allclose(local[:, :3], dense[:, :3], atol=1e-6)
    assert np.abs(local[:, 3:] - dense[:, 3:]).max() > 1e-3
    # One layer: position t sees exactly tokens t-2..t, so it equals the dense model on that
    # window (deeper, the receptive field grows by the window per layer).
    one = {**params, "layers": {"block0": params["layers"]["block0"]}}
    local_one = make(depth=1, sliding_window=3).apply({"params": one}, tokens)
    for t in range(3, 8):
        alone = make(depth=1).apply({"params": one}, tokens[:, t - 2:t + 1],
                                    positions=jnp.arange(t - 2, t + 1)[None])
        np.testing.assert_allclose(local_one[:, t], alone[:, -1], atol=1e-5)
    # The cached path applies the same window.
    cache = windowed.init_cache(1, 8)
    steps = []
    for t in range(8):
        out, cache = windowed.apply({"params": params}, tokens[:, t:t + 1],
                                    positions=jnp.array([[t]]), cache=cache)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, 1), local, atol=1e-5)


def test_scan_layers_and_remat_equal_unrolled(model_params):
    model, params = model_params
    scanned = make(scan_layers=True, remat="full")
    scanned_params = scan_layout.to_scanned(params)
    assert scanned_params["layers"]["blocks"]["query"]["kernel"].shape[0] == CONFIG["depth"]
    tokens = tokens_of(2, 6)
    np.testing.assert_allclose(scanned.apply({"params": scanned_params}, tokens),
                               model.apply({"params": params}, tokens), atol=1e-5)
    cache = scanned.init_cache(2, 6)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cached, cache = scanned.apply({"params": scanned_params}, tokens, positions=positions,
                                  cache=cache)
    np.testing.assert_allclose(cached, model.apply({"params": params}, tokens), atol=1e-5)
    _, unrolled_cache = model.apply({"params": params}, tokens, positions=positions,
                                    cache=model.init_cache(2, 6))
    assert cache["k"].shape == (CONFIG["depth"], 2, CONFIG["num_kv_heads"], 6, 8)
    np.testing.assert_allclose(cache["v"], jnp.stack(unrolled_cache["v"]), atol=1e-5)
    loss = lambda p, m: m.apply({"params": p}, tokens).sum()  # noqa: E731
    grads = jax.grad(loss)(scanned_params, scanned)
    np.testing.assert_allclose(scan_layout.to_unrolled(grads)["layers"]["block1"]["up"]["kernel"],
                               jax.grad(loss)(params, model)["layers"]["block1"]["up"]["kernel"],
                               rtol=1e-4, atol=1e-4)


def test_tied_embeddings_and_hidden_output(model_params):
    _, params = model_params
    tied = make(tie_embeddings=True, qkv_bias=True)
    boxed = tied.init(jax.random.PRNGKey(0), tokens_of(1, 3))["params"]
    tied_params = nn.meta.unbox(boxed)
    assert "lm_head" not in tied_params
    assert tied_params["layers"]["block0"]["query"]["bias"].shape == (4, 8)
    tokens = tokens_of(2, 5)
    hidden = tied.apply({"params": tied_params}, tokens, return_hidden=True)
    logits = tied.apply({"params": tied_params}, tokens)
    np.testing.assert_allclose(logits, hidden @ output_kernel(tied_params), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(output_kernel(tied_params), tied_params["embed"]["embedding"].T)
    # Every parameter carries logical axes.
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert set(leaf.names) <= set(sharding.PARAM_AXES) | {None}


def test_embeddings_input_replaces_the_token_lookup(model_params):
    model, params = model_params
    tokens = tokens_of(2, 5)
    embeddings = model.apply({"params": params}, tokens, method=model.embed)
    np.testing.assert_allclose(model.apply({"params": params}, tokens * 0, embeddings=embeddings),
                               model.apply({"params": params}, tokens), atol=1e-6)


def test_sharded_forward_and_cache_equal_single_device(model_params):
    model, params = model_params
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens_of(1, 3))["params"])
    shardings = sharding.param_shardings(boxed, mesh, sharding.LOGICAL_RULES)
    placed = jax.device_put(params, shardings)
    assert placed["layers"]["block0"]["key"]["kernel"].sharding.spec[1] == "tensor"
    tokens = tokens_of(4, 6)
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda p, t: model.apply({"params": p}, t))(placed, tokens)

        def prefill(p, t):
            cache = model.init_cache(4, 8)
            return model.apply({"params": p}, t, positions=jnp.broadcast_to(jnp.arange(6), (4, 6)),
                               cache=cache)
        cached, cache = jax.jit(prefill)(placed, tokens)
    reference = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(sharded, reference, atol=1e-5)
    np.testing.assert_allclose(cached, reference, atol=1e-5)
    assert len(cache["k"]) == 2 and cache["k"][0].shape == (4, 2, 8, 8)  # depth x [B, Hkv, S, K]
    assert cache["k"][0].sharding.spec[:2] == (("data", "fsdp"), "tensor")


def test_bfloat16_compute_close_to_float32(model_params):
    model, params = model_params
    tokens = tokens_of(2, 6)
    low = make(dtype="bfloat16").apply({"params": params}, tokens)
    assert low.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    high = model.apply({"params": params}, tokens)
    assert np.abs(low - high).max() < 0.05 * np.abs(high).max()
    assert layers.DTYPES["bfloat16"] == jnp.bfloat16


def test_cached_call_needs_positions_and_heads_must_divide(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="positions"):
        model.apply({"params": params}, tokens_of(1, 2), cache=model.init_cache(1, 4))
    with pytest.raises(ValueError, match="num_kv_heads"):
        make(num_kv_heads=3).init(jax.random.PRNGKey(0), tokens_of(1, 2))


def test_prefix_mask_is_bidirectional_over_the_prefix_only(model_params):
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    prefix = jnp.array([[1, 1, 0, 0, 1, 1, 0, 1]], bool)
    slots = jnp.arange(8)
    mask = np.asarray(attention_mask(seg, seg, slots, slots, q_prefix=prefix, k_prefix=prefix))
    expected = np.zeros((8, 8), bool)
    for q in range(8):
        for k in range(8):
            visible = k <= q or (prefix[0, q] and prefix[0, k])
            expected[q, k] = bool(seg[0, q] == seg[0, k] != 0 and visible)
    np.testing.assert_array_equal(mask[0, 0], expected)

    model, params = model_params
    tokens = tokens_of(2, 8, seed=5)
    prefix_len = np.array([5, 3])
    prefix_mask = jnp.asarray(np.arange(8)[None] < prefix_len[:, None])
    run = lambda t, **kw: np.asarray(model.apply({"params": params}, t, **kw))  # noqa: E731
    base = run(tokens, prefix_mask=prefix_mask)
    changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % VOCAB)  # a prefix token of both rows
    other = run(changed, prefix_mask=prefix_mask)
    assert np.abs(other[:, :2] - base[:, :2]).max() > 1e-3  # earlier prefix positions see it
    np.testing.assert_allclose(run(changed)[:, :2], run(tokens)[:, :2], atol=1e-6)  # causal: not
    later = tokens.at[:, 6].set((tokens[:, 6] + 1) % VOCAB)  # an answer token of both rows
    np.testing.assert_allclose(run(later, prefix_mask=prefix_mask)[:, :6], base[:, :6], atol=1e-6)
    # Cached: the prompt (= the prefix) in one prefill call, then causal decode steps.
    for row in range(2):
        n = int(prefix_len[row])
        cache = model.init_cache(1, 8)
        pos = jnp.arange(8)[None]
        out, cache = model.apply({"params": params}, tokens[row:row + 1, :n], positions=pos[:, :n],
                                 cache=cache, prefix_mask=jnp.ones((1, n), bool))
        steps = [np.asarray(out)]
        for t in range(n, 8):
            out, cache = model.apply({"params": params}, tokens[row:row + 1, t:t + 1],
                                     positions=pos[:, t:t + 1], cache=cache,
                                     prefix_mask=jnp.zeros((1, 1), bool))
            steps.append(np.asarray(out))
        np.testing.assert_allclose(np.concatenate(steps, axis=1)[0], base[row], atol=1e-5)
    # A prefix that starts after a causal chunk (cache index > 0) is bidirectional within its call.
    prefix_mask = jnp.asarray([[False, False, True, True, True, False, False, False]])
    whole = run(tokens[:1], prefix_mask=prefix_mask)
    cache = model.init_cache(1, 8)
    pos = jnp.arange(8)[None]
    steps = []
    for start, stop in ((0, 2), (2, 5), (5, 8)):
        out, cache = model.apply({"params": params}, tokens[:1, start:stop],
                                 positions=pos[:, start:stop], cache=cache,
                                 prefix_mask=prefix_mask[:, start:stop])
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, atol=1e-5)
