"""Batched, jitted generation for every generative model family: greedy, sampling, beam search.

    out = generate(model, params, tokens, max_new_tokens=32, strategy="greedy")
    out.tokens    int32 [B, max_new_tokens]: the new tokens; after a row stops, `pad_id`
    out.lengths   int32 [B]: new tokens up to and including the stop (EOS / stop sequence)
    out.scores    float32 [B]: sum of the model's log-probabilities (log-softmax of its float32
                  logits, before temperature/top-k/top-p) of those new tokens

Model-agnostic: `model` needs only `init_cache(batch, length)`, `reorder_cache(cache, rows)`,
`cache_logical_axes()` and `apply({"params": params}, tokens, segment_ids=, positions=,
cache=, **inputs) -> (float32 logits [B, L, V], cache)` (vlmjax.models.decoder.Decoder and the
models built on it).

Prompts. `tokens` int32 [B, L] with `prompt_mask` bool [B, L] (True = real token; default all
True). The batch is left-padded up to the next of `prompt_buckets` (longer prompts: the next
multiple of the largest; None: no bucketing) before the jitted prefill, so a new prompt length
within a bucket does not recompile; inside it, right-, left- or otherwise padded rows are
left-aligned (masked tokens are fed as id 0, so any `pad_id` works). The prefill runs with
segment_ids = the mask and positions = cumsum(mask) - 1; decode step t feeds each row's last
token at position (real prompt tokens + t). Every row needs at least one real token.

Model inputs. `images` and `**model_inputs` go to the prefill call only (LLaVA-style models
read the images there; their features then live in the KV cache). Inputs named in
`per_token_inputs` (default: `image_mask`, fusion's [B, L, N]) are aligned and padded with the
tokens. A model that needs inputs at every decode step (e.g. cross-attention to image features
that are not cached) gets them through `decode_inputs`: a dict of arrays with a leading batch
dimension, passed to every decode-step `apply` (repeated per beam under beam search).

Strategies.
  greedy   argmax of the logits.
  sample   temperature, then top-k, then top-p (HF's default warper order, float32;
           vlmjax.inference.sampling), with `rng` (required); step t draws with
           fold_in(rng, t), so a result does not depend on how the loop is chunked.
  beam     HF transformers' beam search (vlmjax.inference.beam) with `num_beams`,
           `length_penalty`, `early_stopping` (True / False / "never"); the best hypothesis per
           row. num_beams=1 is greedy, as in transformers.
Stops: `eos_id` (an int or a list: stop at any) and `stop_sequences` (token-id lists; a row
stops once its generated tokens end with one; the sequence stays in the output and counts in
`lengths`). Rows stop independently.

Compilation. One prefill and one decode function are jitted per (model, static settings)
and cached here (the 32 most recently used; `clear_compiled()` drops them); jax caches them
per shapes. The decode loop is a `lax.while_loop` that stops
once every row is done; the state (the KV cache included) is donated to it. Temperature and
top_p are traced values (changing them does not recompile); top_k, max_new_tokens, num_beams,
stops and the beam settings are static.

Sharding. Under `jax.set_mesh(mesh)` (and `vlmjax.sharding.axis_rules` if the rules differ
from the defaults) the cache is sharded by `model.cache_logical_axes()` (batch over the batch
axes, kv heads over `tensor`), the activations by the model's own constraints; place `params`
with `vlmjax.sharding.param_shardings`.

Streaming: `generate_stream(...)` yields the output so far chunk by chunk (greedy and
sample). Underneath, `start(...)` (prefill + first token) -> (settings, state),
`advance(model, params, settings, state, stop_at)` (decode until `stop_at` new tokens) and
`output(settings, state)`. (`vlmjax.inference.generate` is the function; import this module's
other names with `from vlmjax.inference.generate import start`.)
"""
from __future__ import annotations

import collections
from typing import Any, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.inference import beam as beam_lib, sampling
from vlmjax.inference.settings import (DEFAULT_PROMPT_BUCKETS, PER_TOKEN_INPUTS, Settings,
                                       make_settings, stop_checker)
from vlmjax import sharding
from vlmjax.sharding import constrain


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array   # int32 [B, max_new_tokens]; pad after a row's stop
    lengths: jax.Array  # int32 [B]: new tokens up to and including the stop
    scores: jax.Array   # float32 [B]: sum of the model's log-probs of those tokens


