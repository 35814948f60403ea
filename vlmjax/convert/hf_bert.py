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

    params = bert_into_qformer(directory, qformer_config, params)   # a Blip2Stage1 init

fills BLIP-2's Q-Former (`qformer_config`: config.model.qformer) as LAVIS's init_Qformer does
(BertLMHeadModel.from_pretrained("bert-base-uncased"), then every `*_query` tensor copied from
its BERT namesake): the word embeddings, positions (token type folded in) and embedding
LayerNorm as above; each layer's self-attention, and BERT's FFN into both the text FFN and the
query FFN; the cross-attention and the query tokens keep their init; the ITG head (Blip2Stage1's
top-level head_transform, head_norm, lm_bias) from `cls.predictions` when both have one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.convert import hf, hf_blip, hf_io, hf_names, hf_qformer
from vlmjax.convert.hf_names import SAME, Entry
from vlmjax.convert.params import SEP, flatten, unflatten
from vlmjax.models.blip import PARTS
from vlmjax.models.qformer import QFormer

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


def _check_architecture(bert: Mapping[str, Any], text: Mapping[str, Any], where: str,
                        section: str = "text") -> None:
    """Raises naming each BERT_FIELDS value of `bert` that differs from config.model.<section>
    (`text`: BLIP's text kwargs, defaults filled here; any other section: given in full)."""
    ours = dict(text)
    if section == "text":
        ours = {**BLIP_TEXT_DEFAULTS, **ours}
        ours["mlp_dim"] = ours.get("mlp_dim") or 4 * int(ours["width"])
    diffs = [f"{section}.{k}={ours[k]!r} vs {f}={bert.get(f)!r}" for k, f in BERT_FIELDS.items()
             if bert.get(f) != ours[k]]
    if bert.get("position_embedding_type", "absolute") != "absolute":
        diffs.append(f"position_embedding_type={bert['position_embedding_type']!r} (supported: "
                     "'absolute')")
    if diffs:
        raise ConfigError(f"{where}: this BERT does not fit config.model.{section}: "
                          + "; ".join(diffs))


def _read_bert(directory: str, ours: Mapping[str, Any], section: str):
    """(config.json path, BERT tensors) of the BERT in `directory`, checked against `ours`."""
    if not is_bert_source(directory):
        raise ConfigError(f"{directory} is not a Hugging Face BERT directory (a config.json with "
                          "model_type 'bert' and its weights)")
    config_path = os.path.join(directory, "config.json")
    _check_architecture(hf_io.read_json(config_path), ours, config_path, section)
    return config_path, _bert_state(directory)


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
    text = dict(model_config.get("text") or {})
    _, state = _read_bert(directory, text, "text")
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


def _fit(name: str, bert: np.ndarray, ours: np.ndarray, where: str,
         section: str = "text") -> np.ndarray:
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
            raise ConfigError(f"{where}: BERT has {bert.shape[0]} positions, config.model."
                              f"{section}.max_len is {ours.shape[0]}")
        return bert[:ours.shape[0]]
    if bert.shape[0] > ours.shape[0]:
        raise ConfigError(f"{where}: BERT's vocabulary ({bert.shape[0]}) is larger than "
                          f"config.model.{section}.vocab_size ({ours.shape[0]})")
    return np.concatenate([bert, ours[bert.shape[0]:]])


# hf_qformer's names (HF Blip2QFormerModel) -> BERT's. The `_query` FFN reads BERT's FFN: LAVIS
# copies every `*_query` tensor from the tensor named without `_query`.
QFORMER_TO_BERT = ((".attention.attention.", ".attention.self."),
                   (".intermediate_query.", ".intermediate."), (".output_query.", ".output."))
QFORMER_ARCH = ("width", "depth", "num_heads", "mlp_dim", "activation", "norm_eps",
                "cross_attention_freq", "text_input")
# Blip2Stage1's ITG head: BERT's prediction head, its output tied to the word embeddings.
QFORMER_HEAD = (hf_names._linear(f"{HEAD_PREFIX}transform.dense", "head_transform")
                + hf_names._norm(f"{HEAD_PREFIX}transform.LayerNorm", "head_norm")
                + [Entry(f"{HEAD_PREFIX}bias", "lm_bias", SAME)])


def _qformer_entries(arch: Mapping[str, Any], prefix: str) -> list[Entry]:
    """hf_qformer's table renamed to BERT's tensors: no cross-attention or query tokens (not in
    BERT), the embedding LayerNorm is BERT's embeddings.LayerNorm, params under `prefix`."""
    entries = []
    for e in hf_qformer.weight_entries(arch, embeddings="embeddings"):
        if ".crossattention." in e.hf:
            continue
        name = e.hf
        if name.startswith("layernorm."):  # Blip2QFormerModel's embedding LayerNorm
            name = "embeddings.LayerNorm." + name.removeprefix("layernorm.")
        for theirs, bert in QFORMER_TO_BERT:
            name = name.replace(theirs, bert)
        entries.append(dataclasses.replace(e, hf=name, vlmjax=prefix + e.vlmjax))
    return entries


def bert_into_qformer(directory: str, qformer_config: Mapping[str, Any],
                      params: Mapping[str, Any], prefix: str = "projector/qformer") -> dict:
    """`params` (nested numpy or jax arrays: a Blip2Stage1's, or any tree holding a QFormer at
    `prefix`, "" for a QFormer's own) with the Q-Former read from the BERT in `directory` as
    BLIP-2 starts it (module docstring); `qformer_config` is the QFormer kwargs
    (config.model.qformer). The ITG head is read when the checkpoint has `cls.predictions`
    and `params` have a top-level `head_transform` (Blip2Stage1's), else kept."""
    arch = {k: dict(qformer_config).get(k, getattr(QFormer, k)) for k in QFORMER_ARCH}
    config_path, state = _read_bert(directory, arch, "qformer")
    prefix = f"{prefix.strip(SEP)}{SEP}" if prefix.strip(SEP) else ""
    entries = _qformer_entries(arch, prefix)
    flat = flatten(params)
    if any(k.startswith(HEAD_PREFIX) for k in state) and f"head_transform{SEP}kernel" in flat:
        entries += QFORMER_HEAD
    absent = [e.vlmjax for e in entries if e.vlmjax not in flat]
    if absent:
        raise ConfigError(f"params have no {absent[:3]}: is the Q-Former at prefix "
                          f"{prefix.rstrip(SEP)!r}, and is config.model.qformer its config?")
    wanted = {e.hf for e in entries}
    read = hf.params_from_entries({k: v for k, v in state.items() if k in wanted}, entries,
                                  "BERT", directory)
    position = f"{prefix}pos_embedding"
    if TYPE_EMBEDDINGS in state and position in read:  # no text input: no positions
        read[position] = read[position] + state[TYPE_EMBEDDINGS][0]
    for name, value in read.items():
        flat[name] = _fit(name, value, np.asarray(flat[name]), config_path, "qformer")
    return unflatten(flat)
