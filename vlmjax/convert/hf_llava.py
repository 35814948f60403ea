"""Hugging Face `LlavaForConditionalGeneration` -> vlmjax `PrefixLM` (import; the export back is
convert.hf_llava_export).

    model, params, model_config = load_hf_llava(directory, shardings=None, dtype=jnp.float32,
                                                scan_layers=None)
    model_config = llava_config_from_hf(config_json_dict)   # the config alone
    model = build_prefix_lm(model_config, dtype)
    export_hf_llava(model_or_model_config, params, out_dir, dtype="float32",
                    tokenizer_dir=None)    # convert.hf_llava_export; returns the config.json dict

The model config is the PrefixLM arguments (`prefix_lm_kwargs` drops the rest) plus INFO_KEYS:
model_type "llava", text_model_type (llama / qwen2), vision_family (clip / siglip),
image_size [H, W], image_mean / image_std (preprocessor_config.json's, else the vision family's:
images are float32 NHWC, pixel / 255 then (x - mean) / std), and the LLM's bos_id / eos_id /
pad_id / max_position_embeddings.

config.json: text_config -> `llm` (convert.hf_decoder_config: Llama / Qwen2); vision_config
(clip_vision_model / siglip_vision_model) -> `vision` (the image tower of convert.hf's
model_config_from_hf); vision_feature_layer (an int or a list; HF's hidden_states index, 0 the
embeddings) and vision_feature_select_strategy ('default' drops CLIP's class token; SigLIP has
none, so only 'full') as they are; projector_hidden_act 'gelu' -> projector 'mlp2x_gelu' (HF's
projector is always linear_1, act, linear_2); multimodal_projector_bias -> projector_bias;
image_token_index (or image_token_id) -> image_token_id; tie_word_embeddings (top level or the
text config's, as LlavaConfig) -> the LLM's tie_embeddings. Other values: a ValueError naming
the field and what is valid.

Weights (safetensors, sharded or not, read tensor by tensor and placed on device before the
next is read, as convert.hf_decoder; or pytorch_model.bin), under the names of every
transformers version: [model.]vision_tower.[vision_model.]X -> vision/ (convert.hf_names'
table), [model.]multi_modal_projector.linear_{i} -> projector/linear_{i},
language_model.model.X or model.language_model.X -> llm/ (convert.hf_decoder's table),
[language_model.]lm_head -> llm/lm_head. Tensors that PrefixLM does not build are skipped: the
vision blocks after the deepest feature layer, the tower's post_layernorm, SigLIP's head.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.convert import hf, hf_io, hf_names
from vlmjax.convert.hf_decoder import open_tensors, stream_params
from vlmjax.convert.hf_decoder_config import decoder_config_from_hf, decoder_kwargs
from vlmjax.convert.params import flatten, unflatten
from vlmjax.models import scan_layout
from vlmjax.models.prefix_lm import SELECT_STRATEGIES, PrefixLM

ARCHITECTURE = "LlavaForConditionalGeneration"
INFO_KEYS = ("model_type", "text_model_type", "vision_family", "image_size", "image_mean",
             "image_std", "bos_id", "eos_id", "pad_id", "max_position_embeddings")
DECODER_INFO = {"text_model_type": "model_type", "bos_id": "bos_id", "eos_id": "eos_id",
                "pad_id": "pad_id", "max_position_embeddings": "max_position_embeddings"}
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
PROJECTOR_ACTIVATIONS = {"gelu": "mlp2x_gelu"}  # HF projector_hidden_act -> PrefixLM projector
# LlavaConfig's defaults, for config.json files that leave values out.
DEFAULT_IMAGE_TOKEN = 32000
DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=24, num_attention_heads=16, image_size=336,
                      patch_size=14)
# Checkpoint name prefixes of the transformers versions -> one canonical name per tensor.
_RENAMES = ((re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "vision_model."),
            (re.compile(r"^(?:model\.)?multi_modal_projector\."), "projector."),
            (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
            (re.compile(r"^(?:model\.language_model|language_model\.model)\."), "model."))
_VISION_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_UNBUILT_VISION = ("vision_model.post_layernorm.", "vision_model.head.")


# ----------------------------------------------------------------------------------- config
def _feature_layers(value, depth: int, where: str) -> int | list[int]:
    layers = [value] if isinstance(value, int) else value
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise ValueError(f"{where}: vision_feature_layer {value!r} must be an int or a non-empty "
                         "list of ints (indices of the vision tower's hidden states)")
    bad = [x for x in layers if not -depth - 1 <= x <= depth]
    if bad:
        raise ValueError(f"{where}: vision_feature_layer {value!r} holds {bad}, outside "
                         f"[-{depth + 1}, {depth}] for a vision tower of {depth} layers")
    return int(value) if isinstance(value, int) else [int(x) for x in layers]


def vision_from_hf(vision_config: Mapping[str, Any], where: str) -> tuple[str, dict, list]:
    """(family, ViT kwargs, image size [H, W]) of a LLaVA vision_config."""
    kind = vision_config.get("model_type", "clip_vision_model")
    if kind not in VISION_MODEL_TYPES:
        raise ValueError(f"{where}: vision_config.model_type {kind!r} is not supported; "
                         f"supported: {sorted(VISION_MODEL_TYPES)}")
    family = VISION_MODEL_TYPES[kind]
    # The two-tower reader; its SigLIP checks on the head and the text width do not apply here.
    width = vision_config.get("hidden_size", hf.DEFAULTS[family]["vision"]["hidden_size"])
    towers = {"model_type": family, "vision_config": {**vision_config, "vision_use_head": True},
              "text_config": {"projection_size": width} if family == "siglip" else {}}
    model, info = hf.model_config_from_hf(towers, f"{where} vision_config")
    return family, model["image"], info["image_size"]


def llava_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """config.json dict -> model config (PrefixLM arguments + INFO_KEYS; image_mean / image_std
    are the vision family's defaults here: load_hf_llava reads preprocessor_config.json)."""
    if hf_config.get("model_type") != "llava":
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not 'llava'")
    archs = hf_config.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise ValueError(f"{where}: architectures {archs} are not supported; expected "
                         f"[{ARCHITECTURE!r}]")
    text = dict(hf_config.get("text_config") or {})
    text.setdefault("model_type", "llama")  # LlavaConfig's default text model
    decoder = decoder_config_from_hf(text, f"{where} text_config")
    family, vision, image_size = vision_from_hf(hf_config.get("vision_config") or DEFAULT_VISION,
                                                where)
    act = hf_config.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ValueError(f"{where}: projector_hidden_act {act!r} is not supported; supported: "
                         f"{sorted(PROJECTOR_ACTIVATIONS)} (PrefixLM's projector uses exact GELU)")
    strategy = hf_config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"{where}: vision_feature_select_strategy {strategy!r} is not one of "
                         f"{list(SELECT_STRATEGIES)}")
    if strategy == "default" and family == "siglip":
        raise ValueError(f"{where}: vision_feature_select_strategy 'default' drops the first "
                         "token, which a SigLIP tower (no class token) has only as a patch; "
                         "supported for SigLIP: 'full'")
    image_token = hf_config.get("image_token_index", hf_config.get("image_token_id",
                                                                    DEFAULT_IMAGE_TOKEN))
    if not isinstance(image_token, int) or not 0 <= image_token < decoder["vocab_size"]:
        raise ValueError(f"{where}: image_token_index {image_token!r} must be a token id in "
                         f"[0, {decoder['vocab_size']}) (text_config.vocab_size)")
    decoder["tie_embeddings"] = bool(hf_config.get("tie_word_embeddings")
                                     or decoder["tie_embeddings"])
    mean, std = hf.IMAGE_NORMALISATION[family]
    return dict(
        vision=vision, llm=decoder_kwargs(decoder), image_token_id=int(image_token),
        vision_feature_layer=_feature_layers(hf_config.get("vision_feature_layer", -2),
                                             vision["depth"], where),
        vision_feature_select_strategy=strategy, projector=PROJECTOR_ACTIVATIONS[act],
        projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
        prefix_attention="causal", model_type="llava", text_model_type=decoder["model_type"],
        vision_family=family, image_size=list(image_size), image_mean=list(mean),
        image_std=list(std), **{k: decoder[k] for k in
                                ("bos_id", "eos_id", "pad_id", "max_position_embeddings")})


