"""Masked next-token cross-entropy for decoder LMs, chunked over the sequence.

    loss, metrics = next_token_loss(hidden_BLD, kernel_DV, targets_BL, loss_mask_BL)

`hidden` is the decoder's final-normed hidden state (Decoder(..., return_hidden=True)),
`kernel` its unembedding matrix (models.decoder.output_kernel), `targets[b, t]` the token to
predict at position t (the data pipeline shifts, not the loss) and `loss_mask[b, t]` says which
positions count (False: prompt, padding, a document's last token).

Per counted token, with logits z = hidden @ kernel in float32 and lse = logsumexp(z):
    nll    = lse - z[target]
    ce     = (1 - s) nll + s (lse - mean(z))        label smoothing s (uniform over the vocab)
    loss   = ce + z_loss * lse**2                    z-loss (PaLM) keeps lse near 0
and the loss is the mean over the counted tokens of the whole batch (0 when none count).

`next_token_loss` scans over chunks of `chunk_size` positions (each row's counted positions
first; a chunk with none is skipped) and computes each chunk's
gradient (d hidden, and d kernel summed over chunks) in the same pass, while the chunk's
[B, C, V] logits exist (a custom VJP; the backward only scales it by the cotangent): the
[B, L, V] float32 logits never exist, and the vocabulary matmul runs 3 times, not the 4 of
recomputing the logits in the backward. Only `loss` is differentiable; the other metrics are
stop-gradient. `naive_next_token_loss` computes the same dense
(the reference; also fine at small vocabularies).

metrics: loss (the returned loss), nll (mean nll, without smoothing or z-loss: log perplexity),
z_loss (mean z-loss term), accuracy (argmax == target), num_tokens (counted tokens), all float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
_SUMS = ("loss", "nll", "z_loss", "correct")  # per-token terms summed over counted tokens


def _chunk_logits(hidden, kernel, targets, mask):
    # Zero an uncounted position's hidden state and target before the matmul: a non-finite one
    # (e.g. NaN from a fully masked attention row at padding) would otherwise poison the kernel's
    # gradient through hidden^T @ dlogits (inf * 0 = NaN), though not the value.
    hidden = jnp.where(mask[..., None], hidden, jnp.zeros((), hidden.dtype)).astype(F32)
    targets = jnp.where(mask, targets, 0)
    logits = jnp.einsum("...d,dv->...v", hidden, kernel.astype(F32), preferred_element_type=F32)
    return hidden, targets, logits


def _token_terms(hidden, kernel, targets, mask, z_loss, label_smoothing, with_grad=False):
    """Sums over the counted tokens of one block: {loss, nll, z_loss, correct}; with
    `with_grad`, also d(loss sum)/d hidden [..., D] and d(loss sum)/d kernel [D, V]."""
    hidden, targets, logits = _chunk_logits(hidden, kernel, targets, mask)
    top = jnp.max(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    ce = nll
    if label_smoothing:
        ce = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1))
    z_term = z_loss * jnp.square(lse) if z_loss else jnp.zeros_like(lse)
    # The target is the argmax when its logit is the maximum (cheaper than an argmax pass; only
    # an exact tie, which argmax breaks towards the lower index, can differ).
    correct = lax.stop_gradient(target_logit >= top).astype(F32)
    terms = {"loss": ce + z_term, "nll": nll, "z_loss": z_term, "correct": correct}
    # where, not multiply: a masked position's terms never reach the sums.
    sums = {k: jnp.sum(jnp.where(mask, v, 0.0)) for k, v in terms.items()}
    if not with_grad:
        return sums
    # d loss / d logits = softmax * (1 + 2 z lse) - (1 - s) onehot - s / V, on counted rows.
    probs = jnp.exp(logits - lse[..., None])
    dlogits = probs * (1.0 + 2.0 * z_loss * lse)[..., None] - label_smoothing / logits.shape[-1]
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=F32)
    dlogits = jnp.where(mask[..., None], dlogits - (1.0 - label_smoothing) * onehot, 0.0)
    dhidden = jnp.einsum("...v,dv->...d", dlogits, kernel.astype(F32))
    dkernel = jnp.einsum("...d,...v->dv", hidden, dlogits)
    return sums, dhidden, dkernel


def _finish(sums, mask):
    num_tokens = jnp.sum(mask.astype(F32))
    denom = jnp.maximum(num_tokens, 1.0)
    metrics = {"loss": sums["loss"] / denom, "nll": sums["nll"] / denom,
               "z_loss": sums["z_loss"] / denom, "accuracy": sums["correct"] / denom,
               "num_tokens": num_tokens}
    return metrics["loss"], metrics


def _check(hidden, kernel, targets, loss_mask, chunk_size):
    if hidden.ndim != 3 or kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(f"next_token_loss wants hidden [B, L, D] and kernel [D, V], got "
                         f"{hidden.shape} and {kernel.shape}")
    if targets.shape != hidden.shape[:2] or loss_mask.shape != hidden.shape[:2]:
        raise ValueError(f"targets {targets.shape} and loss_mask {loss_mask.shape} must be "
                         f"[B, L] = {hidden.shape[:2]}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def naive_next_token_loss(hidden_BLD, kernel_DV, targets_BL, loss_mask_BL, *, chunk_size=128,
                          z_loss=0.0, label_smoothing=0.0):
    """The dense reference: all [B, L, V] logits at once (chunk_size is ignored)."""
    _check(hidden_BLD, kernel_DV, targets_BL, loss_mask_BL, chunk_size)
    mask = loss_mask_BL.astype(bool)
    sums = _token_terms(hidden_BLD, kernel_DV, targets_BL, mask, z_loss, label_smoothing)
    return _finish(sums, mask)


def next_token_loss(hidden_BLD, kernel_DV, targets_BL, loss_mask_BL, *, chunk_size=128,
                    z_loss=0.0, label_smoothing=0.0):
    """The loss of the module docstring, `chunk_size` positions at a time. A ragged last chunk
    is padded with uncounted positions."""
    _check(hidden_BLD, kernel_DV, targets_BL, loss_mask_BL, chunk_size)
    batch, length, width = hidden_BLD.shape
    mask = loss_mask_BL.astype(bool)
    chunk = min(int(chunk_size), length)
    num_chunks = -(-length // chunk)
    if num_chunks > 1:
        # Each row's counted positions first (a stable sort, so in order), and a chunk in which
        # no row counts a position is skipped: the uncounted image tokens and prompts of LLaVA
        # rows cost no vocabulary matmul. The sort is within rows, so a batch-sharded input
        # stays local. One chunk has nothing to skip: no sort.
        order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int8), axis=1, stable=True)
        hidden_BLD = jnp.take_along_axis(hidden_BLD, order[..., None], axis=1)
        targets_BL = jnp.take_along_axis(targets_BL, order, axis=1)
        mask = jnp.take_along_axis(mask, order, axis=1)
    pad = num_chunks * chunk - length
    if pad:
        hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
        mask_padded = jnp.pad(mask, ((0, 0), (0, pad)))
    else:
        mask_padded = mask

    def chunks(x):  # [B, n*C, ...] -> [n, B, C, ...]: the scan runs over the chunk axis
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    zero = {k: jnp.zeros((), F32) for k in _SUMS}
    xs = (chunks(hidden_BLD), chunks(targets_BL), chunks(mask_padded))

    # The gradient is computed in the forward scan, chunk by chunk, while each chunk's logits
    # exist anyway; the backward only scales it. The vocabulary matmul runs 3 times (logits,
    # d hidden, d kernel) instead of the 4 of a checkpointed chunk (logits again).
    @jax.custom_vjp
    def summed(hidden_chunks, kernel):
        def add(carry, xs):
            sums = _token_terms(xs[0], kernel, xs[1], xs[2], z_loss, label_smoothing)
            return {k: carry[k] + sums[k] for k in _SUMS}

        def body(carry, xs):
            return lax.cond(jnp.any(xs[2]), add, lambda c, _: c, carry, xs), None
        return lax.scan(body, zero, (hidden_chunks, *xs[1:]))[0]

    def summed_fwd(hidden_chunks, kernel):
        def add(carry, xs):
            sums, dkernel = carry
            chunk_sums, dh, dk = _token_terms(xs[0], kernel, xs[1], xs[2], z_loss,
                                              label_smoothing, with_grad=True)
            return ({k: sums[k] + chunk_sums[k] for k in _SUMS}, dkernel + dk), dh

        def skip(carry, xs):
            return carry, jnp.zeros(xs[0].shape, F32)

        def body(carry, xs):
            return lax.cond(jnp.any(xs[2]), add, skip, carry, xs)
        init = (zero, jnp.zeros(kernel.shape, F32))
        (sums, dkernel), dhidden = lax.scan(body, init, (hidden_chunks, *xs[1:]))
        return sums, (dhidden.astype(hidden_chunks.dtype), dkernel.astype(kernel.dtype))

    def summed_bwd(residuals, cotangent):
        dhidden, dkernel = residuals
        g = cotangent["loss"]  # the other sums are metrics: they carry no gradient
        return (g * dhidden).astype(dhidden.dtype), (g * dkernel).astype(dkernel.dtype)

    summed.defvjp(summed_fwd, summed_bwd)
    sums = summed(xs[0], kernel_DV)
    sums = {k: v if k == "loss" else lax.stop_gradient(v) for k, v in sums.items()}
    return _finish(sums, mask)
