"""Export a vlmjax BLIP-2 stage-2 `PrefixLM` (projector 'qformer') to a Hugging Face
`Blip2ForConditionalGeneration` directory.

    config = export_hf_blip2(model_or_model_config, params, out_dir, dtype="float32",
                             tokenizer_dir=None, max_shard_bytes=5 * 2**30)

writes config.json (`hf_config_from_blip2`, a transformers-5 Blip2Config) and model.safetensors
(or shards with model.safetensors.index.json), one tensor at a time, under the checkpoint names
convert.hf_blip2 reads: the vision q / k / v packed back into `qkv.weight` and `qkv.bias`
(transformers 5 holds the bias whole, k part included), ln_vision as
vision_model.post_layernorm, the Q-Former under qformer. and query_tokens,
language_projection, and the LLM under language_model. (biases HF has and the Decoder lacks are
zeros, as hf_decoder_export). `Blip2ForConditionalGeneration.from_pretrained(out_dir)` computes
the same logits. The vision tower has the blocks PrefixLM builds (up to vision_feature_layer,
whose hidden states HF's last_hidden_state then are); the Q-Former has no text input
(use_qformer_text_input false). The tokenizer, generation and processor files of
`tokenizer_dir` come along.

The model is a PrefixLM instance or its model config (convert.hf_blip2: the PrefixLM arguments,
INFO_KEYS optional). What HF's BLIP-2 cannot compute (another projector or vision tower, a
vision feature layer list, the class token dropped, a bidirectional prefix, an activation HF
lacks) is refused naming what differs.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from vlmjax.convert.hf_blip2 import ARCHITECTURE, LLM_PREFIX, MODEL_TYPE, tower_entries
from vlmjax.convert.hf_blip_export import VISION_REQUIREMENTS, _image_side
from vlmjax.convert.hf_decoder_config import hf_config_from_decoder
from vlmjax.convert.hf_export import HF_ACTIVATIONS
from vlmjax.convert.hf_llava import built_blocks, decoder_config
# LLaVA's LLM half is written exactly as BLIP-2's: the Decoder's tensors under HF's names.
from vlmjax.convert.hf_llava_export import _llm_tensors, export_inputs, write_hf_directory
from vlmjax.convert.params import flatten
from vlmjax.models import scan_layout
from vlmjax.models.prefix_lm import PrefixLM
from vlmjax.models.qformer import QFormer
from vlmjax.models.two_towers import with_defaults
from vlmjax.models.vit import ViT

# What HF's Blip2ForConditionalGeneration computes, as PrefixLM options.
PREFIX_LM_REQUIREMENTS = {"vision_arch": "vit", "projector": "qformer",
                          "projector_norm": "layernorm", "projector_posemb": False,
                          "vision_feature_select_strategy": "full", "prefix_attention": "causal"}
_SPLIT_QKV = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def check_expressible(model_config: Mapping[str, Any]) -> None:
    """Raises naming every option HF's BLIP-2 cannot compute."""
    full = with_defaults(PrefixLM, model_config)
    wrong = [f"{k}={full.get(k)!r} (HF: {v!r})" for k, v in PREFIX_LM_REQUIREMENTS.items()
             if full.get(k) != v]
    if not isinstance(full.get("vision_feature_layer"), (int, np.integer)):
        wrong.append(f"vision_feature_layer={full.get('vision_feature_layer')!r} (HF: one "
                     "layer, an int)")
    if full.get("vision_arch") == "vit" and full.get("vision") is not None:
        vision = with_defaults(ViT, full["vision"])
        wrong += [f"vision.{k}={vision[k]!r} (HF: {' or '.join(map(repr, v))})"
                  for k, v in VISION_REQUIREMENTS.items() if vision[k] not in v]
        if vision["class_token"] is not True:
            wrong.append(f"vision.class_token={vision['class_token']!r} (HF: True)")
        if vision["activation"] not in HF_ACTIVATIONS:
            wrong.append(f"vision.activation={vision['activation']!r} (HF: "
                         f"{sorted(HF_ACTIVATIONS)})")
    if full.get("qformer") is not None:
        activation = with_defaults(QFormer, full["qformer"])["activation"]
        if activation not in HF_ACTIVATIONS:
            wrong.append(f"qformer.activation={activation!r} (HF: {sorted(HF_ACTIVATIONS)})")
    if wrong:
        raise ValueError("this model cannot be exported as an HF BLIP-2 model: HF's "
                         "Blip2ForConditionalGeneration computes otherwise: " + ", ".join(wrong))