def _constrain_cache(model, cache):
    axes = model.cache_logical_axes()

    def constrain_all(value, names):  # a tuple of per-layer arrays shares their axes
        if isinstance(value, tuple):
            return tuple(constrain(v, names) for v in value)
        return constrain(value, names)

    return {name: constrain_all(value, axes[name]) if name in axes else value
            for name, value in cache.items()}


def _left_pad(x, length: int, value):
    """x [B, L, ...] left-padded with `value` to [B, length, ...], on the host for numpy input
    (so that the jitted prefill only ever sees the bucket length)."""
    pad = [(0, 0), (length - x.shape[1], 0)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, constant_values=value) if isinstance(x, np.ndarray) else jnp.pad(
        x, pad, constant_values=value)


def _bucketed(settings: Settings, tokens, mask, model_inputs):
    length = settings.prompt_length
    inputs = dict(model_inputs)
    for name in settings.per_token_inputs:
        if inputs.get(name) is not None:
            inputs[name] = _left_pad(inputs[name], length, 0)
    return _left_pad(tokens, length, 0), _left_pad(mask, length, False), inputs


def _align_prompt(settings: Settings, tokens, mask, model_inputs):
    """Moves every row's real tokens to its end (left padding), inside the jitted prefill."""
    # Padding is fed as token 0 (any pad_id, even one outside the vocabulary, is only output).
    tokens = jnp.where(mask, tokens, 0)
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)  # padding first

    def align(x):
        idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    inputs = dict(model_inputs)
    for name in settings.per_token_inputs:
        if inputs.get(name) is not None:
            inputs[name] = align(inputs[name])
    return align(tokens), align(mask), inputs


def _apply(model, params, tokens, segment_ids, positions, cache, inputs):
    logits, cache = model.apply({"params": params}, tokens, segment_ids=segment_ids,
                                positions=positions, cache=cache, **inputs)
    return logits[:, -1].astype(jnp.float32), _constrain_cache(model, cache)


# ------------------------------------------------------------------------- token selection
def _select(settings: Settings, state, logits, temperature, top_p):
    """Greedy / sampling: pick each row's next token, record it, check its stop."""
    stops = stop_checker(settings)
    t, done, window = state["step"], state["done"], settings.window
    if settings.strategy == "sample":
        picked = sampling.sample(jax.random.fold_in(state["rng"], t), logits, temperature,
                                 settings.top_k, top_p, settings.use_top_p)
    else:
        picked = sampling.greedy(logits)
    # log_softmax at the picked token only (one pass over the vocabulary, no [B, V] output)
    token_lp = (jnp.take_along_axis(logits, picked[:, None], axis=1)[:, 0]
                - jax.nn.logsumexp(logits, axis=-1))
    token = jnp.where(done, settings.pad_id, picked)
    buf = jax.lax.dynamic_update_slice_in_dim(state["buf"], token[:, None], window - 1 + t, 1)
    recent = jax.lax.dynamic_slice_in_dim(buf, t, window, axis=1)
    stop = ~done & stops(recent, token)
    return dict(state, buf=buf, last=jnp.where(done, 0, picked), step=t + 1,
                scores=state["scores"] + jnp.where(done, 0.0, token_lp),
                lengths=state["lengths"] + (~done).astype(jnp.int32), done=done | stop)


def _beam_select(settings: Settings, model, state, logits):
    n = settings.num_beams
    beam_state, src_rows = beam_lib.step(
        state["beam"], logits, state["step"], stops=stop_checker(settings), num_beams=n,
        num_candidates=beam_lib.candidates_per_row(n, len(settings.eos_ids)),
        max_new_tokens=settings.max_new_tokens, window=settings.window,
        length_penalty=settings.length_penalty, early_stopping=settings.early_stopping)
    step = state["step"] + 1
    cache = _constrain_cache(model, model.reorder_cache(state["cache"], src_rows))
    return dict(state, beam=beam_state, cache=cache, step=step,
                last=beam_lib.next_tokens(beam_state, step, settings.window),
                done=jnp.broadcast_to(~beam_state["active"], state["done"].shape))


