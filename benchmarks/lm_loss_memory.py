"""Compiled temporary memory of the masked next-token loss: dense logits versus chunks.

Compiles `jit(value_and_grad(loss, argnums=(hidden, kernel)))` of `naive_next_token_loss` (all
[B, L, V] float32 logits at once) and of `next_token_loss` at each chunk size, from
`jax.ShapeDtypeStruct` inputs: nothing of that size is allocated or run. Prints the temporary
memory from XLA's compiled memory analysis and its ratio to the naive loss's.

    python benchmarks/lm_loss_memory.py                  # V=128256 (Llama-3), L=2048, B=1, D=512
    python benchmarks/lm_loss_memory.py --vocab 32000 --length 1024 --chunks 128,256
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vlmjax.losses import lm

IMPLS = {"naive": lm.naive_next_token_loss, "chunked": lm.next_token_loss}


def arg_specs(vocab: int, length: int, batch: int, width: int):
    """(hidden [B, L, D] f32, kernel [D, V] f32, targets [B, L] i32, loss_mask [B, L] bool)."""
    return (jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
            jax.ShapeDtypeStruct((width, vocab), jnp.float32),
            jax.ShapeDtypeStruct((batch, length), jnp.int32),
            jax.ShapeDtypeStruct((batch, length), jnp.bool_))


def compiled_memory(impl: str, vocab: int, length: int, batch: int, width: int,
                    chunk_size: int = 512, z_loss: float = 1e-4, label_smoothing: float = 0.1):
    """XLA's memory analysis of the compiled value-and-grad (w.r.t. hidden and kernel)."""
    loss_fn = IMPLS[impl]

    def loss(hidden, kernel, targets, loss_mask):
        return loss_fn(hidden, kernel, targets, loss_mask, chunk_size=chunk_size,
                       z_loss=z_loss, label_smoothing=label_smoothing)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    return step.lower(*arg_specs(vocab, length, batch, width)).compile().memory_analysis()


def measure(vocab: int, length: int, batch: int, width: int, chunks, **loss_kwargs):
    """Rows (impl, chunk or None, temp bytes, ratio to naive, compile seconds), naive first."""
    rows = []
    for impl, chunk in [("naive", None)] + [("chunked", c) for c in chunks]:
        start = time.perf_counter()
        mem = compiled_memory(impl, vocab, length, batch, width,
                              **({} if chunk is None else {"chunk_size": chunk}), **loss_kwargs)
        seconds = time.perf_counter() - start
        temp = mem.temp_size_in_bytes
        rows.append((impl, chunk, temp, temp / rows[0][2] if rows else 1.0, seconds))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256, help="V (default: Llama-3's)")
    parser.add_argument("--length", type=int, default=2048, help="L")
    parser.add_argument("--batch", type=int, default=1, help="B")
    parser.add_argument("--width", type=int, default=512, help="D")
    parser.add_argument("--chunks", default="64,128,256,512", help="comma-separated chunk sizes")
    parser.add_argument("--z_loss", type=float, default=1e-4)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    V, L, B, D = args.vocab, args.length, args.batch, args.width
    mib = 2**20
    print(f"# {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), "
          f"jax {jax.__version__}; V={V}, L={L}, B={B}, D={D}, z_loss={args.z_loss}, "
          f"label_smoothing={args.label_smoothing}; temp = XLA compiled temporary memory of "
          "value_and_grad w.r.t. hidden and kernel (compile only, nothing runs)")
    print(f"# arguments: hidden [B, L, D] f32 {B * L * D * 4 / mib:.1f} MiB, "
          f"kernel [D, V] f32 {D * V * 4 / mib:.1f} MiB, targets + loss_mask "
          f"{B * L * 5 / mib:.2f} MiB; dense [B, L, V] f32 logits {B * L * V * 4 / mib:.1f} MiB")
    print("| impl | chunk | temp MiB | ratio vs naive | compile s |")
    print("|---|---|---|---|---|")
    for impl, chunk, temp, ratio, seconds in measure(
            V, L, B, D, chunks, z_loss=args.z_loss, label_smoothing=args.label_smoothing):
        print(f"| {impl} | {chunk or '-'} | {temp / mib:.1f} | {ratio:.3f} | {seconds:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
