"""Import Hugging Face `LlamaForCausalLM` / `Qwen2ForCausalLM` / `OPTForCausalLM` weights as
`Decoder` params.

    params, model_config = load_hf_decoder(directory, shardings=None, scan_layers=None)
    model = build_decoder(model_config)  # the config: vlmjax.convert.hf_decoder_config

Weights (HF torch layouts -> vlmjax; RoPE is rotate_half in both, so no row permutation):
  model.embed_tokens.weight [V, D]            -> embed/embedding [V, D]
  model.layers.{i}.self_attn.q_proj.weight [H*K, D] -> layers/block{i}/query/kernel [D, H, K]
    (k_proj, v_proj -> key, value with Hkv heads; their biases [H*K] -> bias [H, K])
  model.layers.{i}.self_attn.o_proj.weight [D, H*K] -> layers/block{i}/out/kernel [H, K, D]
  model.layers.{i}.mlp.{gate,up,down}_proj.weight [out, in] -> {gate,up,down}/kernel [in, out]
  model.layers.{i}.input_layernorm / post_attention_layernorm -> attn_norm / mlp_norm/scale
  model.norm.weight -> final_norm/scale;  lm_head.weight [V, D] -> lm_head/kernel [D, V]
OPT (`opt_weight_entries`): model.decoder.embed_tokens / embed_positions -> embed /
  position_embed; layers.{i}.self_attn.{q,k,v,out}_proj -> query / key / value / out as above;
  fc1 / fc2 -> up / down; self_attn_layer_norm / final_layer_norm -> attn_norm / mlp_norm
  (scale, bias); model.decoder.final_layer_norm -> final_norm. Files saved from OPTModel
  (the facebook/opt-* checkpoints) spell the names without `model.`; both are read.
Under `scan_layers` the per-layer tensors are stacked into layers/blocks/... [depth, ...].

Streaming: tensors are read one at a time (`hf_io.SafetensorsTensors`), converted and placed
on device (into their sharding, when given) before the next is read, so the host holds about
one tensor (one parameter across layers under scan_layers), not a copy of the checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

import jax
import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_decoder_config import (abstract_decoder_params, build_decoder,
                                              decoder_config_from_hf, decoder_kwargs,
                                              hf_family_of_decoder)
from vlmjax.convert.params import flatten, unflatten
from vlmjax.models import scan_layout

__all__ = ["abstract_decoder_params", "build_decoder", "decoder_config_from_hf",
           "decoder_kwargs", "load_hf_decoder", "stream_params", "weight_entries"]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers that some older checkpoints saved


# ---------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Entry:
    hf: str          # HF tensor name
    path: str        # vlmjax param path, '/'-joined (unrolled layout)
    layout: str      # 'copy' | 'linear' [out, in] <-> [in, out] | 'proj' | 'proj_bias' | 'out'
    heads: int = 0   # heads of a 'proj' / 'proj_bias' / 'out' tensor
    layer: int | None = None


def weight_entries(model_config: Mapping[str, Any]) -> list[Entry]:
    """Every tensor of the HF checkpoint of this model config, in checkpoint order."""
    if hf_family_of_decoder(model_config) == "opt":
        return opt_weight_entries(model_config)
    heads, kv = model_config["num_heads"], model_config.get("num_kv_heads") or model_config[
        "num_heads"]
    entries = [Entry("model.embed_tokens.weight", "embed/embedding", "copy")]
    for i in range(model_config["depth"]):
        hf, ours = f"model.layers.{i}.", f"layers/block{i}/"
        layer = [("self_attn.q_proj", "query", "proj", heads),
                 ("self_attn.k_proj", "key", "proj", kv),
                 ("self_attn.v_proj", "value", "proj", kv),
                 ("self_attn.o_proj", "out", "out", heads)]
        entries += [Entry(f"{hf}{name}.weight", f"{ours}{mod}/kernel", layout, h, i)
                    for name, mod, layout, h in layer]
        if model_config.get("qkv_bias"):
            entries += [Entry(f"{hf}{name}.bias", f"{ours}{mod}/bias", "proj_bias", h, i)
                        for name, mod, _, h in layer[:3]]
        if model_config.get("out_bias"):
            entries.append(Entry(f"{hf}self_attn.o_proj.bias", f"{ours}out/bias", "copy", 0, i))
        entries += [Entry(f"{hf}mlp.{name}_proj.weight", f"{ours}{name}/kernel", "linear", 0, i)
                    for name in ("gate", "up", "down")]
        entries += [Entry(f"{hf}input_layernorm.weight", f"{ours}attn_norm/scale", "copy", 0, i),
                    Entry(f"{hf}post_attention_layernorm.weight", f"{ours}mlp_norm/scale", "copy",
                          0, i)]
    entries.append(Entry("model.norm.weight", "final_norm/scale", "copy"))
    if not model_config.get("tie_embeddings"):
        entries.append(Entry("lm_head.weight", "lm_head/kernel", "linear"))
    return entries


def opt_weight_entries(model_config: Mapping[str, Any]) -> list[Entry]:
    """Every tensor of the HF OPTForCausalLM checkpoint of this model config."""
    heads, top = model_config["num_heads"], "model.decoder."
    entries = [Entry(f"{top}embed_tokens.weight", "embed/embedding", "copy"),
               Entry(f"{top}embed_positions.weight", "position_embed/embedding", "copy")]
    for i in range(model_config["depth"]):
        hf, ours = f"{top}layers.{i}.", f"layers/block{i}/"
        for name, mod, layout, bias in (
                ("self_attn.q_proj", "query", "proj", "qkv_bias"),
                ("self_attn.k_proj", "key", "proj", "qkv_bias"),
                ("self_attn.v_proj", "value", "proj", "qkv_bias"),
                ("self_attn.out_proj", "out", "out", "out_bias"),
                ("fc1", "up", "linear", "mlp_bias"), ("fc2", "down", "linear", "mlp_bias")):
            entries.append(Entry(f"{hf}{name}.weight", f"{ours}{mod}/kernel", layout, heads, i))
            if model_config.get(bias):
                entries.append(Entry(f"{hf}{name}.bias", f"{ours}{mod}/bias",
                                     "proj_bias" if layout == "proj" else "copy", heads, i))
        for name, mod in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
            entries += [Entry(f"{hf}{name}.weight", f"{ours}{mod}/scale", "copy", 0, i),
                        Entry(f"{hf}{name}.bias", f"{ours}{mod}/bias", "copy", 0, i)]
    entries += [Entry(f"{top}final_layer_norm.weight", "final_norm/scale", "copy"),
                Entry(f"{top}final_layer_norm.bias", "final_norm/bias", "copy")]
    if not model_config.get("tie_embeddings"):
        entries.append(Entry("lm_head.weight", "lm_head/kernel", "linear"))
    return entries


def spelled_as_checkpoint(entries: list[Entry], names: set[str]) -> list[Entry]:
    """`entries` named as the checkpoint names them: a file saved from the base model (OPTModel,
    as the facebook/opt-* ones) has `decoder.…` where OPTForCausalLM has `model.decoder.…`."""
    if any(e.hf in names for e in entries):
        return entries
    bare = [replace(e, hf=e.hf.removeprefix("model.")) for e in entries]
    return bare if any(e.hf in names for e in bare) else entries


def to_vlmjax(x: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.layout == "linear":
        return x.T
    if entry.layout == "proj":     # [H*K, D] -> [D, H, K]
        return x.reshape(entry.heads, -1, x.shape[1]).transpose(2, 0, 1)
    if entry.layout == "proj_bias":  # [H*K] -> [H, K]
        return x.reshape(entry.heads, -1)
    if entry.layout == "out":      # [D, H*K] -> [H, K, D]
        return x.reshape(x.shape[0], entry.heads, -1).transpose(1, 2, 0)
    return x


def to_hf(x: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.layout == "linear":
        return x.T
    if entry.layout == "proj":     # [D, H, K] -> [H*K, D]
        return x.transpose(1, 2, 0).reshape(-1, x.shape[0])
    if entry.layout == "proj_bias":
        return x.reshape(-1)
    if entry.layout == "out":      # [H, K, D] -> [D, H*K]
        return x.transpose(2, 0, 1).reshape(x.shape[2], -1)
    return x


def scanned_path(path: str) -> str:
    """layers/block{i}/x -> layers/blocks/x."""
    parts = path.split("/")
    return "/".join([parts[0], scan_layout.SCANNED, *parts[2:]])


class StateDictTensors:
    """A state dict (e.g. of pytorch_model.bin, which cannot be read per tensor) behind the
    `SafetensorsTensors` interface."""

    def __init__(self, state: Mapping[str, np.ndarray]):
        self.state = dict(state)

    def names(self) -> list[str]:
        return sorted(self.state)

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        return np.asarray(self.state[name], dtype)


def open_tensors(directory: str):
    try:
        return hf_io.SafetensorsTensors(directory)
    except FileNotFoundError:
        return StateDictTensors(hf_io.read_state_dict(directory))  # names what is missing


def _place(x: np.ndarray, sharding) -> jax.Array:
    """One converted tensor onto its device(s); waits, so the host copy can go."""
    return jax.device_put(x, sharding).block_until_ready()


def stream_params(tensors, model_config: Mapping[str, Any], shardings: Any = None,
                  where: str = "checkpoint") -> dict:
    """Reads, converts and places the tensors one parameter at a time -> nested params in the
    layout of `model_config` (scan_layers or not), each leaf in its sharding (a pytree of
    shardings matching the params, or one sharding for all; default: the first device)."""
    abstract = flatten(abstract_decoder_params(model_config))
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat_shardings = (flatten(shardings) if isinstance(shardings, Mapping)
                      else dict.fromkeys(abstract, shardings))
    names = set(tensors.names())
    entries = spelled_as_checkpoint(weight_entries(model_config), names)
    skip = {n for n in names if n.endswith(IGNORED_SUFFIXES)}
    if model_config.get("tie_embeddings"):
        skip.add("lm_head.weight")  # tied: HF ties it to the embedding whatever the file holds
    missing = [e.hf for e in entries if e.hf not in names]
    unused = sorted(names - {e.hf for e in entries} - skip)
    if missing or unused:
        raise ValueError(f"{where}: the weights do not match a {model_config['model_type']} "
                         f"model of this config.json: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; unused {unused[:10]}"
                         f"{' ...' if len(unused) > 10 else ''}")
    scanned = bool(model_config.get("scan_layers"))
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(scanned_path(e.path) if scanned and e.layer is not None else e.path,
                          []).append(e)
    if set(groups) != set(abstract):
        raise ValueError(f"{where}: the weight map does not cover the Decoder's params: "
                         f"{sorted(set(groups) ^ set(abstract))[:10]}")
    if set(flat_shardings) != set(abstract):
        raise ValueError(f"shardings do not match the params of {where}: "
                         f"{sorted(set(flat_shardings) ^ set(abstract))[:10]}")
    out = {}
    for path, group in groups.items():
        want = tuple(abstract[path].shape)
        stacked = scanned and group[0].layer is not None
        x = np.empty(want, np.float32) if stacked else None
        for i, e in enumerate(group):
            try:
                value = to_vlmjax(tensors.read(e.hf, np.float32), e)
            except ValueError as err:  # a reshape that does not fit
                raise ValueError(f"{where}: tensor {e.hf} does not fit {e.path}: {err}") from err
            if tuple(value.shape) != (want[1:] if stacked else want):
                raise ValueError(f"{where}: tensor {e.hf} converts to {tuple(value.shape)}, the "
                                 f"model's {e.path} is {want[1:] if stacked else want}")
            if stacked:
                x[i] = value
            else:
                x = np.ascontiguousarray(value)
            del value
        out[path] = _place(x, flat_shardings[path])
        del x
    return unflatten(out)


def load_hf_decoder(directory: str, shardings: Any = None, scan_layers: bool | None = None
                    ) -> tuple[dict, dict]:
    """HF LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM directory -> (params, model
    config). Float32 params are streamed into `shardings`; `scan_layers` (default: whether
    `shardings` is in the scanned layout) stacks the layers and is recorded in the model
    config."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config = decoder_config_from_hf(hf_io.read_json(config_path), config_path)
    if scan_layers is None:
        scan_layers = isinstance(shardings, Mapping) and scan_layout.is_scanned(shardings)
    if scan_layers:
        model_config["scan_layers"] = True
    params = stream_params(open_tensors(directory), model_config, shardings, directory)
    return params, model_config
