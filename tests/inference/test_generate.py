"""generate: greedy / sampling / beam search against uncached and exhaustive references."""
import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.inference import generate, generate_stream
from vlmjax.inference.generate import advance, compiled, output, start
from vlmjax.inference.settings import bucket_length, make_settings
from vlmjax.models.decoder import Decoder

VOCAB = 61
CONFIG = dict(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


def o1_params(model, seed=1):
    """Params with O(1) weights, so that the logits are peaked and differences show."""
    def draw():
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))[
            "params"])
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        leaves = [jax.random.normal(k, x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 1)
                  + (x.ndim == 1) for k, x in zip(keys, leaves)]
        return jax.tree.unflatten(treedef, leaves)
    return jax.jit(draw)()


@pytest.fixture(scope="module")
def lm():
    model = Decoder(**CONFIG)
    return model, o1_params(model)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, n).astype(np.int32) for n in lengths]


def batch_of(rows, side="left", pad=0):
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        tokens[i, sl], mask[i, sl] = r, True
    return tokens, mask


REFERENCE_LENGTH = 32  # the uncached forward runs right-padded to this (causal: no effect)


_full_forward = jax.jit(lambda params, tokens, model: jax.nn.log_softmax(
    model.apply({"params": params}, tokens), axis=-1), static_argnums=2)


def full_log_probs(model, params, seq):
    """Uncached: log-softmax of the full forward on one sequence [L] -> [L, V]."""
    padded = np.zeros((1, REFERENCE_LENGTH), np.int32)
    padded[0, :len(seq)] = seq
    return np.asarray(_full_forward(params, jnp.asarray(padded), model))[0, :len(seq)]


def reference_greedy(model, params, prompt, n):
    """Re-runs the whole forward on the growing sequence: (tokens [n], sum of log-probs)."""
    seq, score = list(prompt), 0.0
    for _ in range(n):
        lp = full_log_probs(model, params, seq)[-1]
        seq.append(int(lp.argmax()))
        score += float(lp[seq[-1]])
    return np.array(seq[len(prompt):]), score


def sequence_score(model, params, prompt, new):
    lp = full_log_probs(model, params, list(prompt) + list(new))
    return sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(new))


N = 8  # new tokens in most tests: with batches of 2 short prompts they share compilations


def greedy_batch(lm, seed):
    model, params = lm
    rows = prompts([6, 6], seed=seed)
    return rows, generate(model, params, np.stack(rows), max_new_tokens=N)


# ----------------------------------------------------------------------------------- greedy
def test_cached_greedy_equals_uncached_reference(lm):
    model, params = lm
    rows, out = greedy_batch(lm, seed=0)
    assert out.tokens.shape == (2, N) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [N, N])
    for i, row in enumerate(rows):
        tokens, score = reference_greedy(model, params, row, N)
        np.testing.assert_array_equal(out.tokens[i], tokens)
        np.testing.assert_allclose(out.scores[i], score, rtol=1e-5, atol=1e-4)
    assert len(set(np.asarray(out.tokens).ravel())) > 3  # not a degenerate repetition


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_prompts_generated_alone(lm, side):
    model, params = lm
    rows = prompts([3, 9], seed=1)
    tokens, mask = batch_of(rows, side, pad=7)
    out = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=N)
    for i, row in enumerate(rows):  # the uncached reference runs each prompt alone, unpadded
        tokens, score = reference_greedy(model, params, row, N)
        np.testing.assert_array_equal(out.tokens[i], tokens)
        np.testing.assert_allclose(out.scores[i], score, rtol=1e-5, atol=1e-4)


def test_eos_list_and_stop_sequences_stop_rows_independently_then_pad(lm):
    model, params = lm
    rows, free = greedy_batch(lm, seed=4)
    free = np.asarray(free.tokens)
    # EOS ids: row 0's 3rd token and row 1's 6th token (first occurrences stop the row).
    eos = [int(free[0, 2]), int(free[1, 5])]
    # A stop sequence: row 0's tokens 4..5.
    stop = [int(free[0, 3]), int(free[0, 4])]

    def expected(seq, eos_ids, stops):
        for t in range(N):
            if seq[t] in eos_ids or any(list(seq[max(0, t + 1 - len(s)):t + 1]) == s
                                        for s in stops):
                return t + 1
        return N

    for eos_ids, stops in [(eos, []), ([eos[1]], [stop])]:
        out = generate(model, params, np.stack(rows), max_new_tokens=N, eos_id=eos_ids,
                       stop_sequences=stops, pad_id=VOCAB + 5)
        lengths = [expected(list(free[i]), eos_ids, stops) for i in range(2)]
        assert lengths[0] < lengths[1] < N, lengths
        np.testing.assert_array_equal(out.lengths, lengths)
        for i, length in enumerate(lengths):
            np.testing.assert_array_equal(out.tokens[i, :length], free[i, :length])
            assert np.all(np.asarray(out.tokens[i, length:]) == VOCAB + 5)
            np.testing.assert_allclose(out.scores[i],
                                       sequence_score(model, params, rows[i], free[i, :length]),
                                       rtol=1e-5, atol=1e-4)


