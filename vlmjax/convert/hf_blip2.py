"""Hugging Face `Blip2ForConditionalGeneration` -> vlmjax `PrefixLM` with the Q-Former projector
(BLIP-2 stage 2; import; the export back is convert.hf_blip2_export).

    model, params, model_config = load_hf_blip2(directory, shardings=None, dtype=jnp.float32)
    model_config = blip2_config_from_hf(config_json_dict)   # the config alone
    model = build_blip2(model_config, dtype)

The model config is the PrefixLM arguments (`prefix_lm_kwargs` drops the rest) plus INFO_KEYS:
model_type "blip-2", text_model_type (opt / llama / qwen2), image_size [H, W], image_mean /
image_std (preprocessor_config.json's, else BLIP-2's processor defaults, CLIP's: images are
float32 NHWC, pixel / 255 then (x - mean) / std), and the LLM's bos_id / eos_id / pad_id /
max_position_embeddings.

config.json (a Blip2Config):
  vision_config -> `vision`: BLIP's ViT (convert.hf_blip.vision_from_hf, with Blip2VisionConfig's
    defaults: a class token, learned positions, a patch bias, no pre-norm), read after its last
    block (vision_feature_layer -1, class token kept: 'full'); its post_layernorm is the
    projector's ln_vision (projector_norm 'layernorm', eps the vision layer_norm_eps);
  qformer_config + num_query_tokens -> `qformer` (convert.hf_qformer); with
    use_qformer_text_input the layers also hold text FFNs, which generation (queries only)
    never runs: they are skipped;
  text_config -> `llm` (convert.hf_decoder_config): OPT (Blip2Config's default), Llama or Qwen2.
    T5 / Flan-T5 (encoder-decoder) is refused: PrefixLM is decoder-only;
  image_token_index -> image_token_id (required: the tokens hold num_query_tokens of them per
    image, as transformers' Blip2Processor writes them; older configs without it prepended the
    queries instead, which PrefixLM does not do).
Other values PrefixLM cannot express: a ValueError naming the field and what is valid.

Weights (safetensors read and placed tensor by tensor, as convert.hf_llava): vision_model.X ->
vision/ (BLIP's table; the fused attention `qkv.weight` [3D, D] and `qkv.bias` [3D] are split
into q / k / v; qkv_bias false: zero biases), vision_model.post_layernorm ->
projector/ln_vision, query_tokens and qformer.X -> projector/qformer/, language_projection ->
projector/language_projection, language_model.{model.X, lm_head} -> llm/ (convert.hf_decoder).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from vlmjax.convert import hf, hf_blip, hf_io, hf_names, hf_qformer
from vlmjax.convert.hf_decoder import open_tensors
from vlmjax.convert.hf_decoder_config import (ARCHITECTURES as DECODERS,
                                              decoder_config_from_hf, decoder_kwargs)
from vlmjax.convert.hf_llava import (abstract_prefix_lm_params, built_blocks, decoder_config,
                                     stream_prefix_lm_params)
from vlmjax.convert.params import flatten
from vlmjax.models.prefix_lm import PrefixLM

ARCHITECTURE = "Blip2ForConditionalGeneration"
MODEL_TYPE = "blip-2"
INFO_KEYS = ("model_type", "text_model_type", "image_size", "image_mean", "image_std",
             "bos_id", "eos_id", "pad_id", "max_position_embeddings")
VISION_MODEL_TYPE = "blip_2_vision_model"
# transformers' Blip2VisionConfig defaults, for config.json files that leave values out.
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu",
                       layer_norm_eps=1e-6, qkv_bias=True)
DEFAULT_TEXT_MODEL = "opt"  # Blip2Config's
QFORMER_KEYS = ("num_query_tokens", "width", "depth", "num_heads", "mlp_dim",
                "cross_attention_freq", "vocab_size", "max_len", "activation", "norm_eps")
LLM_PREFIX = "language_model."
_VISION_ATTENTION = re.compile(
    r"^(vision_model\.encoder\.layers\.\d+\.self_attn\.)qkv\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------- config
def vision_from_hf(vision_config: Mapping[str, Any] | None, where: str) -> tuple[dict, list]:
    """(ViT kwargs reading every token of the last block, image size [H, W]) of a BLIP-2
    vision_config."""
    vision = {**VISION_DEFAULTS, **dict(vision_config or {})}
    kind = vision.get("model_type", VISION_MODEL_TYPE)
    if kind != VISION_MODEL_TYPE:
        raise ValueError(f"{where}: vision_config.model_type {kind!r} is not supported; "
                         f"supported: [{VISION_MODEL_TYPE!r}]")
    image, size = hf_blip.vision_from_hf(vision, where)  # BLIP-2's tower is BLIP's ViT
    return {**image, "pool": "none", "class_token": True}, size


def blip2_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """config.json dict -> model config (PrefixLM arguments + INFO_KEYS; image_mean / image_std
    are BLIP-2's processor defaults here: load_hf_blip2 reads preprocessor_config.json)."""
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not "
                         f"{MODEL_TYPE!r}")
    archs = hf_config.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise ValueError(f"{where}: architectures {archs} are not supported; expected "
                         f"[{ARCHITECTURE!r}] (the captioning / VQA model with a language model)")
    text = dict(hf_config.get("text_config") or {})
    text.setdefault("model_type", DEFAULT_TEXT_MODEL)
    if text["model_type"] not in DECODERS:
        raise ValueError(f"{where}: text_config.model_type {text['model_type']!r} is not "
                         f"supported; supported: {sorted(DECODERS)} (decoder-only LMs: PrefixLM "
                         "has no encoder-decoder LM such as BLIP-2's T5 / Flan-T5)")
    decoder = decoder_config_from_hf(text, f"{where} text_config")
    vision, image_size = vision_from_hf(hf_config.get("vision_config"), where)
    qformer = hf_qformer.qformer_config_from_hf(hf_config, where)
    image_token = hf_config.get("image_token_index", hf_config.get("image_token_id"))
    if image_token is None:
        raise ValueError(f"{where}: image_token_index is not set; vlmjax reads BLIP-2 prompts "
                         "with num_query_tokens image tokens per image (transformers' current "
                         "Blip2Processor): set it to the id of the tokenizer's image token")
    if (not isinstance(image_token, int) or isinstance(image_token, bool)
            or not 0 <= image_token < decoder["vocab_size"]):
        raise ValueError(f"{where}: image_token_index {image_token!r} must be a token id in "
                         f"[0, {decoder['vocab_size']}) (text_config.vocab_size)")
    mean, std = hf.IMAGE_NORMALISATION["clip"]
    return dict(
        vision=vision, vision_arch="vit", vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector="qformer", projector_norm="layernorm",
        projector_bias=True, qformer={k: qformer[k] for k in QFORMER_KEYS},
        llm=decoder_kwargs(decoder), image_token_id=int(image_token), prefix_attention="causal",
        model_type=MODEL_TYPE, text_model_type=decoder["model_type"],
        image_size=list(image_size), image_mean=list(mean), image_std=list(std),
        **{k: decoder[k] for k in ("bos_id", "eos_id", "pad_id", "max_position_embeddings")})


