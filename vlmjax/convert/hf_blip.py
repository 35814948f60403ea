"""Hugging Face `BlipForImageTextRetrieval` / `BlipForConditionalGeneration` -> vlmjax `Blip`
(import; the export back is convert.hf_blip_export).

    model, params, model_config = load_hf_blip(directory, shardings=None, dtype=jnp.float32)
    model_config = blip_config_from_hf(config_json_dict)    # the config alone
    model = build_blip(model_config, dtype)

The model config is the Blip arguments (`blip_kwargs` drops the rest) plus INFO_KEYS:
model_type "blip", architecture (the HF class), image_size [H, W], image_mean / image_std
(preprocessor_config.json's, else BLIP's processor defaults, CLIP's: images are float32 NHWC,
pixel / 255 then (x - mean) / std), and the text config's special ids: bos_id (BLIP's [DEC],
the first token of a caption), sep_id (where HF's caption generation stops: its eos), pad_id,
eos_id. One HF class is one half of BLIP, on the shared layout (`text_shared`) with one
self-attention per layer:
- BlipForImageTextRetrieval -> parts ("encoder",): vision_model, text_encoder (ITC without the
  image, ITM with it), vision_proj, text_proj, itm_head. HF has no ITC temperature (its
  `use_itm_head=False` output is the plain cosine similarity): `temp` is BLIP's initial 0.07.
- BlipForConditionalGeneration -> parts ("decoder",): vision_model, text_decoder.bert (causal,
  with cross-attention), text_decoder.cls (BERT's prediction head; its output matrix is the
  word embeddings when tied, else `lm_out`). HF ties it when either the top-level or the text
  config's tie_word_embeddings is true (the default); untied, the head's bias is
  `cls.predictions.decoder.bias` (`cls.predictions.bias` is then unused).

The vision tower is HF's CLIP vision table (convert.hf_names) with BLIP's differences: no
pre-LayerNorm, a patch bias, [1, N, D] embeddings stored as parameters, and a fused `qkv`
Linear (rows q, k, v; `split_qkv` / `pack_qkv`) with an output `projection`. The image tokens
are the last hidden states after post_layernorm (HF's `pooler_output` applies it a second time;
BLIP's ITC and ITM read `last_hidden_state[:, 0]`, as Blip.encode_image does). Text LayerNorms
use the text layer_norm_eps (1e-12), the vision ones the vision layer_norm_eps (1e-5).

Config values Blip cannot express (an activation vlmjax lacks, position_embedding_type other
than 'absolute', a text model without cross-attention, other BLIP classes) are a ValueError
naming the field and what is valid; so are missing and unused tensors.
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
from vlmjax.convert.hf_names import DENSE, OUT_KERNEL, QKV_BIAS, QKV_KERNEL, SAME, Entry
from vlmjax.convert.params import format_problems, shape_problems, to_device, unflatten
from vlmjax.models.blip import Blip

ARCHITECTURES = {"BlipForImageTextRetrieval": "encoder", "BlipForConditionalGeneration": "decoder"}
RETRIEVAL, CAPTIONING = tuple(ARCHITECTURES)
INFO_KEYS = ("model_type", "architecture", "image_size", "image_mean", "image_std", "bos_id",
             "sep_id", "pad_id", "eos_id")
SPECIAL_IDS = {"bos_id": "bos_token_id", "sep_id": "sep_token_id", "pad_id": "pad_token_id",
               "eos_id": "eos_token_id"}  # model config key -> HF text config key
TEMPERATURE = 0.07  # BLIP's initial ITC temperature (HF's retrieval model has none)
POSITION_EMBEDDINGS = ("absolute",)
# transformers' BlipTextConfig / BlipVisionConfig / BlipConfig defaults, for config.json files
# that leave values out.
TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=512,
                     hidden_act="gelu", layer_norm_eps=1e-12, bos_token_id=30522, eos_token_id=2,
                     pad_token_id=0, sep_token_id=102, is_decoder=True, tie_word_embeddings=True)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=384, patch_size=16, hidden_act="gelu",
                       layer_norm_eps=1e-5)
TOP_DEFAULTS = dict(image_text_hidden_size=256, tie_word_embeddings=True)
# HF text tower name prefix per part.
TEXT_PREFIX = {"encoder": "text_encoder", "decoder": "text_decoder.bert"}
HEAD = "text_decoder.cls.predictions"
# BLIP's vision embeddings: nn.Parameters stored as [1, N, D] and [1, 1, D], our shapes (SAME
# layout), in place of CLIP's [N, D] / [D] tensors.
VISION_RENAMES = {"vision_model.embeddings.position_embedding.weight":
                  "vision_model.embeddings.position_embedding",
                  "vision_model.embeddings.class_embedding":
                  "vision_model.embeddings.class_embedding"}
_FUSED_QKV = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn\.)qkv\.(weight|bias)$")
_SPLIT_QKV = re.compile(r"^(vision_model\.encoder\.layers\.\d+\.self_attn\.)q_proj\.(weight|bias)$")
# Tensors of HF checkpoints that neither HF's class nor Blip computes with: buffers, the pooler
# of a BlipTextModel saved with one.
_IGNORED = re.compile(r"(position_ids$|^text_encoder\.pooler\.|^text_decoder\.bert\.pooler\.)")


# ----------------------------------------------------------------------------------- config
def _architecture(hf_config: Mapping[str, Any], where: str) -> str:
    if hf_config.get("model_type", "blip") != "blip":
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not 'blip'")
    archs = list(hf_config.get("architectures") or [])
    found = [a for a in archs if a in ARCHITECTURES]
    if len(found) != 1:
        raise ValueError(f"{where}: architectures {archs} are not supported; expected one of "
                         f"{list(ARCHITECTURES)} (BlipModel and BlipForQuestionAnswering are not)")
    return found[0]


def _check_heads(cfg: Mapping[str, Any], where: str) -> None:
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{where}.hidden_size {cfg['hidden_size']} is not divisible by "
                         f"{where}.num_attention_heads {cfg['num_attention_heads']}")


def vision_from_hf(vision: Mapping[str, Any], where: str) -> tuple[dict, list[int]]:
    """(ViT kwargs, image size [H, W]) of a BLIP vision_config (defaults filled in)."""
    vision = {**VISION_DEFAULTS, **dict(vision or {})}
    _check_heads(vision, f"{where} vision_config")
    patch, size = hf._pair(vision["patch_size"]), hf._pair(vision["image_size"])
    if patch[0] != patch[1]:
        raise ValueError(f"{where}: vision_config.patch_size {vision['patch_size']} is not "
                         "square")
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"{where}: vision_config.image_size {vision['image_size']} is not a "
                         f"multiple of patch_size {patch[0]}")
    image = dict(patch_size=patch[0], width=vision["hidden_size"],
                 depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                 mlp_dim=vision["intermediate_size"], posemb="learn", pre_norm=False,
                 patch_bias=True,
                 activation=hf._activation(vision["hidden_act"], f"{where} vision_config"),
                 norm_eps=float(vision["layer_norm_eps"]))
    return image, list(size)


def blip_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """config.json dict -> model config (Blip arguments + INFO_KEYS; image_mean / image_std are
    BLIP's processor defaults here: load_hf_blip reads preprocessor_config.json)."""
    architecture = _architecture(hf_config, where)
    top = {**TOP_DEFAULTS, **dict(hf_config)}
    text = {**TEXT_DEFAULTS, **dict(hf_config.get("text_config") or {})}
    image, image_size = vision_from_hf(hf_config.get("vision_config") or {}, where)
    _check_heads(text, f"{where} text_config")
    kind = text.get("position_embedding_type", "absolute")
    if kind not in POSITION_EMBEDDINGS:
        raise ValueError(f"{where}: text_config.position_embedding_type {kind!r} is not "
                         f"supported; supported: {list(POSITION_EMBEDDINGS)}")
    if not text["is_decoder"]:
        raise ValueError(f"{where}: text_config.is_decoder {text['is_decoder']!r} builds a text "
                         "model without cross-attention (no image-grounded ITM or captioning); "
                         "BLIP's text model needs is_decoder true")
    txt = dict(vocab_size=text["vocab_size"], max_len=text["max_position_embeddings"],
               width=text["hidden_size"], depth=text["num_hidden_layers"],
               num_heads=text["num_attention_heads"], mlp_dim=text["intermediate_size"],
               activation=hf._activation(text["hidden_act"], f"{where} text_config"),
               norm_eps=float(text["layer_norm_eps"]),
               tie_word_embeddings=bool(top["tie_word_embeddings"]
                                        or text["tie_word_embeddings"]))
    mean, std = hf.IMAGE_NORMALISATION["clip"]
    return dict(image=image, text=txt, embed_dim=int(top["image_text_hidden_size"]),
                share="all_but_self_attention", parts=[ARCHITECTURES[architecture]],
                temperature_init=TEMPERATURE, model_type="blip", architecture=architecture,
                image_size=image_size, image_mean=list(mean), image_std=list(std),
                **{ours: text[key] for ours, key in SPECIAL_IDS.items()})


def blip_kwargs(model_config: Mapping[str, Any]) -> dict:
    """The Blip arguments of a model config (INFO_KEYS and a trainer's `dtype` dropped)."""
    kwargs = {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}
    if "parts" in kwargs:
        kwargs["parts"] = tuple(kwargs["parts"])
    return kwargs


def build_blip(model_config: Mapping[str, Any], dtype=jnp.float32) -> Blip:
    try:
        return Blip(**blip_kwargs(model_config), dtype=dtype)
    except TypeError as e:  # an unknown key in a hand-edited config
        raise ValueError(f"model config is not a set of Blip arguments: {e}") from e


def abstract_blip_params(model_config: Mapping[str, Any]) -> dict:
    """Nested ShapeDtypeStructs of the (unboxed) params for images of model_config's size."""
    model = build_blip(model_config)
    height, width = model_config["image_size"]
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, height, width, 3), jnp.float32),
        jnp.zeros((1, 2), jnp.int32), method=model.init_all))
    return nn.meta.unbox(shapes)["params"]


