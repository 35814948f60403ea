"""Peak host memory of `vlmjax.convert.load_pretrained` on a Llama-style HF checkpoint: the
import streams tensor by tensor into the devices, so the peak is the float32 params plus about
one tensor, not the checkpoint plus the params.

A random bf16 checkpoint of the chosen shape is written to a temporary directory as sharded
safetensors with its config.json, tensor by tensor and without torch or transformers; a fresh
subprocess then loads it into float32 device arrays (the CPU "device" is host memory) and
reports its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and the RSS before the load
(the interpreter with jax and vlmjax imported). The checkpoint is deleted afterwards.

    python benchmarks/load_memory.py --shape 1b            # Llama-3.2-1B shape, 1.24B params
    python benchmarks/load_memory.py --shape 1b 3b         # several rows in one table
    python benchmarks/load_memory.py --shape tiny --scan-layers   # the scanned layout
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

GIB = 2 ** 30
# name -> Llama-style model config (Decoder arguments + INFO keys); tied like Llama 3.2 1B/3B.
SHAPES = {
    "tiny": dict(vocab_size=1000, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, tie_embeddings=False),
    "1b": dict(vocab_size=128256, width=2048, depth=16, num_heads=32, num_kv_heads=8,
               head_dim=64, mlp_dim=8192, tie_embeddings=True),
    "3b": dict(vocab_size=128256, width=3072, depth=28, num_heads=24, num_kv_heads=8,
               head_dim=128, mlp_dim=8192, tie_embeddings=True),
}
COMMON = dict(activation="silu", norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None,
              qkv_bias=False, out_bias=False, sliding_window=None, model_type="llama",
              bos_id=1, eos_id=2, pad_id=None, max_position_embeddings=2048)
HEADER = ("| shape | params | checkpoint GiB (bf16) | float32 params GiB | RSS before load GiB | "
          "peak RSS GiB | peak / param (bytes) | (peak - before) / param | load s |")


def model_config(shape: str) -> dict:
    return {**COMMON, **SHAPES[shape]}


def write_checkpoint(directory: str, config: dict, max_shard_bytes: int = 2 * GIB,
                     seed: int = 0) -> int:
    """A random bf16 HF Llama checkpoint of `config` in `directory`, one tensor at a time;
    returns the parameter count."""
    import numpy as np

    from vlmjax.convert import hf_io
    from vlmjax.convert.hf_decoder import weight_entries
    from vlmjax.convert.hf_decoder_config import abstract_decoder_params, hf_config_from_decoder
    from vlmjax.convert.hf_decoder_export import hf_shape
    from vlmjax.convert.params import flatten

    abstract = flatten(abstract_decoder_params(config))
    specs = [(e.hf, hf_shape(e, abstract[e.path].shape)) for e in weight_entries(config)]
    shapes = dict(specs)
    rng = np.random.default_rng(seed)

    def produce(name):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, np.float32) * np.float32(0.02)

    os.makedirs(directory, exist_ok=True)
    hf_io.write_json(os.path.join(directory, "config.json"),
                     hf_config_from_decoder(config, "bfloat16"))
    hf_io.write_safetensors_streaming(directory, specs, produce, "bfloat16", max_shard_bytes)
    return sum(int(np.prod(s)) for _, s in specs)


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(directory: str, scan_layers: bool) -> dict:
    """In this (fresh) process: load the checkpoint, report sizes and peak RSS in bytes."""
    import jax

    from vlmjax.convert import load_pretrained
    from vlmjax.convert.hf_io import SafetensorsTensors

    before = rss_now()
    start = time.perf_counter()
    _, params, _ = load_pretrained(directory, scan_layers=scan_layers)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(params)
    return dict(params=sum(x.size for x in leaves), param_bytes=sum(x.nbytes for x in leaves),
                checkpoint_bytes=SafetensorsTensors(directory).nbytes(), rss_before=before,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                seconds=seconds, devices=len(jax.devices()))


def run(shape: str, scan_layers: bool, workdir: str | None) -> dict:
    directory = tempfile.mkdtemp(prefix=f"load_memory_{shape}_", dir=workdir)
    try:
        start = time.perf_counter()
        write_checkpoint(directory, model_config(shape))
        print(f"[{shape}] wrote {directory} in {time.perf_counter() - start:.0f}s",
              file=sys.stderr)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("XLA_FLAGS", None)  # one CPU device, as a single-host load
        command = [sys.executable, os.path.abspath(__file__), "--measure", directory]
        if scan_layers:
            command.append("--scan-layers")
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]), shape=shape)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def row(r: dict) -> str:
    n = r["params"]
    count = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return (f"| {r['shape']} | {count} | {r['checkpoint_bytes'] / GIB:.2f} | "
            f"{r['param_bytes'] / GIB:.2f} | {r['rss_before'] / GIB:.2f} | "
            f"{r['peak_rss'] / GIB:.2f} | {r['peak_rss'] / n:.2f} | "
            f"{(r['peak_rss'] - r['rss_before']) / n:.2f} | {r['seconds']:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=["1b"], choices=sorted(SHAPES))
    p.add_argument("--scan-layers", action="store_true", help="load into the scanned layout")
    p.add_argument("--tmpdir", default=None, help="where to write the temporary checkpoint")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the subprocess
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.scan_layers)))
        return
    rows = [run(shape, args.scan_layers, args.tmpdir) for shape in args.shape]
    print(f"layout: {'scanned' if args.scan_layers else 'unrolled'}; "
          f"{rows[0]['devices']} CPU device")
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    for r in rows:
        print(row(r))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