def prefix_lm_kwargs(model_config: Mapping[str, Any]) -> dict:
    """The PrefixLM arguments of a model config (INFO_KEYS and a trainer's `dtype` dropped)."""
    return {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}


def build_blip2(model_config: Mapping[str, Any], dtype=jnp.float32) -> PrefixLM:
    try:
        return PrefixLM(**prefix_lm_kwargs(model_config), dtype=dtype)
    except TypeError as e:  # an unknown key in a hand-edited config
        raise ValueError(f"model config is not a set of PrefixLM arguments: {e}") from e


def abstract_blip2_params(model_config: Mapping[str, Any]) -> dict:
    """Nested ShapeDtypeStructs of the (unboxed) params for images of model_config's size."""
    return abstract_prefix_lm_params(build_blip2(model_config), model_config["image_size"])


# ---------------------------------------------------------------------------------- weights
def tower_entries(model_config: Mapping[str, Any]) -> list[hf_names.Entry]:
    """The vision, Q-Former and projection tensors (HF names, vision q/k/v split) -> paths under
    vision/ and projector/. The vision blocks are those PrefixLM builds."""
    vision = {**dict(model_config["vision"]), "depth": built_blocks(model_config)}
    entries = []
    for e in hf_blip.vision_entries(vision):
        if e.hf.startswith("vision_model.post_layernorm."):  # BLIP-2's ln_vision
            e = dataclasses.replace(e, vlmjax=e.vlmjax.replace("vision/final_norm",
                                                               "projector/ln_vision"))
        entries.append(e)
    qformer = {**dict(model_config["qformer"]), "text_input": False}
    entries += [dataclasses.replace(e, vlmjax="projector/qformer/" + e.vlmjax)
                for e in hf_qformer.weight_entries(qformer, "qformer", "query_tokens")]
    return entries + hf_names._linear("language_projection", "projector/language_projection")


def qformer_text_ffn_names(model_config: Mapping[str, Any]) -> set[str]:
    """The text FFN tensors of a Q-Former with use_qformer_text_input (unused by generation)."""
    qformer = dict(model_config["qformer"])
    with_text = hf_qformer.weight_entries({**qformer, "text_input": True}, "qformer")
    without = hf_qformer.weight_entries({**qformer, "text_input": False}, "qformer")
    return {e.hf for e in with_text} - {e.hf for e in without}