def prefix_lm_kwargs(model_config: Mapping[str, Any]) -> dict:
    """The PrefixLM arguments of a model config (INFO_KEYS and a trainer's `dtype` dropped)."""
    return {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}


def build_prefix_lm(model_config: Mapping[str, Any], dtype=jnp.float32) -> PrefixLM:
    return PrefixLM(**prefix_lm_kwargs(model_config), dtype=dtype)


def decoder_config(model_config: Mapping[str, Any]) -> dict:
    """The hf_decoder model config of the LLM (Decoder arguments + its INFO_KEYS)."""
    info = {ours: model_config.get(key) for key, ours in DECODER_INFO.items()}
    return {**dict(model_config["llm"]), **info}


def built_blocks(model_config: Mapping[str, Any]) -> int:
    """Vision blocks PrefixLM builds: up to the deepest feature layer."""
    layers = model_config["vision_feature_layer"]
    depth = model_config["vision"]["depth"]
    return max(x % (depth + 1) for x in ([layers] if isinstance(layers, int) else layers))


def abstract_llava_params(model_config: Mapping[str, Any]) -> dict:
    """Nested ShapeDtypeStructs of the (unboxed) params for images of model_config's size."""
    return abstract_prefix_lm_params(build_prefix_lm(model_config), model_config["image_size"])


