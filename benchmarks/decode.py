"""Greedy decoding speed: vlmjax against transformers' `generate` on the same weights.

One run builds a random Llama-style model per size, saves it as an HF directory, loads the same
weights into both sides (`vlmjax.convert.load_pretrained` and `AutoModelForCausalLM`), float32,
and times greedy decoding of `--new` tokens after a `--prompt`-token prompt (no EOS: every row
decodes all of them) at each batch size. Columns: new tokens/s of transformers (torch CPU,
KV cache, eager attention), of `vlmjax.inference.generate` (KV cache, jitted loop), of vlmjax
without the cache (a jitted loop re-running the whole forward on the growing sequence each
step), the ratio vlmjax / transformers, and prefill tokens/s of each side (the prompt through
the model once, filling the cache), and the weight bytes each side streams per second (weights
read per decode step x steps/s: at batch 1 decoding is bound by this, compare it with the
machine's memory stream rate in the header). Compile time is excluded (the first call, compile included, is its own column); times are the
median of `--repeats` runs after one warm-up.

    python benchmarks/decode.py                       # sizes 15m and 125m, batch 1 and 8
    python benchmarks/decode.py --sizes 15m --batches 1 --new 16 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

# name -> HF LlamaConfig fields (vocab 32k as Llama 2; ~15M and ~125M parameters).
SIZES = {
    "15m": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=6, num_key_value_heads=6),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
}
VOCAB = 32_000
HEADER = ("| size | params | batch | HF tok/s | vlmjax tok/s | vlmjax no-cache tok/s | "
          "vlmjax / HF | HF weights GB/s | vlmjax weights GB/s | HF prefill tok/s | "
          "vlmjax prefill tok/s | vlmjax first call s |")


def stream_bandwidth() -> float:
    """GB/s of a jitted sum over 512 MiB of float32: what streaming weights from memory can
    reach on this machine (decoding at batch 1 reads every weight once per token)."""
    x = jnp.ones((128 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = median_time(lambda: total(x).block_until_ready(), 5)
    return x.nbytes / seconds / 1e9


def weight_bytes_per_step(size: str) -> float:
    """float32 bytes of the weights one decode step reads: all but the embedding table, of
    which only the fed tokens' rows are gathered."""
    c = SIZES[size]
    width, mlp, depth = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    per_layer = 4 * width * width + 3 * width * mlp + 2 * width  # MHA (kv heads = heads)
    assert c["num_key_value_heads"] == c["num_attention_heads"]
    return 4.0 * (depth * per_layer + width + width * VOCAB)


def save_random_llama(size: str, directory: str, seed: int = 0):
    """A random LlamaForCausalLM of `size`, weights N(0, 1/fan_in), saved float32."""
    import torch
    import transformers
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096,
                                      tie_word_embeddings=False, **SIZES[size])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return common.median(times)


def hf_side(directory: str, prompt: np.ndarray, new: int, repeats: int) -> tuple[float, float]:
    """(new tokens/s, prefill tokens/s) of transformers' greedy generate."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.as_tensor(prompt, dtype=torch.long)
    mask = torch.ones_like(ids)

    def generate():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        assert out.shape[1] == prompt.shape[1] + new

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True)

    decode_s = median_time(generate, repeats)
    prefill_s = median_time(prefill, repeats)
    return prompt.size // prompt.shape[1] * new / decode_s, prompt.size / prefill_s


def uncached_greedy(model, params, prompt, new: int):
    """Greedy decoding that re-runs the full forward on the whole buffer each step."""
    batch, length = prompt.shape
    total = length + new

    @jax.jit
    def run(params, prompt):
        buffer = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)

        def step(t, buffer):  # causal: the garbage after position t cannot reach it
            logits = model.apply({"params": params}, buffer)
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False), -1)
            return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(jnp.int32), t, 1)

        return jax.lax.fori_loop(length, total, step, buffer)[:, length:]

    return lambda: jax.block_until_ready(run(params, prompt))


def vlmjax_side(directory: str, prompt: np.ndarray, new: int, repeats: int, check_tokens):
    """(new tokens/s, no-cache tokens/s, prefill tokens/s, compile s)."""
    from vlmjax.convert import load_pretrained
    from vlmjax.inference import generate
    model, params, _ = load_pretrained(directory)
    tokens = jnp.asarray(prompt)

    def run():
        out = generate(model, params, tokens, max_new_tokens=new, strategy="greedy")
        return jax.block_until_ready(out.tokens)

    start = time.perf_counter()
    first = run()
    compile_s = time.perf_counter() - start
    if check_tokens is not None:
        check_tokens(np.asarray(first))
    decode_s = median_time(run, repeats)
    uncached_s = median_time(uncached_greedy(model, params, tokens, new), max(1, repeats // 2))

    batch, length = prompt.shape

    @jax.jit
    def prefill(params, tokens):
        cache = model.init_cache(batch, length + new)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        return model.apply({"params": params}, tokens, positions=positions, cache=cache)

    prefill_s = median_time(lambda: jax.block_until_ready(prefill(params, tokens)), repeats)
    return batch * new / decode_s, batch * new / uncached_s, prompt.size / prefill_s, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="15m,125m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: all cores, as XLA uses)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    print(common.machine_line(), f"torch {torch.__version__} ({args.threads} threads)")
    print(f"greedy, float32, prompt {args.prompt} tokens, {args.new} new tokens, median of "
          f"{args.repeats}; memory stream {stream_bandwidth():.1f} GB/s (jitted sum, 512 MiB)")
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as directory:
            params = save_random_llama(size, directory)
            for batch in (int(b) for b in args.batches.split(",")):
                prompt = np.random.default_rng(batch).integers(4, VOCAB, (batch, args.prompt))
                prompt = prompt.astype(np.int32)
                hf_tps, hf_prefill = hf_side(directory, prompt, args.new, args.repeats)
                ours, uncached, prefill, compile_s = vlmjax_side(
                    directory, prompt, args.new, args.repeats, None)
                step_gb = weight_bytes_per_step(size) / 1e9 / batch  # per token
                row = (f"| {size} | {params / 1e6:.1f}M | {batch} | {hf_tps:.0f} | {ours:.0f} | "
                       f"{uncached:.0f} | {ours / hf_tps:.2f}x | {hf_tps * step_gb:.1f} | "
                       f"{ours * step_gb:.1f} | {hf_prefill:.0f} | {prefill:.0f} | "
                       f"{compile_s:.1f} |")
                print(row, flush=True)
                rows.append((size, batch, ours / hf_tps))
    return rows


if __name__ == "__main__":
    main()