# ---------------------------------------------------------------------------------- weights
def text_tower(model_config: Mapping[str, Any], part: str) -> str:
    """The params key of `part`'s text transformer."""
    share = model_config.get("share", "all_but_self_attention")
    return "text_shared" if share == "all_but_self_attention" else f"text_{part}"


def vision_entries(image: Mapping[str, Any]) -> list[Entry]:
    """BLIP's vision tensors (q/k/v split: see split_qkv) -> params under vision/, from the
    CLIP vision table."""
    towers = {"image": dict(image), "text": {"depth": 0, "num_heads": 1}}  # the image half
    entries = []
    for e in hf_names.weight_map("clip", towers):
        if not e.hf.startswith("vision_model.") or e.hf.startswith("vision_model.pre_layrnorm"):
            continue
        e = dataclasses.replace(e, vlmjax="vision/" + e.vlmjax.removeprefix("image_tower/"),
                                hf=e.hf.replace(".self_attn.out_proj.", ".self_attn.projection."))
        if e.hf in VISION_RENAMES:
            e = dataclasses.replace(e, hf=VISION_RENAMES[e.hf], layout=SAME)
        entries.append(e)
    return entries + [Entry("vision_model.embeddings.patch_embedding.bias",
                            "vision/patch_embed/bias", SAME)]


