"""BERT initialisation of BLIP's text transformer from a Hugging Face BERT directory (how BLIP
starts: its text encoder and decoder are `bert-base-uncased`).

    params = bert_into_blip(directory, model_config, params)   # params: a Blip init to fill

`directory` holds a BERT config.json (model_type "bert") and weights, saved from `BertModel`
(tensor names `embeddings...`, `encoder.layer.N...`) or from `BertForMaskedLM` /
`BertForPreTraining` (`bert.` prefixed, plus the `cls.predictions` head). Every BLIP text
transformer (`text_shared`, or `text_encoder` and `text_decoder` with share="nothing") gets:
- word embeddings: BERT's rows; rows past BERT's vocabulary (BLIP's [DEC] and [ENC]) keep their
  random init, as `resize_token_embeddings` leaves them;
- position embeddings: BERT's first `max_len`; token_type_embeddings[0] (what BertModel adds to
  every token when no token types are given) is folded into them, so the unimodal encoder
  computes BertModel's function exactly (BLIP's med.py has no token types and drops it);
- each layer's self-attention, for every mode (BLIP initialises encoder and decoder from the
  same BERT), its MLP and LayerNorms; the cross-attention is not in BERT and keeps its init;
- the prediction head (transform, LayerNorm, bias) when the checkpoint has `cls.predictions`.
BERT's pooler and next-sentence head are not used. A BERT whose width, depth, heads, MLP size,
activation or LayerNorm eps differ from config.model.text is an error naming each field.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.convert import hf, hf_blip, hf_io
from vlmjax.convert.params import SEP, flatten, unflatten
from vlmjax.models.blip import PARTS

BERT_FIELDS = {"width": "hidden_size", "depth": "num_hidden_layers",
               "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size",
               "activation": "hidden_act", "norm_eps": "layer_norm_eps"}
BLIP_TEXT_DEFAULTS = dict(width=768, depth=12, num_heads=12, activation="gelu", norm_eps=1e-12)
TYPE_EMBEDDINGS = "embeddings.token_type_embeddings.weight"
HEAD_PREFIX = "cls.predictions."


def is_bert_source(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    return os.path.isdir(directory) and os.path.exists(path) and (
        hf_io.read_json(path).get("model_type") == "bert")


def _check_architecture(bert: Mapping[str, Any], text: Mapping[str, Any], where: str) -> None:
    ours = {**BLIP_TEXT_DEFAULTS, **dict(text)}
    ours["mlp_dim"] = ours.get("mlp_dim") or 4 * int(ours["width"])
    diffs = [f"text.{k}={ours[k]!r} vs {f}={bert.get(f)!r}" for k, f in BERT_FIELDS.items()
             if bert.get(f) != ours[k]]
    if bert.get("position_embedding_type", "absolute") != "absolute":
        diffs.append(f"position_embedding_type={bert['position_embedding_type']!r} (BLIP: "
                     "'absolute')")
    if diffs:
        raise ConfigError(f"{where}: this BERT does not fit config.model.text: "
                          + "; ".join(diffs))


def _bert_state(directory: str) -> dict[str, np.ndarray]:
    """BERT tensors by BertModel name (`bert.` stripped), plus the `cls.predictions` head."""
    state = {}
    for name, value in hf_io.read_state_dict(directory).items():
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "cls.seq_relationship.")) or name.endswith(
                "position_ids"):
            continue
        state[name] = np.asarray(value, np.float32)
    return state


def _entries(text: Mapping[str, Any], part: str, tower: str, parts, with_head: bool):
    """hf_blip's entries of `part`'s transformer, renamed to BERT's tensors: no
    cross-attention; the self-attention read into every mode's sublayer."""
    prefix = hf_blip.TEXT_PREFIX[part] + "."
    entries = []
    for e in hf_blip.text_entries(text, part, tower):
        if ".crossattention." in e.hf:
            continue
        e = dataclasses.replace(e, hf=e.hf.removeprefix(prefix))
        if f"/self_attention_{part}/" in e.vlmjax:
            entries += [dataclasses.replace(e, vlmjax=e.vlmjax.replace(
                f"self_attention_{part}", f"self_attention_{mode}")) for mode in parts]
        else:
            entries.append(e)
    if with_head:
        head = hf_blip.head_entries("decoder", tower, tied=True)
        entries += [dataclasses.replace(e, hf=e.hf.replace(hf_blip.HEAD + ".", HEAD_PREFIX))
                    for e in head]
    return entries


def bert_into_blip(directory: str, model_config: Mapping[str, Any],
                   params: Mapping[str, Any]) -> dict:
    """`params` (a Blip's, nested numpy or jax arrays) with every text transformer read from
    the BERT in `directory` (see the module docstring)."""
    if not is_bert_source(directory):
        raise ConfigError(f"{directory} is not a Hugging Face BERT directory (a config.json with "
                          "model_type 'bert' and its weights)")
    config_path = os.path.join(directory, "config.json")
    bert = hf_io.read_json(config_path)
    text = dict(model_config.get("text") or {})
    _check_architecture(bert, text, config_path)
    state = _bert_state(directory)
    parts = tuple(model_config.get("parts", PARTS))
    shared = model_config.get("share", "all_but_self_attention") == "all_but_self_attention"
    towers = ([("text_shared", parts)] if shared
              else [(f"text_{part}", (part,)) for part in parts])
    flat = flatten(params)
    for tower, modes in towers:
        with_head = "decoder" in modes and any(k.startswith(HEAD_PREFIX) for k in state)
        entries = _entries(text, modes[0], tower, modes, with_head)
        wanted = {e.hf for e in entries}
        read = hf.params_from_entries({k: v for k, v in state.items() if k in wanted}, entries,
                                      "BERT", directory)
        position = f"{tower}{SEP}pos_embedding"
        if TYPE_EMBEDDINGS in state:
            read[position] = read[position] + state[TYPE_EMBEDDINGS][0]
        for name, value in read.items():
            ours = np.asarray(flat[name])
            flat[name] = _fit(name, value, ours, directory)
    return unflatten(flat)


def _fit(name: str, bert: np.ndarray, ours: np.ndarray, where: str) -> np.ndarray:
    """BERT's tensor in our shape: vocabulary rows (and position rows) past BERT's keep ours;
    BERT's position rows past ours (BERT has 512) are dropped."""
    if bert.shape == ours.shape:
        return bert
    vocab_or_position = name.endswith(("token_embed/embedding", "pos_embedding", "lm_bias"))
    if not vocab_or_position or bert.shape[1:] != ours.shape[1:]:
        raise ConfigError(f"{where}: BERT tensor for {name} has shape {bert.shape}, "
                          f"config.model needs {ours.shape}")
    if name.endswith("pos_embedding"):
        if bert.shape[0] < ours.shape[0]:
            raise ConfigError(f"{where}: BERT has {bert.shape[0]} positions, config.model.text."
                              f"max_len is {ours.shape[0]}")
        return bert[:ours.shape[0]]
    if bert.shape[0] > ours.shape[0]:
        raise ConfigError(f"{where}: BERT's vocabulary ({bert.shape[0]}) is larger than "
                          f"config.model.text.vocab_size ({ours.shape[0]})")
    return np.concatenate([bert, ours[bert.shape[0]:]])