def hf_config_from_blip2(model_config: Mapping[str, Any], vision_params: Mapping[str, Any],
                         dtype: str = "float32") -> dict:
    """The config.json dict of the HF BLIP-2 model of `model_config` (PrefixLM arguments,
    INFO_KEYS optional); `vision_params` give the image size."""
    check_expressible(model_config)
    vision = with_defaults(ViT, model_config["vision"])
    qformer = with_defaults(QFormer, model_config["qformer"])
    text = {k: v for k, v in hf_config_from_decoder(decoder_config(model_config), dtype).items()
            if k not in ("architectures", "dtype")}
    side = _image_side(np.shape(vision_params["posemb"]["pos_embedding"]), vision["patch_size"])
    vision_config = dict(
        model_type="blip_2_vision_model", hidden_size=int(vision["width"]),
        intermediate_size=int(vision["mlp_dim"] or 4 * vision["width"]),
        num_hidden_layers=built_blocks(model_config),
        num_attention_heads=int(vision["num_heads"]), image_size=side,
        patch_size=int(vision["patch_size"]), hidden_act=HF_ACTIVATIONS[vision["activation"]],
        layer_norm_eps=float(vision["norm_eps"]), qkv_bias=True)
    qformer_config = dict(
        model_type="blip_2_qformer", vocab_size=int(qformer["vocab_size"]),
        hidden_size=int(qformer["width"]), num_hidden_layers=int(qformer["depth"]),
        num_attention_heads=int(qformer["num_heads"]),
        intermediate_size=int(qformer["mlp_dim"]),
        hidden_act=HF_ACTIVATIONS[qformer["activation"]],
        max_position_embeddings=int(qformer["max_len"]),
        layer_norm_eps=float(qformer["norm_eps"]),
        cross_attention_frequency=int(qformer["cross_attention_freq"]),
        encoder_hidden_size=int(vision["width"]), use_qformer_text_input=False)
    return dict(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, dtype=dtype,
                vision_config=vision_config, qformer_config=qformer_config, text_config=text,
                num_query_tokens=int(qformer["num_query_tokens"]),
                image_token_index=int(model_config["image_token_id"]),
                use_decoder_only_language_model=True)


def _tower_tensors(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> list:
    """[(HF name, HF shape, produce())] of the vision tower, ln_vision, the Q-Former and the
    language projection, the vision q / k / v packed into qkv."""
    flat = flatten({"vision": scan_layout.to_unrolled(dict(params["vision"])),
                    "projector": dict(params["projector"])})
    bias = "projector/language_projection/bias"
    if not model_config.get("projector_bias", True) and bias not in flat:  # HF always has one
        width = np.shape(flat["projector/language_projection/kernel"])[1]
        flat[bias] = np.zeros(width, np.float32)
    entries = tower_entries(model_config)
    missing = sorted({e.vlmjax for e in entries} - set(flat))
    unused = sorted(set(flat) - {e.vlmjax for e in entries})
    if missing or unused:
        raise ValueError(f"vision / projector params do not match the model config: missing "
                         f"{missing[:10]}, unused {unused[:10]}")

    def produce(e):
        return lambda: e.layout.to_hf(np.asarray(flat[e.vlmjax], np.float32), e.heads)

    by_name = {e.hf: e for e in entries}
    out = []
    for e in entries:
        match = _SPLIT_QKV.match(e.hf)
        if match is None:
            if not re.search(r"\.self_attn\.[kv]_proj\.", e.hf):  # packed with q_proj below
                value = produce(e)
                out.append((e.hf, np.shape(value()), value))
            continue
        prefix, suffix = match.groups()
        parts = [produce(by_name[f"{prefix}{p}.{suffix}"]) for p in _QKV]
        shape = np.shape(parts[0]())
        out.append((f"{prefix}qkv.{suffix}", (3 * shape[0], *shape[1:]),
                    lambda parts=parts: np.concatenate([p() for p in parts], axis=0)))
    return out


def export_hf_blip2(model, params: Mapping[str, Any], out_dir: str, dtype: str = "float32",
                    tokenizer_dir: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Writes the HF BLIP-2 directory of a PrefixLM (an instance or its model config) and its
    params (see the module docstring); returns the config.json dict."""
    model_config, params = export_inputs(model, params, dtype)
    config = hf_config_from_blip2(model_config, params["vision"], dtype)
    tensors = _tower_tensors(params, model_config) + [
        (LLM_PREFIX + name, shape, make)
        for name, shape, make in _llm_tensors(params["llm"], decoder_config(model_config))]
    write_hf_directory(out_dir, config, tensors, dtype, max_shard_bytes, tokenizer_dir)
    return config