def _bert_attention(hf_name: str, ours: str, heads: int) -> list[Entry]:
    entries = []
    for name in ("query", "key", "value"):
        entries += [Entry(f"{hf_name}.self.{name}.weight", f"{ours}/{name}/kernel", QKV_KERNEL,
                          heads),
                    Entry(f"{hf_name}.self.{name}.bias", f"{ours}/{name}/bias", QKV_BIAS, heads)]
    return entries + [Entry(f"{hf_name}.output.dense.weight", f"{ours}/out/kernel", OUT_KERNEL,
                            heads),
                      Entry(f"{hf_name}.output.dense.bias", f"{ours}/out/bias", SAME)
                      ] + hf_names._norm(f"{hf_name}.output.LayerNorm", f"{ours}/norm")


def text_entries(text: Mapping[str, Any], part: str, tower: str) -> list[Entry]:
    """`part`'s BERT text transformer (HF prefix TEXT_PREFIX[part]) -> params under `tower`."""
    p, heads = TEXT_PREFIX[part], int(text["num_heads"])
    entries = [Entry(f"{p}.embeddings.word_embeddings.weight", f"{tower}/token_embed/embedding",
                     SAME),
               Entry(f"{p}.embeddings.position_embeddings.weight", f"{tower}/pos_embedding",
                     SAME)] + hf_names._norm(f"{p}.embeddings.LayerNorm", f"{tower}/embed_norm")
    for i in range(int(text["depth"])):
        h, o = f"{p}.encoder.layer.{i}", f"{tower}/layer_{i}"
        entries += _bert_attention(f"{h}.attention", f"{o}/self_attention_{part}", heads)
        entries += _bert_attention(f"{h}.crossattention", f"{o}/cross_attention", heads)
        entries += hf_names._linear(f"{h}.intermediate.dense", f"{o}/mlp/fc1")
        entries += hf_names._linear(f"{h}.output.dense", f"{o}/mlp/fc2")
        entries += hf_names._norm(f"{h}.output.LayerNorm", f"{o}/mlp_norm")
    return entries


