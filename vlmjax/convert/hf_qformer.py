"""Hugging Face BLIP-2 Q-Former -> vlmjax `QFormer` (import only).

    model, params, model_config = load_hf_qformer(directory, rng=None, shardings=None)
    model_config = qformer_config_from_hf(config_json_dict)
    entries = weight_entries(model_config, qformer="qformer", query_tokens="query_tokens",
                             embeddings="embeddings")   # names in a whole Blip2 checkpoint

The model config is the QFormer arguments plus INFO_KEYS: model_type, architecture and
encoder_width (the image features' width, HF encoder_hidden_size). A config.json may be a
Blip2QFormerConfig or a Blip2Config (its qformer_config and num_query_tokens are read).

HF's Blip2QFormerModel holds the layers and the embedding LayerNorm only: a Blip2 model owns
the query tokens and (Blip2ForImageTextRetrieval) the text embeddings. `weight_entries` names
each group's HF prefix, None for a group the checkpoint lacks; `load_hf_qformer` reads a
Blip2QFormerModel directory and draws the groups it lacks from QFormer.init's distribution
(model_config "not_in_checkpoint" names them). A Blip2QFormerConfig has no num_query_tokens:
it is then Blip2Config's default, 32.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.convert import hf, hf_io, hf_names
from vlmjax.convert.hf_names import OUT_KERNEL, QKV_BIAS, QKV_KERNEL, SAME, Entry
from vlmjax.convert.params import flatten, to_device, unflatten
from vlmjax.models.qformer import EMBED_INIT_STD, EMBEDDING_PARAMS, QFormer

ARCHITECTURE = "Blip2QFormerModel"
INFO_KEYS = ("model_type", "architecture", "encoder_width", "not_in_checkpoint")
# transformers' Blip2QFormerConfig defaults, for config.json files that leave values out.
DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=1408,
                use_qformer_text_input=False)
NUM_QUERY_TOKENS = 32  # Blip2Config's default


def qformer_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """config.json dict (Blip2QFormerConfig, or a Blip2Config) -> model config."""
    num_queries = int(hf_config.get("num_query_tokens", NUM_QUERY_TOKENS))
    if "qformer_config" in hf_config:
        hf_config, where = hf_config["qformer_config"] or {}, f"{where} qformer_config"
    cfg = {**DEFAULTS, **dict(hf_config)}
    if cfg.get("model_type", "blip_2_qformer") != "blip_2_qformer":
        raise ValueError(f"{where}: model_type {cfg['model_type']!r} is not 'blip_2_qformer'")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{where}: hidden_size {cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    kind = cfg.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"{where}: position_embedding_type {kind!r} is not supported; "
                         "supported: ['absolute']")
    return dict(num_query_tokens=num_queries, width=cfg["hidden_size"],
                depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                mlp_dim=cfg["intermediate_size"],
                cross_attention_freq=cfg["cross_attention_frequency"],
                text_input=bool(cfg["use_qformer_text_input"]), vocab_size=cfg["vocab_size"],
                max_len=cfg["max_position_embeddings"],
                activation=hf._activation(cfg["hidden_act"], where),
                norm_eps=float(cfg["layer_norm_eps"]), model_type="blip_2_qformer",
                architecture=ARCHITECTURE, encoder_width=int(cfg["encoder_hidden_size"]))


def build_qformer(model_config: Mapping[str, Any], dtype=jnp.float32) -> QFormer:
    kwargs = {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}
    try:
        return QFormer(**kwargs, dtype=dtype)
    except TypeError as e:  # an unknown key in a hand-edited config
        raise ValueError(f"model config is not a set of QFormer arguments: {e}") from e


def _attention(hf_prefix: str, ours: str, heads: int) -> list[Entry]:
    """HF Blip2QFormerAttention (attention.{query,key,value}, output.{dense, LayerNorm}) ->
    blip.BertAttention."""
    entries = []
    for name in ("query", "key", "value"):
        entries += [Entry(f"{hf_prefix}.attention.{name}.weight", f"{ours}/{name}/kernel",
                          QKV_KERNEL, heads),
                    Entry(f"{hf_prefix}.attention.{name}.bias", f"{ours}/{name}/bias", QKV_BIAS,
                          heads)]
    return entries + [Entry(f"{hf_prefix}.output.dense.weight", f"{ours}/out/kernel", OUT_KERNEL,
                            heads),
                      Entry(f"{hf_prefix}.output.dense.bias", f"{ours}/out/bias", SAME)
                      ] + hf_names._norm(f"{hf_prefix}.output.LayerNorm", f"{ours}/norm")


def _ffn(hf_prefix: str, hf_suffix: str, ours: str) -> list[Entry]:
    """HF intermediate{suffix}.dense / output{suffix}.{dense, LayerNorm} -> PostNormMLP."""
    return (hf_names._linear(f"{hf_prefix}.intermediate{hf_suffix}.dense", f"{ours}/mlp/fc1")
            + hf_names._linear(f"{hf_prefix}.output{hf_suffix}.dense", f"{ours}/mlp/fc2")
            + hf_names._norm(f"{hf_prefix}.output{hf_suffix}.LayerNorm", f"{ours}/norm"))


def weight_entries(model_config: Mapping[str, Any], qformer: str = "",
                   query_tokens: str | None = None,
                   embeddings: str | None = None) -> list[Entry]:
    """Every Q-Former tensor -> QFormer param. `qformer` is the HF prefix of the
    Blip2QFormerModel ("" for one saved alone, "qformer" in a Blip2 model); `query_tokens` the
    name of the query parameter and `embeddings` the prefix of Blip2TextEmbeddings, or None
    where the checkpoint has none."""
    p = f"{qformer}." if qformer else ""
    heads = int(model_config["num_heads"])
    entries = hf_names._norm(f"{p}layernorm", "embed_norm")
    if query_tokens is not None:
        entries.append(Entry(query_tokens, "query_tokens", SAME))
    if embeddings is not None and model_config["text_input"]:
        entries += [Entry(f"{embeddings}.word_embeddings.weight", "token_embed/embedding", SAME),
                    Entry(f"{embeddings}.position_embeddings.weight", "pos_embedding", SAME)]
    for i in range(int(model_config["depth"])):
        h, o = f"{p}encoder.layer.{i}", f"layer_{i}"
        entries += _attention(f"{h}.attention", f"{o}/self_attention", heads)
        if i % int(model_config["cross_attention_freq"]) == 0:
            entries += _attention(f"{h}.crossattention", f"{o}/cross_attention", heads)
        entries += _ffn(h, "_query", f"{o}/query_ffn")
        if model_config["text_input"]:
            entries += _ffn(h, "", f"{o}/text_ffn")
    return entries


def abstract_params(model_config: Mapping[str, Any]) -> dict:
    """Flat {path: ShapeDtypeStruct} of the QFormer params (text ones when it has text input)."""
    model = build_qformer(model_config)
    images = jnp.zeros((1, 1, int(model_config["encoder_width"])), jnp.float32)
    tokens = jnp.zeros((1, 1), jnp.int32) if model_config["text_input"] else None
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
    return flatten(nn.meta.unbox(shapes)["params"])


def load_hf_qformer(directory: str, rng=None, shardings: Any = None,
                    dtype=jnp.float32) -> tuple[QFormer, dict, dict]:
    """HF Blip2QFormerModel directory -> (QFormer with compute `dtype`, float32 params placed
    by `shardings`, model config). The query tokens and text embeddings, which the checkpoint
    does not hold, are drawn from N(0, EMBED_INIT_STD) with `rng` (default PRNGKey(0)), as
    QFormer.init draws them."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config = qformer_config_from_hf(hf_io.read_json(config_path), config_path)
    state = {k: np.asarray(v, np.float32) for k, v in hf_io.read_state_dict(directory).items()}
    flat = hf.params_from_entries(state, weight_entries(model_config), ARCHITECTURE, directory)
    want = abstract_params(model_config)
    problems = [f"{k}: {v.shape} where the model of its config.json has "
                f"{want[k].shape if k in want else 'no such param'}"
                for k, v in flat.items() if k not in want or v.shape != want[k].shape]
    if problems:
        raise ValueError(f"{directory}: the converted params do not fit:\n  "
                         + "\n  ".join(problems))
    missing = sorted(set(want) - set(flat))
    assert set(missing) <= set(EMBEDDING_PARAMS), missing  # the table covers the rest
    rng = jax.random.PRNGKey(0) if rng is None else rng
    for i, key in enumerate(missing):
        flat[key] = np.asarray(EMBED_INIT_STD * jax.random.normal(
            jax.random.fold_in(rng, i), want[key].shape, jnp.float32))
    model_config["not_in_checkpoint"] = missing
    return build_qformer(model_config, dtype), to_device(unflatten(flat), shardings), model_config