def abstract_prefix_lm_params(model: PrefixLM, image_size) -> dict:
    """Nested ShapeDtypeStructs of a PrefixLM's (unboxed) params for images of `image_size`."""
    height, width = image_size
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
        images=jnp.zeros((1, height, width, 3), jnp.float32)))
    return nn.meta.unbox(shapes)["params"]


# ---------------------------------------------------------------------------------- weights
def canonical_name(name: str) -> str:
    """A checkpoint tensor name of any transformers version -> vision_model.X / projector.X /
    model.X / lm_head.X (names that are none of these come back unchanged)."""
    for pattern, prefix in _RENAMES:
        if pattern.match(name):
            return pattern.sub(prefix, name, count=1)
    return name


def tower_entries(model_config: Mapping[str, Any]) -> list[hf_names.Entry]:
    """The vision and projector tensors (canonical HF name -> path under vision/, projector/)."""
    vision, blocks = dict(model_config["vision"]), built_blocks(model_config)
    family = model_config["vision_family"]
    towers = {"image": vision, "text": {"depth": 0, "num_heads": 1}}  # only the image half
    entries = []
    for e in hf_names.weight_map(family, towers):
        if not e.hf.startswith("vision_model.") or e.hf.startswith(_UNBUILT_VISION):
            continue
        block = _VISION_BLOCK.match(e.hf)
        if block is None or int(block.group(1)) < blocks:
            entries.append(dataclasses.replace(
                e, vlmjax="vision/" + e.vlmjax.removeprefix("image_tower/")))
    for i in (1, 2):
        name, path = f"projector.linear_{i}", f"projector/linear_{i}"
        entries.append(hf_names.Entry(f"{name}.weight", f"{path}/kernel", hf_names.DENSE))
        if model_config["projector_bias"]:
            entries.append(hf_names.Entry(f"{name}.bias", f"{path}/bias", hf_names.SAME))
    return entries


def _skippable(name: str, blocks: int) -> bool:
    """Checkpoint tensors PrefixLM does not build (or buffers)."""
    block = _VISION_BLOCK.match(name)
    return (name.startswith(_UNBUILT_VISION) or name.endswith(hf.IGNORED_BUFFERS)
            or (block is not None and int(block.group(1)) >= blocks))


class LLMTensors:
    """The LLM's tensors of a LLaVA checkpoint under the LlamaForCausalLM names, behind the
    `hf_io.SafetensorsTensors` interface that hf_decoder.stream_params reads."""

    def __init__(self, tensors, names: Mapping[str, str]):
        self.tensors, self.names_map = tensors, dict(names)

    def names(self) -> list[str]:
        return sorted(self.names_map)

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        return self.tensors.read(self.names_map[name], dtype)


