"""Beam search with Hugging Face transformers' semantics (`generate(num_beams=n, do_sample=False)`,
transformers 5 `GenerationMixin._beam_search`), one step at a time on a fixed-shape state.

Per step and batch row:
  - the `num_beams` running beams' next-token log-probabilities (log-softmax of the float32
    logits) are added to their running sums; the top K = max(2, 1 + number of EOS ids) *
    num_beams (beam, token) candidates are kept (at the first step only beam 0 is live: the
    others start at -1e9);
  - a candidate "hits a stop" if its token is an EOS id, its generated tokens end with a stop
    sequence, or it is max_new_tokens long;
  - the next running beams are the best `num_beams` candidates that did not stop;
  - candidates among the top `num_beams` (of the K) that stopped become finished hypotheses,
    scored sum_logprobs / new_length ** length_penalty (new_length counts the generated tokens,
    the stop token included, not the prompt, as transformers 5 does), unless the row is closed
    (all its finished slots are filled and early_stopping is True, or the early-stopping
    heuristic says no running beam can beat its worst finished hypothesis); the row keeps its
    `num_beams` best finished hypotheses;
  - heuristic: the best running sum / L ** length_penalty, with L = max_new_tokens when
    early_stopping == "never" and length_penalty > 0, else the current new length, must beat
    the worst finished score (an unfilled slot counts as -1e9); once it fails, the row is done.
The search stops when no row can improve, or (early_stopping=True) every row's slots are filled,
or every candidate of the step stopped. The result per row is its best finished hypothesis.

State arrays (B rows, n beams, K candidates, N = max_new_tokens, M = stop window):
  run_buf [B, n, M-1+N] generated tokens of the running beams after M-1 filler columns (-1),
  run_scores [B, n], fin_tokens [B, n, N], fin_scores [B, n] (length-penalised), fin_sums
  [B, n] (sum of log-probs), fin_lengths [B, n], is_fin [B, n], improvable [B], active ().
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1.0e9  # transformers' "impossible" score, added (not assigned) as there


def candidates_per_row(num_beams: int, num_eos: int) -> int:
    return max(2, 1 + num_eos) * num_beams


def init_state(batch: int, num_beams: int, max_new_tokens: int, window: int, pad_id: int) -> dict:
    buf = jnp.full((batch, num_beams, window - 1 + max_new_tokens), pad_id, jnp.int32)
    buf = buf.at[:, :, :window - 1].set(-1)
    run_scores = jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(NEG)
    return dict(
        run_buf=buf, run_scores=run_scores,
        fin_tokens=jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32),
        fin_scores=jnp.full((batch, num_beams), NEG, jnp.float32),
        fin_sums=jnp.zeros((batch, num_beams), jnp.float32),
        fin_lengths=jnp.zeros((batch, num_beams), jnp.int32),
        is_fin=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch,), bool),
        active=jnp.ones((), bool))


def _gather(x, idx_BK):
    """x [B, n, ...] rows idx [B, K] along the beam axis -> [B, K, ...]."""
    idx = idx_BK.reshape(idx_BK.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def step(state: dict, logits, t, *, stops, num_beams: int, num_candidates: int,
         max_new_tokens: int, window: int, length_penalty: float, early_stopping):
    """One beam-search step from the running beams' logits [B*n, V] at new length `t` (tokens
    generated before this step). `stops(window_XM, token_X) -> bool [X]` says whether a
    candidate hits an EOS id or a stop sequence. Returns (state, src_rows [B*n]): the flat rows
    of the previous beams that the new running beams continue (for `reorder_cache`)."""
    n, k = num_beams, num_candidates
    vocab = logits.shape[-1]
    batch = logits.shape[0] // n
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, n, vocab)
    log_probs = (log_probs + state["run_scores"][:, :, None]).reshape(batch, n * vocab)
    top_lp, top_idx = jax.lax.top_k(log_probs, k)
    beam = top_idx // vocab
    token = (top_idx % vocab).astype(jnp.int32)
    cand_buf = _gather(state["run_buf"], beam)
    cand_buf = jax.lax.dynamic_update_slice_in_dim(
        cand_buf, token[..., None], window - 1 + t, axis=2)
    recent = jax.lax.dynamic_slice_in_dim(cand_buf, t, window, axis=2)  # ends at the new token
    hits = stops(recent.reshape(batch * k, window), token.reshape(-1)).reshape(batch, k)
    hits = hits | (t + 1 >= max_new_tokens)

    # The next running beams: the best candidates that did not stop.
    running_lp = top_lp + hits.astype(jnp.float32) * NEG
    next_idx = jax.lax.top_k(running_lp, n)[1]
    run_buf = _gather(cand_buf, next_idx)
    run_scores = _gather(running_lp, next_idx)
    src_rows = (jnp.arange(batch)[:, None] * n + _gather(beam, next_idx)).reshape(-1)

    # Finished hypotheses: the stopped candidates among the top n, while the row is open.
    just_finished = hits & (jnp.arange(k) < n)[None, :]
    new_length = t + 1
    scores = top_lp / (new_length.astype(jnp.float32) ** length_penalty)
    if early_stopping is True:
        full = jnp.all(state["is_fin"], axis=-1, keepdims=True)
        scores = scores + full.astype(jnp.float32) * NEG
    scores = scores + (~state["improvable"])[:, None].astype(jnp.float32) * NEG
    scores = scores + (~just_finished).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([state["fin_scores"], scores], axis=1)
    keep = jax.lax.top_k(merged_scores, n)[1]
    pick = lambda old, new: _gather(jnp.concatenate([old, new], axis=1), keep)  # noqa: E731
    fin_scores = _gather(merged_scores, keep)
    fin_tokens = pick(state["fin_tokens"], cand_buf[:, :, window - 1:])
    fin_sums = pick(state["fin_sums"], top_lp)
    fin_lengths = pick(state["fin_lengths"],
                       jnp.broadcast_to(new_length, (batch, k)).astype(jnp.int32))
    is_fin = pick(state["is_fin"], just_finished)

    # Can a running beam still beat the worst finished hypothesis?
    if early_stopping == "never" and length_penalty > 0.0:
        best_length = jnp.float32(max_new_tokens)
    else:
        best_length = new_length.astype(jnp.float32)
    best_running = run_scores[:, :1] / best_length ** length_penalty
    worst_finished = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
    improvable = state["improvable"] & jnp.any(best_running > worst_finished, axis=-1)
    active = jnp.any(improvable) & ~jnp.all(hits)
    if early_stopping is True:
        active &= ~jnp.all(is_fin)
    new = dict(run_buf=run_buf, run_scores=run_scores, fin_tokens=fin_tokens,
               fin_scores=fin_scores, fin_sums=fin_sums, fin_lengths=fin_lengths, is_fin=is_fin,
               improvable=improvable, active=active)
    return new, src_rows


def next_tokens(state: dict, t, window: int):
    """The running beams' latest tokens [B*n] (generated at new length t - 1)."""
    return jax.lax.dynamic_index_in_dim(state["run_buf"], window - 2 + t, axis=2,
                                        keepdims=False).reshape(-1)


def best(state: dict):
    """(tokens [B, N], lengths [B], sums of log-probs [B]) of each row's best hypothesis."""
    return state["fin_tokens"][:, 0], state["fin_lengths"][:, 0], state["fin_sums"][:, 0]
