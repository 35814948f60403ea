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

`next_token_loss` scans over chunks of `chunk_size` positions; each chunk is a jax.checkpoint,
so the forward keeps no logits and the backward recomputes one chunk's [B, C, V] logits at a
time: the [B, L, V] float32 logits never exist. `naive_next_token_loss` computes the same dense
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


def _token_terms(hidden, kernel, targets, mask, z_loss, label_smoothing):
    """Sums over the counted tokens of one block: {loss, nll, z_loss, correct}."""
    # Zero an uncounted position's hidden state and target before the matmul: a non-finite one
    # (e.g. NaN from a fully masked attention row at padding) would otherwise poison the kernel's
    # gradient through hidden^T @ dlogits (inf * 0 = NaN), though not the value.
    hidden = jnp.where(mask[..., None], hidden, jnp.zeros((), hidden.dtype))
    targets = jnp.where(mask, targets, 0)
    logits = jnp.einsum("...d,dv->...v", hidden.astype(F32), kernel.astype(F32),
                        preferred_element_type=F32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    ce = nll
    if label_smoothing:
        ce = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1))
    z_term = z_loss * jnp.square(lse) if z_loss else jnp.zeros_like(lse)
    correct = lax.stop_gradient(jnp.argmax(logits, axis=-1) == targets).astype(F32)
    terms = {"loss": ce + z_term, "nll": nll, "z_loss": z_term, "correct": correct}
    # where, not multiply: a masked position's terms never reach the sums.
    return {k: jnp.sum(jnp.where(mask, v, 0.0)) for k, v in terms.items()}


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
    pad = num_chunks * chunk - length
    if pad:
        hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
        mask_padded = jnp.pad(mask, ((0, 0), (0, pad)))
    else:
        mask_padded = mask

    def chunks(x):  # [B, n*C, ...] -> [n, B, C, ...]: the scan runs over the chunk axis
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # keep only the chunk's inputs; recompute its logits in the backward
    def chunk_sums(kernel, hidden, targets, chunk_mask):
        return _token_terms(hidden, kernel, targets, chunk_mask, z_loss, label_smoothing)

    def body(carry, xs):
        sums = chunk_sums(kernel_DV, *xs)
        return {k: carry[k] + sums[k] for k in _SUMS}, None

    zero = {k: jnp.zeros((), F32) for k in _SUMS}
    sums, _ = lax.scan(body, zero, (chunks(hidden_BLD), chunks(targets_BL), chunks(mask_padded)))
    return _finish(sums, mask)