# ------------------------------------------------------------------------- jitted functions
def _prefill_fn(model, settings: Settings):
    def prefill(params, tokens, mask, rng, temperature, top_p, model_inputs):
        tokens, mask, inputs = _align_prompt(settings, tokens, mask.astype(bool), model_inputs)
        batch = tokens.shape[0]
        segment_ids = mask.astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
        cache = _constrain_cache(model, model.init_cache(batch, settings.cache_length))
        logits, cache = _apply(model, params, tokens, segment_ids, positions, cache, inputs)
        real = segment_ids.sum(axis=1)
        n, window = settings.num_beams, settings.window
        if settings.strategy == "beam":
            rows = jnp.repeat(jnp.arange(batch), n)
            state = dict(cache=_constrain_cache(model, model.reorder_cache(cache, rows)),
                         beam=beam_lib.init_state(batch, n, settings.max_new_tokens, window,
                                                  settings.pad_id),
                         step=jnp.zeros((), jnp.int32), last=jnp.zeros((batch * n,), jnp.int32),
                         position=jnp.repeat(real, n), done=jnp.zeros((batch * n,), bool),
                         rng=rng)
            return _beam_select(settings, model, state, jnp.repeat(logits, n, axis=0))
        buf = jnp.full((batch, window - 1 + settings.max_new_tokens), settings.pad_id, jnp.int32)
        state = dict(cache=cache, buf=buf.at[:, :window - 1].set(-1),
                     step=jnp.zeros((), jnp.int32), last=jnp.zeros((batch,), jnp.int32),
                     position=real, done=jnp.zeros((batch,), bool),
                     lengths=jnp.zeros((batch,), jnp.int32),
                     scores=jnp.zeros((batch,), jnp.float32), rng=rng)
        return _select(settings, state, logits, temperature, top_p)
    return prefill


def _decode_fn(model, settings: Settings):
    def decode(params, state, stop_at, temperature, top_p, decode_inputs):
        if settings.strategy == "beam":
            decode_inputs = {k: jnp.repeat(v, settings.num_beams, axis=0)
                             for k, v in decode_inputs.items()}

        def cond(state):
            return (state["step"] < jnp.minimum(stop_at, settings.max_new_tokens)) & ~jnp.all(
                state["done"])

        def body(state):
            rows = state["last"].shape[0]
            logits, cache = _apply(model, params, state["last"][:, None],
                                   jnp.ones((rows, 1), jnp.int32), state["position"][:, None],
                                   state["cache"], decode_inputs)
            state = dict(state, cache=cache, position=state["position"] + 1)
            if settings.strategy == "beam":
                return _beam_select(settings, model, state, logits)
            return _select(settings, state, logits, temperature, top_p)

        return jax.lax.while_loop(cond, body, state)
    return decode


def _output(settings: Settings, state) -> GenerateOutput:
    if settings.strategy == "beam":
        tokens, lengths, scores = beam_lib.best(state["beam"])
    else:
        tokens = state["buf"][:, settings.window - 1:]
        lengths, scores = state["lengths"], state["scores"]
    return GenerateOutput(tokens=tokens, lengths=lengths, scores=scores)


_COMPILED: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED = 32  # (model, settings) pairs kept; the least recently used is dropped


def _cached(key, build, owner=None):
    """The value cached at `key`, built on a miss. `owner` is kept with it: an id-keyed entry
    of a model that was freed (whose id a new object may reuse) is rebuilt, never reused."""
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not owner:
        entry = _COMPILED[key] = (owner, build())
        while len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return entry[1]


def clear_compiled() -> None:
    """Drops every jitted prefill / decode function held here (and their compilations)."""
    _COMPILED.clear()


def compiled(model, settings: Settings):
    """(prefill, decode) jitted for `model` and `settings` (and the activation sharding rules
    of the enclosing `vlmjax.sharding.axis_rules`, which jax's own cache does not see), cached
    in this module."""
    rules = sharding.active_rules()
    owner = None
    try:
        key = (model, settings, rules)
        hash(key)
    except TypeError:  # an unhashable model object: cache per instance
        key, owner = (id(model), settings, rules), model
    return _cached(key, lambda: (jax.jit(_prefill_fn(model, settings)),
                                 jax.jit(_decode_fn(model, settings), donate_argnums=(1,))),
                   owner=owner)


def compiled_output(settings: Settings):
    return _cached(("output", settings), lambda: jax.jit(lambda state: _output(settings, state)))