class SplitQKVTensors:
    """A checkpoint's tensors with each vision attention's fused `qkv.weight` [3D, D] and
    `qkv.bias` [3D] presented as the q_proj / k_proj / v_proj names of BLIP's table (behind the
    `hf_io.SafetensorsTensors` interface). transformers holds the bias whole (LAVIS's q_bias and
    v_bias with a zero k part when converted; a trained k part is kept as it is); a tower with
    qkv_bias false has none: zeros (`zero_bias`)."""

    def __init__(self, tensors, width: int, zero_bias: bool):
        self.readers, names = {}, set(tensors.names())
        for name in sorted(names):
            match = _VISION_ATTENTION.match(name)
            if match is None:
                self.readers[name] = lambda dtype, name=name: tensors.read(name, dtype)
                continue
            prefix, suffix = match.groups()
            self._split(prefix, suffix, lambda dtype, name=name: tensors.read(name, dtype))
            if suffix == "weight" and zero_bias and prefix + "qkv.bias" not in names:
                self._split(prefix, "bias",
                            lambda dtype: np.zeros(3 * width, dtype or np.float32))

    def _split(self, prefix: str, suffix: str, read_fused) -> None:
        # Each part reads the fused tensor again: nothing is cached between the reads.
        for i, proj in enumerate(_QKV):
            self.readers[f"{prefix}{proj}.{suffix}"] = (
                lambda dtype, i=i: np.split(read_fused(dtype), 3, axis=0)[i])

    def names(self) -> list[str]:
        return sorted(self.readers)

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        return self.readers[name](dtype)


def _split_names(tensors, model_config: Mapping[str, Any], skipped: set[str],
                 where: str) -> dict[str, str]:
    """The LLM's {name in LlamaForCausalLM / OPTForCausalLM: checkpoint name}; raises on tower
    tensors that are missing and on tensors the model does not have."""
    llm, towers, unused = {}, set(), []
    wanted = {e.hf for e in tower_entries(model_config)}
    for name in tensors.names():
        if name.startswith(LLM_PREFIX):
            llm[name[len(LLM_PREFIX):]] = name
        elif name in wanted:
            towers.add(name)
        elif name not in skipped and not name.endswith(hf.IGNORED_BUFFERS):
            unused.append(name)
    missing = sorted(wanted - towers)
    if missing or unused:
        raise ValueError(f"{where}: the weights do not match a BLIP-2 model of this config.json: "
                         f"missing {missing[:10]}; unused {sorted(unused)[:10]}")
    return llm


def _check_coverage(model_config: Mapping[str, Any], abstract: Mapping, where: str) -> None:
    """The weight table must name every vision / projector param of the model."""
    tables = {e.vlmjax for e in tower_entries(model_config)}
    towers = {k for k in abstract if not k.startswith("llm/")}
    if tables != towers:
        raise ValueError(f"{where}: the BLIP-2 weight map does not cover the model's vision / "
                         f"projector params: {sorted(tables ^ towers)[:10]}")


def load_hf_blip2(directory: str, shardings: Any = None,
                  dtype=jnp.float32) -> tuple[PrefixLM, dict, dict]:
    """HF Blip2ForConditionalGeneration directory -> (PrefixLM with compute `dtype`, float32
    params, model config). `shardings`: one sharding, or a pytree matching the params
    ({"vision", "projector", "llm"})."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    hf_config = hf_io.read_json(config_path)
    model_config = blip2_config_from_hf(hf_config, config_path)
    mean, std = hf.image_normalisation(directory, "clip")
    model_config.update(image_mean=mean, image_std=std)
    vision = {**VISION_DEFAULTS, **dict(hf_config.get("vision_config") or {})}
    tensors = SplitQKVTensors(open_tensors(directory), int(model_config["vision"]["width"]),
                              zero_bias=not vision["qkv_bias"])
    text_input = hf_qformer.qformer_config_from_hf(hf_config, config_path)["text_input"]
    skipped = qformer_text_ffn_names(model_config) if text_input else set()
    llm_names = _split_names(tensors, model_config, skipped, directory)
    abstract = flatten(abstract_blip2_params(model_config))
    _check_coverage(model_config, abstract, directory)
    params = stream_prefix_lm_params(tensors, tower_entries(model_config), llm_names,
                                     decoder_config(model_config), abstract, shardings,
                                     directory, "BLIP-2")
    return build_blip2(model_config, dtype), params, model_config


def is_blip2_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict is an HF BLIP-2 model (load_hf_blip2 reads it or says why
    not)."""
    archs = list(config.get("architectures") or [])
    return config.get("model_type") == MODEL_TYPE or any(a.startswith("Blip2") for a in archs)


def is_blip2_source(directory: str) -> bool:
    """Whether an HF directory's config.json is a BLIP-2 model."""
    return is_blip2_config(hf_io.read_json(os.path.join(directory, "config.json")))