def head_entries(part: str, tower: str, tied: bool) -> list[Entry]:
    """Retrieval's projections and ITM head, or the captioner's prediction head."""
    if part == "encoder":
        return (hf_names._linear("vision_proj", "vision_proj")
                + hf_names._linear("text_proj", "text_proj")
                + hf_names._linear("itm_head", "itm_head"))
    entries = (hf_names._linear(f"{HEAD}.transform.dense", f"{tower}/head_transform")
               + hf_names._norm(f"{HEAD}.transform.LayerNorm", f"{tower}/head_norm"))
    if tied:
        return entries + [Entry(f"{HEAD}.bias", f"{tower}/lm_bias", SAME)]
    return entries + [Entry(f"{HEAD}.decoder.weight", f"{tower}/lm_out/kernel", DENSE),
                      Entry(f"{HEAD}.decoder.bias", f"{tower}/lm_bias", SAME)]


def tied_copies(tied: bool) -> tuple[str, ...]:
    """HF tensors that repeat another (HF ties them): skipped on import, written on export."""
    if tied:
        return (f"{HEAD}.decoder.weight", f"{HEAD}.decoder.bias")
    return (f"{HEAD}.bias",)


def weight_entries(model_config: Mapping[str, Any], architecture: str) -> list[Entry]:
    """Every tensor of the HF `architecture` checkpoint (canonical names: vision q/k/v split)
    and the Blip param it is."""
    part = ARCHITECTURES[architecture]
    tower = text_tower(model_config, part)
    text = model_config["text"]
    tied = bool(text.get("tie_word_embeddings", True))
    return (vision_entries(model_config["image"]) + text_entries(text, part, tower)
            + head_entries(part, tower, tied))


def split_qkv(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BLIP's fused vision `self_attn.qkv` [3D, D] / [3D] -> q_proj / k_proj / v_proj."""
    out = {}
    for name, value in state.items():
        match = _FUSED_QKV.match(name)
        if match is None:
            out[name] = value
            continue
        for proj, piece in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
            out[f"{match.group(1)}{proj}.{match.group(2)}"] = piece
    return out


def pack_qkv(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of split_qkv."""
    out = dict(state)
    for name in list(state):
        match = _SPLIT_QKV.match(name)
        if match is None:
            continue
        prefix, suffix = match.groups()
        out[f"{prefix}qkv.{suffix}"] = np.concatenate(
            [out.pop(f"{prefix}{p}.{suffix}") for p in ("q_proj", "k_proj", "v_proj")], axis=0)
    return out


def params_from_state(state: Mapping[str, np.ndarray], model_config: Mapping[str, Any],
                      where: str) -> dict[str, np.ndarray]:
    """HF state dict -> flat {Blip/param/path: array}; raises naming missing and unused
    tensors (buffers, a saved pooler and the tied head's copies are skipped)."""
    architecture = model_config["architecture"]
    tied = bool(model_config["text"].get("tie_word_embeddings", True))
    skipped = set(tied_copies(tied)) if ARCHITECTURES[architecture] == "decoder" else set()
    state = {k: v for k, v in split_qkv(state).items()
             if not _IGNORED.search(k) and k not in skipped}
    state = {k: np.asarray(v, np.float32) for k, v in state.items()}
    return hf.params_from_entries(state, weight_entries(model_config, architecture),
                                  architecture, where)


def load_hf_blip(directory: str, shardings: Any = None,
                 dtype=jnp.float32) -> tuple[Blip, dict, dict]:
    """HF BLIP directory -> (Blip with compute `dtype`, float32 params placed by `shardings`
    (one sharding or a matching pytree), model config)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config = blip_config_from_hf(hf_io.read_json(config_path), config_path)
    mean, std = hf.image_normalisation(directory, "clip")
    model_config.update(image_mean=mean, image_std=std)
    flat = params_from_state(hf_io.read_state_dict(directory), model_config, directory)
    if "encoder" in model_config["parts"]:
        flat["temp"] = np.asarray(model_config["temperature_init"], np.float32)
    params = unflatten(flat)
    problems = shape_problems(abstract_blip_params(model_config), params, "converted")
    if problems:
        raise ValueError(f"{directory}: the converted params do not fit the model of its "
                         f"config.json ({len(problems)} problems):\n  "
                         f"{format_problems(problems)}")
    return build_blip(model_config, dtype), to_device(params, shardings), model_config


def is_blip_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict is an HF BLIP model (a BLIP class named, or model_type 'blip'
    without architectures): load_hf_blip reads it or says why not."""
    archs = list(config.get("architectures") or [])
    if any(a.startswith("Blip") and not a.startswith("Blip2") for a in archs):
        return True
    return config.get("model_type") == "blip" and not archs


def is_blip_source(directory: str) -> bool:
    """Whether an HF directory's config.json is a BLIP model."""
    return is_blip_config(hf_io.read_json(os.path.join(directory, "config.json")))
