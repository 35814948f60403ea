"""Export vlmjax `Decoder` params to a Hugging Face LlamaForCausalLM / Qwen2ForCausalLM /
OPTForCausalLM directory.

    export_hf_decoder(params, model_config, out_dir, dtype="float32" | "bfloat16",
                      tokenizer_dir=None)

writes `config.json` (`hf_decoder_config.hf_config_from_decoder`) and the weights as
`model.safetensors`, or as shards of at most `max_shard_bytes` with
`model.safetensors.index.json`, one tensor at a time (the host holds one tensor in HF layout);
`AutoModelForCausalLM.from_pretrained(out_dir)` computes the same logits. Biases that the HF
model has and the Decoder lacks (Qwen2's q/k/v bias, Llama's o bias beside q/k/v bias) are
written as zeros. The tokenizer and generation files of `tokenizer_dir` come along.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_decoder import Entry, scanned_path, to_hf, weight_entries
from vlmjax.convert.hf_decoder_config import (build_decoder, hf_biases, hf_config_from_decoder,
                                              hf_family_of_decoder)
from vlmjax.convert.params import flatten
from vlmjax.models import scan_layout

# Copied from the source directory so that the export is a complete HF model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of a vlmjax param of `shape` (without materialising it)."""
    if entry.layout == "linear":
        return tuple(reversed(shape))
    if entry.layout == "proj":      # [D, H, K] -> [H*K, D]
        return (shape[1] * shape[2], shape[0])
    if entry.layout == "proj_bias":
        return (int(np.prod(shape)),)
    if entry.layout == "out":       # [H, K, D] -> [D, H*K]
        return (shape[2], shape[0] * shape[1])
    return tuple(shape)


def copy_tokenizer_files(src_dir: str | None, out_dir: str) -> list[str]:
    """The TOKENIZER_FILES of `src_dir` into `out_dir`; returns their names."""
    if not src_dir:
        return []
    files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, f))]
    for name in files:
        if os.path.abspath(os.path.join(src_dir, name)) != os.path.abspath(
                os.path.join(out_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    return files


def export_hf_decoder(params: Mapping[str, Any], model_config: Mapping[str, Any], out_dir: str,
                      dtype: str = "float32", tokenizer_dir: str | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes the HF directory (see the module docstring); returns the model_type."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    family = hf_family_of_decoder(model_config)
    config = hf_config_from_decoder(model_config, dtype)
    model = build_decoder(model_config)
    flat = flatten(nn.meta.unbox(dict(params)))
    scanned = scan_layout.is_scanned(dict(params))
    ours = {(scanned_path(e.path) if scanned and e.layer is not None else e.path)
            for e in weight_entries(model_config)}
    if set(flat) != ours:
        raise ValueError(f"params do not match the model config: missing "
                         f"{sorted(ours - set(flat))[:10]}, unused {sorted(set(flat) - ours)[:10]}")
    qkv_bias, out_bias = hf_biases(family, model_config)
    entries = weight_entries({**model_config, "qkv_bias": qkv_bias, "out_bias": out_bias})
    zero_shapes = {"proj_bias": lambda e: (e.heads * model.dims_per_head,),
                   "copy": lambda e: (model.width,)}  # biases the Decoder does not have

    def path_of(entry):
        return scanned_path(entry.path) if scanned and entry.layer is not None else entry.path

    def shape_of(entry):
        path = path_of(entry)
        if path not in flat:
            return zero_shapes[entry.layout](entry)
        shape = tuple(np.shape(flat[path]))
        return hf_shape(entry, shape[1:] if scanned and entry.layer is not None else shape)

    by_name = {e.hf: e for e in entries}

    def produce(name):
        entry = by_name[name]
        path = path_of(entry)
        if path not in flat:
            return np.zeros(shape_of(entry), np.float32)
        value = flat[path][entry.layer] if scanned and entry.layer is not None else flat[path]
        return to_hf(np.asarray(value, np.float32), entry)

    os.makedirs(out_dir, exist_ok=True)
    stale = [f for f in os.listdir(out_dir) if f.endswith(".safetensors")
             or f == hf_io.SHARD_INDEX]
    for name in stale:  # an earlier export's shards would confuse from_pretrained
        os.remove(os.path.join(out_dir, name))
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    hf_io.write_safetensors_streaming(out_dir, [(e.hf, shape_of(e)) for e in entries], produce,
                                      dtype, max_shard_bytes)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return family