def _split_names(tensors, model_config, where: str) -> tuple[dict, dict]:
    """(vision + projector, LLM) {canonical name: checkpoint name}; raises on tensors that
    belong to neither or that the model does not have."""
    towers, llm, unused = {}, {}, []
    blocks = built_blocks(model_config)
    for name in tensors.names():
        canonical = canonical_name(name)
        if canonical.startswith(("model.", "lm_head.")):
            llm[canonical] = name
        elif canonical.startswith(("vision_model.", "projector.")):
            towers[canonical] = name
        else:
            unused.append(name)
    entries = {e.hf for e in tower_entries(model_config)}
    missing = sorted(entries - set(towers))
    unused += sorted(towers[c] for c in set(towers) - entries if not _skippable(c, blocks))
    if missing or unused:
        raise ValueError(f"{where}: the weights do not match a LLaVA model of this config.json: "
                         f"missing {missing[:10]}; unused {unused[:10]}")
    return {c: towers[c] for c in entries}, llm


def _flat_shardings(shardings, abstract: Mapping, what: str) -> dict:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, Mapping):
        flat = flatten(shardings)
        if set(flat) != set(abstract):
            raise ValueError(f"shardings do not match the {what} params: "
                             f"{sorted(set(flat) ^ set(abstract))[:10]}")
        return flat
    return dict.fromkeys(abstract, shardings)


def stream_prefix_lm_params(tensors, entries, llm_names: Mapping[str, str], llm_config,
                            abstract: Mapping, shardings, where: str, what: str,
                            names: Mapping[str, str] | None = None) -> dict:
    """A PrefixLM's params from an HF checkpoint (LLaVA's, BLIP-2's), placed one tensor at a
    time: the vision + projector tensors of `entries` (hf_names.Entry; `names` maps an entry's
    HF name to the checkpoint's, default the same), then the LLM (`llm_names`, stream_params).
    `abstract`: the flat params; `shardings`: one sharding or a pytree of the params."""
    towers_abstract = {k: v for k, v in abstract.items() if not k.startswith("llm/")}
    llm_shardings = shardings["llm"] if isinstance(shardings, Mapping) else shardings
    tower_shardings = _flat_shardings(
        {k: v for k, v in shardings.items() if k != "llm"} if isinstance(shardings, Mapping)
        else shardings, towers_abstract, what)
    out = {}
    for e in entries:
        name = e.hf if names is None else names[e.hf]
        value = e.layout.to_vlmjax(tensors.read(name, np.float32), e.heads)
        want = tuple(towers_abstract[e.vlmjax].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{where}: tensor {name} converts to {tuple(value.shape)}, "
                             f"the model's {e.vlmjax} is {want}")
        out[e.vlmjax] = jax.device_put(np.ascontiguousarray(value),
                                       tower_shardings[e.vlmjax]).block_until_ready()
        del value
    params = unflatten(out)
    params["llm"] = stream_params(LLMTensors(tensors, llm_names), llm_config, llm_shardings,
                                  where)
    return params


def load_hf_llava(directory: str, shardings: Any = None, dtype=jnp.float32,
                  scan_layers: bool | None = None) -> tuple[PrefixLM, dict, dict]:
    """HF LLaVA directory -> (PrefixLM with compute `dtype`, float32 params, model config).

    `shardings`: one sharding, or a pytree matching the params ({"vision", "projector",
    "llm"}); `scan_layers` (default: the layout of shardings["llm"]) stacks the LLM's layers."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config = llava_config_from_hf(hf_io.read_json(config_path), config_path)
    mean, std = hf.image_normalisation(directory, model_config["vision_family"])
    model_config.update(image_mean=mean, image_std=std)
    llm_shardings = shardings["llm"] if isinstance(shardings, Mapping) else shardings
    if scan_layers is None:
        scan_layers = isinstance(llm_shardings, Mapping) and scan_layout.is_scanned(llm_shardings)
    if scan_layers:
        model_config["llm"] = {**model_config["llm"], "scan_layers": True}
    tensors = open_tensors(directory)
    tower_names, llm_names = _split_names(tensors, model_config, directory)
    params = stream_prefix_lm_params(
        tensors, tower_entries(model_config), llm_names, decoder_config(model_config),
        flatten(abstract_llava_params(model_config)), shardings, directory, "LLaVA",
        names=tower_names)
    return build_prefix_lm(model_config, dtype), params, model_config


def is_llava_source(directory: str) -> bool:
    """Whether an HF directory's config.json is a LLaVA model."""
    config = hf_io.read_json(os.path.join(directory, "config.json"))
    return config.get("model_type") == "llava" or ARCHITECTURE in (config.get("architectures")
                                                                   or [])