def test_settings_normalise_arguments():
    tokens = np.zeros((2, 20), np.int32)
    base = dict(tokens=tokens, strategy="greedy", max_new_tokens=4, num_beams=1, temperature=1.0,
                top_k=0, top_p=1.0, eos_id=None, rng=None, stop_sequences=None, pad_id=0,
                length_penalty=1.0, early_stopping=False, prompt_buckets=(16, 32),
                per_token_inputs=())
    settings = make_settings(**dict(base, eos_id=5, stop_sequences=[[1, 2, 3], [4]]))
    assert settings.eos_ids == (5,) and settings.window == 3 and settings.prompt_length == 32
    assert settings.cache_length == 36
    assert make_settings(**dict(base, eos_id=np.array([2, 7]))).eos_ids == (2, 7)
    one_beam = make_settings(**dict(base, strategy="beam", num_beams=1))
    assert one_beam.strategy == "greedy"  # as transformers: one beam is greedy search
    assert make_settings(**dict(base, strategy="beam", num_beams=2,
                                early_stopping=1)).early_stopping is True
    assert bucket_length(5, (16, 32)) == 16 and bucket_length(40, (16, 32)) == 64
    assert bucket_length(40, None) == 40
    for bad, match in [(dict(strategy="topk"), "strategy="),
                       (dict(strategy="sample"), "needs rng"),
                       (dict(strategy="sample", rng=1, top_p=0.0), "top_p"),
                       (dict(strategy="beam", num_beams=2, early_stopping="soon"), "early_stop"),
                       (dict(stop_sequences=[3, 4]), "token-id lists"),
                       (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            make_settings(**dict(base, **bad))


def test_compilations_do_not_grow_within_a_prompt_bucket(lm):
    model, params = lm
    traces = []

    @dataclasses.dataclass(frozen=True)
    class Counting:  # a model wrapper that counts how often generate traces its apply
        model: Decoder

        def apply(self, *args, **kwargs):
            traces.append(kwargs["positions"].shape)
            return self.model.apply(*args, **kwargs)

        def init_cache(self, *args):
            return self.model.init_cache(*args)

        def reorder_cache(self, *args):
            return self.model.reorder_cache(*args)

        def cache_logical_axes(self):
            return self.model.cache_logical_axes()

    counting = Counting(model)
    first = generate(counting, params, np.stack(prompts([5])), max_new_tokens=4)
    assert len(traces) == 2  # prefill + decode loop
    second = generate(counting, params, np.stack(prompts([11])), max_new_tokens=4)
    assert len(traces) == 2, "a prompt length within the bucket must not recompile"
    generate(counting, params, np.stack(prompts([17])), max_new_tokens=4)
    assert len(traces) == 4  # the next bucket: prefill and decode (longer cache) again
    assert traces[0] == (1, 16) and traces[2] == (1, 32)
    np.testing.assert_array_equal(first.tokens[0],
                                  reference_greedy(model, params, prompts([5])[0], 4)[0])
    np.testing.assert_array_equal(second.tokens[0],
                                  reference_greedy(model, params, prompts([11])[0], 4)[0])


def test_prompt_rows_without_tokens_are_an_error(lm):
    model, params = lm
    with pytest.raises(ValueError, match="rows \\[1\\] have no real token"):
        generate(model, params, np.ones((2, 3), np.int32),
                 prompt_mask=np.array([[1, 1, 0], [0, 0, 0]], bool))


# ---------------------------------------------------------------------------------- sampling
SAMPLE = dict(max_new_tokens=N, strategy="sample", temperature=1.5, top_p=0.9)


def test_sampling_top_k_1_is_greedy(lm):
    model, params = lm
    rows, greedy = greedy_batch(lm, seed=3)
    top1 = generate(model, params, np.stack(rows), **dict(SAMPLE, top_k=1, temperature=0.7),
                    rng=jax.random.key(5))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_sampling_is_reproducible_per_rng_and_streams_in_chunks(lm):
    model, params = lm
    rows, greedy = greedy_batch(lm, seed=3)
    tokens = np.stack(rows)
    a = generate(model, params, tokens, **SAMPLE, rng=jax.random.key(1))
    b = generate(model, params, tokens, **SAMPLE, rng=jax.random.key(1))
    c = generate(model, params, tokens, **SAMPLE, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy.tokens)
    # scores: the model's own log-probs (before temperature) of the sampled tokens
    for i in range(2):
        np.testing.assert_allclose(
            a.scores[i], sequence_score(model, params, tokens[i], a.tokens[i]), rtol=1e-5,
            atol=1e-4)
    chunks = list(generate_stream(model, params, tokens, chunk=3, **SAMPLE,
                                  rng=jax.random.key(1)))
    assert len(chunks) == 4  # after the first token, then 4, 7 and 8 tokens
    np.testing.assert_array_equal(chunks[-1].tokens, a.tokens)
    np.testing.assert_array_equal(chunks[-1].lengths, a.lengths)
    np.testing.assert_array_equal(chunks[0].lengths, [1, 1])
    np.testing.assert_array_equal(chunks[1].tokens[:, :4], a.tokens[:, :4])
    assert np.all(np.asarray(chunks[1].tokens[:, 4:]) == 0)


# --------------------------------------------------------------------------------- beam search
def run_settings(model, params, tokens, settings):
    prefill, decode = compiled(model, settings)
    state = prefill(params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool), jax.random.key(0),
                    jnp.float32(1.0), jnp.float32(1.0), {})
    state = decode(params, state, jnp.int32(settings.max_new_tokens), jnp.float32(1.0),
                   jnp.float32(1.0), {})
    return output(settings, state)


def test_beam_machinery_with_one_beam_is_greedy(lm):
    model, params = lm
    rows, greedy = greedy_batch(lm, seed=5)
    tokens = np.stack(rows)
    settings, _ = start(model, params, tokens, max_new_tokens=N)
    # generate() turns one beam into greedy search; the beam code itself must agree.
    forced = run_settings(model, params, tokens,
                          dataclasses.replace(settings, strategy="beam", num_beams=1))
    np.testing.assert_array_equal(forced.tokens, greedy.tokens)
    np.testing.assert_allclose(forced.scores, greedy.scores, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_vocab_lm():
    model = Decoder(**dict(CONFIG, vocab_size=4))
    return model, o1_params(model, seed=3)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_search_finds_the_exhaustive_best(tiny_vocab_lm, length_penalty):
    """With early_stopping="never" and enough beams to hold every live prefix, beam search is
    exhaustive: it returns the best of all sequences that end in EOS or reach max_new_tokens,
    scored sum_logprobs / new_length ** length_penalty."""
    model, params = tiny_vocab_lm
    eos, n = 1, 3
    rows = [np.array([2, 3, 0, 2], np.int32), np.array([3, 3], np.int32)]
    tokens, mask = batch_of(rows)
    out = generate(model, params, tokens, prompt_mask=mask, max_new_tokens=n, strategy="beam",
                   num_beams=20, eos_id=eos, length_penalty=length_penalty,
                   early_stopping="never", pad_id=0)
    for i, row in enumerate(rows):
        candidates = []
        for length in range(1, n + 1):
            for seq in itertools.product(range(4), repeat=length):
                if eos in seq[:-1] or (length < n and seq[-1] != eos):
                    continue
                total = sequence_score(model, params, row, seq)
                candidates.append((total / length ** length_penalty, seq, total))
        candidates.sort(reverse=True)
        best_score, best, total = candidates[0]
        assert best_score > candidates[1][0] + 1e-4, "the test needs a unique best"
        assert int(out.lengths[i]) == len(best)
        np.testing.assert_array_equal(out.tokens[i, :len(best)], best)
        np.testing.assert_array_equal(out.tokens[i, len(best):], 0)
        np.testing.assert_allclose(out.scores[i], total, rtol=1e-5, atol=1e-4)


def test_beam_search_beats_greedy_and_stops_rows_independently(lm):
    model, params = lm
    rows, greedy = greedy_batch(lm, seed=6)
    tokens = np.stack(rows)
    out = generate(model, params, tokens, max_new_tokens=N, strategy="beam", num_beams=4)
    # Without EOS every hypothesis has N tokens: the best sum can only improve on greedy's.
    assert np.all(np.asarray(out.scores) >= np.asarray(greedy.scores) - 1e-5)
    assert np.any(np.asarray(out.scores) > np.asarray(greedy.scores) + 1e-3)
    for i in range(2):
        np.testing.assert_allclose(out.scores[i],
                                   sequence_score(model, params, tokens[i], out.tokens[i]),
                                   rtol=1e-5, atol=1e-4)
    stop_id = int(out.tokens[0, 1])
    stopped = generate(model, params, tokens, max_new_tokens=N, strategy="beam", num_beams=4,
                       eos_id=[stop_id], pad_id=VOCAB)
    lengths = np.asarray(stopped.lengths)
    assert lengths.min() < N
    for i in range(2):
        row = np.asarray(stopped.tokens[i])
        assert np.all(row[lengths[i]:] == VOCAB)
        assert stop_id not in row[:lengths[i] - 1]
        assert lengths[i] == N or row[lengths[i] - 1] == stop_id
        np.testing.assert_allclose(
            stopped.scores[i], sequence_score(model, params, tokens[i], row[:lengths[i]]),
            rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------- hooks
def test_model_inputs_go_to_prefill_and_decode_inputs_to_every_step(lm):
    model, params = lm

    @dataclasses.dataclass(frozen=True)
    class Biased:  # a model with an extra input: a logit bias [B, V]
        model: Decoder

        def apply(self, v, tokens, logit_bias=None, **kwargs):
            logits, cache = self.model.apply(v, tokens, **kwargs)
            return (logits if logit_bias is None else logits + logit_bias[:, None]), cache

        def init_cache(self, *args):
            return self.model.init_cache(*args)

        def reorder_cache(self, *args):
            return self.model.reorder_cache(*args)

        def cache_logical_axes(self):
            return self.model.cache_logical_axes()

    rows, plain = greedy_batch(lm, seed=7)
    tokens = np.stack(rows)
    bias = lambda t: np.zeros((2, VOCAB), np.float32) + 1e3 * (np.arange(VOCAB) == t)  # noqa
    first = generate(Biased(model), params, tokens, max_new_tokens=N, logit_bias=bias(11))
    assert np.all(np.asarray(first.tokens[:, 0]) == 11)
    assert not np.all(np.asarray(first.tokens[:, 1:]) == 11)
    every = generate(Biased(model), params, tokens, max_new_tokens=N,
                     decode_inputs={"logit_bias": bias(13)})
    np.testing.assert_array_equal(every.tokens[:, 0], plain.tokens[:, 0])
    assert np.all(np.asarray(every.tokens[:, 1:]) == 13)
    beam = generate(Biased(model), params, tokens, max_new_tokens=N, strategy="beam",
                    num_beams=2, decode_inputs={"logit_bias": bias(13)})
    assert np.all(np.asarray(beam.tokens[:, 1:]) == 13)


# --------------------------------------------------------------------------------- sharding
def test_generation_under_a_mesh_equals_one_device(lm):
    model, params = lm
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 3), jnp.int32))["params"])
    placed = jax.device_put(params, sharding.param_shardings(boxed, mesh, sharding.LOGICAL_RULES))
    rows = prompts([3, 6, 5, 6], seed=8)
    tokens, mask = batch_of(rows)
    kwargs = dict(prompt_mask=mask, max_new_tokens=5, eos_id=[3])
    single = [generate(model, params, tokens, **kwargs),
              generate(model, params, tokens, strategy="beam", num_beams=2, **kwargs)]
    with jax.set_mesh(mesh):
        sharded = [generate(model, placed, tokens, **kwargs),
                   generate(model, placed, tokens, strategy="beam", num_beams=2, **kwargs)]
        settings, state = start(model, placed, tokens, **kwargs)
        state = advance(model, placed, settings, state, 3)
    for a, b in zip(single, sharded):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    spec = state["cache"]["k"][0].sharding.spec  # layer 0's [B, Hkv, S, K]
    assert spec[0] == ("data", "fsdp") and spec[1] == "tensor", spec


def test_compiled_cache_is_bounded_and_never_reuses_a_freed_models_id(lm):
    import importlib
    generate_lib = importlib.import_module("vlmjax.inference.generate")  # the module
    model, _ = lm

    class Unhashable:  # generate caches such a model by id
        __hash__ = None

    generate_lib.clear_compiled()
    first = Unhashable()
    settings = object()  # any hashable stands in for Settings: nothing is traced here
    fns = compiled(first, settings)
    assert compiled(first, settings) is fns
    key = next(iter(generate_lib._COMPILED))
    generate_lib._COMPILED[key] = (Unhashable(), fns)  # as if `first` died and its id was reused
    assert compiled(first, settings) is not fns
    for i in range(generate_lib._MAX_COMPILED + 5):
        compiled(model, ("settings", i))
    assert len(generate_lib._COMPILED) == generate_lib._MAX_COMPILED
    generate_lib.clear_compiled()
    assert not generate_lib._COMPILED
