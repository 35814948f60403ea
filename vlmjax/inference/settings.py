"""The static settings of a generation call (what its compiled functions depend on): the
strategy and its options, checked; the prompt bucket; the stop rules (EOS ids, stop sequences).
See vlmjax.inference.generate."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

STRATEGIES = ("greedy", "sample", "beam")
EARLY_STOPPING = (True, False, "never")
DEFAULT_PROMPT_BUCKETS = tuple(2 ** i for i in range(4, 16))  # 16 .. 32768
PER_TOKEN_INPUTS = ("image_mask",)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static settings a compiled generation function depends on."""
    strategy: str
    max_new_tokens: int
    num_beams: int
    top_k: int
    use_top_p: bool
    eos_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_id: int
    length_penalty: float
    early_stopping: Any
    prompt_length: int          # after bucketing
    per_token_inputs: tuple[str, ...]

    @property
    def window(self) -> int:
        """How many latest tokens the stop check reads."""
        return max([1] + [len(s) for s in self.stop_sequences])

    @property
    def cache_length(self) -> int:
        return self.prompt_length + self.max_new_tokens


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
    """The smallest bucket >= length; past the largest, the next multiple of it; no buckets:
    the length itself."""
    if not buckets:
        return length
    buckets = sorted(int(b) for b in buckets)
    for b in buckets:
        if b >= length:
            return b
    return -(-length // buckets[-1]) * buckets[-1]


def stop_checker(settings: Settings):
    """(recent [X, M] tokens ending with the new one, token [X]) -> bool [X]."""
    eos = jnp.asarray(settings.eos_ids or (-2,), jnp.int32)
    window = settings.window
    seqs = np.full((max(1, len(settings.stop_sequences)), window), -1, np.int32)
    valid = np.zeros(seqs.shape, bool)
    for i, seq in enumerate(settings.stop_sequences):
        seqs[i, window - len(seq):] = seq
        valid[i, window - len(seq):] = True
    seqs, valid = jnp.asarray(seqs), jnp.asarray(valid)

    def stops(recent_XM, token_X):
        hit = jnp.isin(token_X, eos) if settings.eos_ids else jnp.zeros(token_X.shape, bool)
        if settings.stop_sequences:
            match = (recent_XM[:, None, :] == seqs[None]) | ~valid[None]
            hit |= jnp.any(jnp.all(match, axis=-1), axis=-1)
        return hit
    return stops


def make_settings(tokens, strategy, max_new_tokens, num_beams, temperature, top_k, top_p,
                  eos_id, rng, stop_sequences, pad_id, length_penalty, early_stopping,
                  prompt_buckets, per_token_inputs) -> Settings:
    """`generate`'s arguments, checked, as the static Settings (num_beams=1 beam: greedy)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if strategy == "beam" and int(num_beams) < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if strategy == "beam" and early_stopping not in EARLY_STOPPING:
        raise ValueError(f"early_stopping={early_stopping!r}; expected True, False or 'never'")
    if strategy == "sample":
        if rng is None:
            raise ValueError("strategy='sample' needs rng (e.g. jax.random.key(seed))")
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature={temperature} must be > 0 for sampling")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if int(top_k) < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k)")
    eos_ids = () if eos_id is None else tuple(
        int(e) for e in (eos_id if isinstance(eos_id, (list, tuple, np.ndarray)) else [eos_id]))
    if any(not isinstance(seq, (list, tuple, np.ndarray)) for seq in stop_sequences or ()):
        raise ValueError(f"stop_sequences={stop_sequences!r} must be a list of token-id lists, "
                         "e.g. [[13, 7]]")
    stop_sequences = tuple(tuple(int(t) for t in seq) for seq in (stop_sequences or ()))
    if any(len(seq) == 0 for seq in stop_sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")
    if strategy == "beam" and int(num_beams) == 1:
        strategy = "greedy"  # as transformers: one beam is greedy search
    return Settings(
        strategy=strategy, max_new_tokens=int(max_new_tokens),
        num_beams=int(num_beams) if strategy == "beam" else 1,
        top_k=int(top_k) if strategy == "sample" else 0,
        use_top_p=strategy == "sample" and float(top_p) < 1.0, eos_ids=eos_ids,
        stop_sequences=stop_sequences, pad_id=int(pad_id),
        length_penalty=float(length_penalty) if strategy == "beam" else 1.0,
        early_stopping=(early_stopping if early_stopping == "never" else bool(early_stopping))
        if strategy == "beam" else False,
        prompt_length=bucket_length(int(tokens.shape[1]), prompt_buckets),
        per_token_inputs=tuple(sorted(per_token_inputs)))