# ----------------------------------------------------------------------------- public API
def start(model, params, tokens, images=None, max_new_tokens=32, strategy="greedy",
          num_beams=1, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, rng=None, *,
          prompt_mask=None, stop_sequences=None, pad_id=0, length_penalty=1.0,
          early_stopping=False, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
          per_token_inputs=PER_TOKEN_INPUTS, **model_inputs):
    """Prefill: -> (settings, state after the first new token). See `generate`."""
    if not isinstance(tokens, jax.Array):
        tokens = np.asarray(tokens, np.int32)
    settings = make_settings(tokens, strategy, max_new_tokens, num_beams, temperature, top_k,
                             top_p, eos_id, rng, stop_sequences, pad_id, length_penalty,
                             early_stopping, prompt_buckets, per_token_inputs)
    if prompt_mask is None:
        prompt_mask = np.ones(tokens.shape, bool)
    elif not isinstance(prompt_mask, jax.Array):
        prompt_mask = np.asarray(prompt_mask, bool)
    if tuple(prompt_mask.shape) != tuple(tokens.shape):
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != tokens shape "
                         f"{tuple(tokens.shape)}")
    if isinstance(prompt_mask, np.ndarray):  # checked when it is on the host
        empty = np.flatnonzero(~np.asarray(prompt_mask, bool).any(axis=1))
        if empty.size:
            raise ValueError(f"prompt rows {empty.tolist()} have no real token (prompt_mask is "
                             "all False); every row needs at least one")
    if images is not None:
        model_inputs = dict(model_inputs, images=images)
    rng = jax.random.key(0) if rng is None else rng
    tokens, prompt_mask, model_inputs = _bucketed(settings, tokens, prompt_mask.astype(bool),
                                                  model_inputs)
    prefill, _ = compiled(model, settings)
    state = prefill(params, tokens, prompt_mask, rng, jnp.float32(temperature),
                    jnp.float32(top_p), model_inputs)
    return settings, state


def advance(model, params, settings: Settings, state, stop_at: int, temperature=1.0,
            top_p=1.0, decode_inputs: Mapping[str, Any] | None = None):
    """Runs the decode loop until `stop_at` new tokens (or every row stopped). Donates `state`."""
    _, decode = compiled(model, settings)
    return decode(params, state, jnp.int32(stop_at), jnp.float32(temperature),
                  jnp.float32(top_p), dict(decode_inputs or {}))


def output(settings: Settings, state) -> GenerateOutput:
    """The GenerateOutput of a state from `start` / `advance`."""
    return compiled_output(settings)(state)


def generate(model, params, tokens, images=None, max_new_tokens=32, strategy="greedy",
             num_beams=1, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, rng=None, *,
             prompt_mask=None, stop_sequences=None, pad_id=0, length_penalty=1.0,
             early_stopping=False, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
             per_token_inputs=PER_TOKEN_INPUTS, decode_inputs=None,
             **model_inputs) -> GenerateOutput:
    """New tokens for each prompt row of `tokens` int32 [B, L]; see the module docstring.

    Args beyond the DESIGN interface: `prompt_mask` bool [B, L]; `stop_sequences` list of
    token-id lists; `pad_id` (0) fills after a row's stop; `length_penalty` (1.0) and
    `early_stopping` (False) for beam search, as in transformers; `prompt_buckets` (None: no
    bucketing); `per_token_inputs` names model inputs laid out like the tokens [B, L, ...];
    `decode_inputs` go to every decode step.
    """
    settings, state = start(
        model, params, tokens, images, max_new_tokens, strategy, num_beams, temperature, top_k,
        top_p, eos_id, rng, prompt_mask=prompt_mask, stop_sequences=stop_sequences,
        pad_id=pad_id, length_penalty=length_penalty, early_stopping=early_stopping,
        prompt_buckets=prompt_buckets, per_token_inputs=per_token_inputs, **model_inputs)
    state = advance(model, params, settings, state, settings.max_new_tokens, temperature, top_p,
                    decode_inputs)
    return output(settings, state)


def generate_stream(model, params, tokens, images=None, max_new_tokens=32, strategy="greedy",
                    temperature=1.0, top_k=0, top_p=1.0, eos_id=None, rng=None, *,
                    chunk: int = 8, decode_inputs=None, **kwargs) -> Iterator[GenerateOutput]:
    """Greedy / sample generation that yields the output so far after the first token and
    then every `chunk` tokens (the last yield is `generate`'s result, token for token)."""
    if strategy not in ("greedy", "sample"):
        raise ValueError(f"generate_stream streams greedy and sample, not {strategy!r} (beam "
                         "search knows its result only at the end: use generate)")
    settings, state = start(model, params, tokens, images, max_new_tokens, strategy, 1,
                            temperature, top_k, top_p, eos_id, rng, **kwargs)
    yield output(settings, state)
    produced = 1
    while produced < settings.max_new_tokens and not bool(jnp.all(state["done"])):
        produced = min(produced + int(chunk), settings.max_new_tokens)
        state = advance(model, params, settings, state, produced, temperature, top_p,
                        decode_inputs)
        yield output(settings, state)
