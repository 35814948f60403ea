"""Export a vlmjax `Blip` to a Hugging Face `BlipForImageTextRetrieval` or
`BlipForConditionalGeneration` directory.

    config = export_hf_blip(model_or_model_config, params, out_dir, architecture=None,
                            dtype="float32", token_ids=None, tokenizer_dir=None)

writes config.json (a transformers-5 BlipConfig: `hf_config_from_blip`) and model.safetensors
under the checkpoint names convert.hf_blip reads (the vision q/k/v packed back into `qkv`);
`from_pretrained(out_dir)` computes our ITM logits and ITC similarities (retrieval) or caption
logits (captioning). Each HF class is one half of BLIP:
- BlipForImageTextRetrieval needs the encoder part: the vision tower, the text transformer with
  the encoder's self-attention, vision_proj, text_proj, itm_head. HF has no ITC temperature, so
  `temp` is not written (a note says so).
- BlipForConditionalGeneration needs the decoder part: the vision tower, the text transformer
  with the decoder's self-attention and the LM head (tied to the word embeddings, or lm_out).
From a model with both parts the other half is left out (a note names it); with shared layers
(`text_shared`) both classes get the shared tensors. `architecture` defaults to the model
config's own (an imported HF model) or to the one its single part gives.

The model is a Blip instance or its model config (convert.hf_blip: the Blip arguments, INFO_KEYS
optional). Special ids (text config bos / sep / pad / eos) come from `token_ids` ({"bos_id",
"sep_id", "pad_id", "eos_id"}), else the model config, else BlipTextConfig's defaults; a
captioner needs bos ([DEC], the first token), sep (where HF's generation stops) and pad inside
the vocabulary. A model HF's BLIP cannot compute (a vision tower other than a patch ViT with a
class token, learned position embeddings, LayerNorm and no pre-norm, an activation HF lacks) is
refused naming what differs. The tokenizer and processor files of `tokenizer_dir` come along;
without a processor file, a BlipImageProcessor config is written from image_mean / image_std.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_blip import (ARCHITECTURES, CAPTIONING, HEAD, SPECIAL_IDS,
                                    TEXT_DEFAULTS, pack_qkv, text_tower, weight_entries)
from vlmjax.convert.hf_decoder_export import EXPORT_DTYPES
from vlmjax.convert.hf_export import HF_ACTIVATIONS
from vlmjax.convert.hf_llava_export import copy_model_files
from vlmjax.convert.params import flatten
from vlmjax.convert.workdir import preprocessor_config
from vlmjax.models.blip import Blip, BlipText
from vlmjax.models.two_towers import with_defaults
from vlmjax.models.vit import ViT

# What HF's BlipVisionModel computes, as ViT options (Blip itself sets pool and class token).
VISION_REQUIREMENTS = {"stem": ("patch",), "posemb": ("learn",), "norm": ("layernorm",),
                       "pre_norm": (False,), "patch_bias": (True,), "output_layer": (None,),
                       "return_layers": (None,)}
EXTRA_TOKENIZER_FILES = ("vocab.txt",)  # BLIP's BertTokenizer


def model_config_of(model) -> dict:
    """A Blip instance or a model config -> a model config (plain dicts and lists)."""
    if isinstance(model, Blip):
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                  if f.init and f.name not in ("parent", "name", "dtype")}
        return {**fields, "image": dict(model.image or {}), "text": dict(model.text or {}),
                "parts": list(model.parts)}
    return dict(model)


def choose_architecture(model_config: Mapping[str, Any], architecture: str | None) -> str:
    parts = tuple(model_config.get("parts", ("encoder", "decoder")))
    if architecture is None:
        architecture = model_config.get("architecture")
    if architecture is None:
        if len(parts) != 1:
            raise ValueError(f"this BLIP model has parts {parts}: name the HF class to export "
                             f"(architecture= one of {list(ARCHITECTURES)})")
        architecture = next(a for a, p in ARCHITECTURES.items() if p == parts[0])
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
    if ARCHITECTURES[architecture] not in parts:
        raise ValueError(f"{architecture} needs the BLIP {ARCHITECTURES[architecture]} part; "
                         f"this model's parts are {parts}")
    return architecture


def check_expressible(model_config: Mapping[str, Any]) -> None:
    """Raises naming every option HF's BLIP cannot compute."""
    arch = model_config.get("image_arch", model_config.get("vision_arch", "vit"))
    if arch != "vit":
        raise ValueError(f"image_arch {arch!r} cannot be exported: HF BLIP's vision tower is a "
                         "ViT")
    if model_config.get("image") is None or model_config.get("text") is None:
        raise ValueError("HF BLIP export needs the image (ViT) and text arguments of the model")
    image = with_defaults(ViT, model_config["image"])
    text = with_defaults(BlipText, model_config["text"])
    wrong = [f"image.{k}={image[k]!r} (HF: {' or '.join(map(repr, v))})"
             for k, v in VISION_REQUIREMENTS.items() if image[k] not in v]
    for tower, kwargs in (("image", image), ("text", text)):
        if kwargs["activation"] not in HF_ACTIVATIONS:
            wrong.append(f"{tower}.activation={kwargs['activation']!r} (HF: "
                         f"{sorted(HF_ACTIVATIONS)})")
    if wrong:
        raise ValueError("this BLIP model cannot be exported: HF's BLIP computes otherwise: "
                         + ", ".join(wrong))


def _image_side(posemb_shape, patch_size: int) -> int:
    patches = int(posemb_shape[1]) - 1  # the class token's position first
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the vision position embedding has {patches} patch positions, not a "
                         "square grid; HF BLIP configs describe square images")
    return side * int(patch_size)


def special_ids(model_config: Mapping[str, Any], architecture: str,
                token_ids: Mapping[str, int | None] | None) -> dict:
    """HF text config ids: `token_ids`, else the model config's, else BlipTextConfig's."""
    vocab = int(with_defaults(BlipText, model_config["text"])["vocab_size"])
    needed = ("bos_id", "sep_id", "pad_id") if architecture == CAPTIONING else ("pad_id",)
    out = {}
    for ours, key in SPECIAL_IDS.items():
        given = (token_ids or {}).get(ours, model_config.get(ours))
        value = TEXT_DEFAULTS[key] if given is None else given
        if value is not None and not 0 <= int(value) < vocab:
            if given is not None or ours in needed:
                raise ValueError(f"{ours} {value} is outside the vocabulary [0, {vocab}); "
                                 f"{architecture} needs {', '.join(needed)} in it (pass "
                                 "token_ids={...} or set them in the model config)")
            value = None  # BlipTextConfig's default does not fit a small vocabulary; unused
        out[key] = None if value is None else int(value)
    return out


def hf_config_from_blip(model_config: Mapping[str, Any], architecture: str, posemb_shape,
                        dtype: str = "float32",
                        token_ids: Mapping[str, int | None] | None = None) -> dict:
    """The config.json dict of `architecture` for the model config (Blip arguments, INFO_KEYS
    optional); `posemb_shape` (the vision position embedding's) gives the image size."""
    check_expressible(model_config)
    image = with_defaults(ViT, model_config["image"])
    text = with_defaults(BlipText, model_config["text"])
    tied = bool(text["tie_word_embeddings"])
    vision_cfg = dict(model_type="blip_vision_model", hidden_size=int(image["width"]),
                      intermediate_size=int(image["mlp_dim"] or 4 * image["width"]),
                      num_hidden_layers=int(image["depth"]),
                      num_attention_heads=int(image["num_heads"]),
                      image_size=_image_side(posemb_shape, image["patch_size"]),
                      patch_size=int(image["patch_size"]),
                      hidden_act=HF_ACTIVATIONS[image["activation"]],
                      layer_norm_eps=float(image["norm_eps"]))
    text_cfg = dict(model_type="blip_text_model", vocab_size=int(text["vocab_size"]),
                    hidden_size=int(text["width"]), encoder_hidden_size=int(image["width"]),
                    intermediate_size=int(text["mlp_dim"] or 4 * text["width"]),
                    num_hidden_layers=int(text["depth"]),
                    num_attention_heads=int(text["num_heads"]),
                    max_position_embeddings=int(text["max_len"]),
                    hidden_act=HF_ACTIVATIONS[text["activation"]],
                    layer_norm_eps=float(text["norm_eps"]), is_decoder=True,
                    tie_word_embeddings=tied,
                    **special_ids(model_config, architecture, token_ids))
    return dict(architectures=[architecture], model_type="blip", dtype=dtype,
                image_text_hidden_size=int(model_config.get("embed_dim", 256)),
                tie_word_embeddings=tied, text_config=text_cfg, vision_config=vision_cfg)


def _left_out(flat: Mapping[str, Any], written: set[str], model_config, architecture) -> list:
    """The params not written, grouped for a note; raises on params no BLIP half holds."""
    part = ARCHITECTURES[architecture]
    other = "decoder" if part == "encoder" else "encoder"
    tower = text_tower(model_config, part)
    other_tower = text_tower(model_config, other)
    groups = {}
    for key in sorted(set(flat) - written):
        layer = re.match(rf"^{tower}/layer_\d+/self_attention_{other}/", key)
        if key == "temp":
            group = "temp (the ITC temperature: HF BLIP has none)"
        elif part == "decoder" and key.split("/")[0] in ("vision_proj", "text_proj",
                                                          "itm_head"):
            group = "the encoder's vision_proj / text_proj / itm_head"
        elif layer is not None:
            group = f"the {other}'s self-attention"
        elif part == "encoder" and re.match(
                rf"^{tower}/(head_transform|head_norm|lm_bias|lm_out)(/|$)", key):
            group = "the decoder's LM head"
        elif other_tower != tower and key.startswith(f"{other_tower}/"):
            group = f"the {other}'s text transformer ({other_tower})"
        else:
            raise ValueError(f"param {key} has no place in a {architecture} (nor in the other "
                             "BLIP half): the params do not match the model config")
        groups.setdefault(group, 0)
        groups[group] += 1
    return [f"{group} ({n} tensors)" for group, n in groups.items()]


def hf_state(params: Mapping[str, Any], model_config: Mapping[str, Any],
             architecture: str) -> tuple[dict, list]:
    """(HF state dict in checkpoint names, float32 numpy; what was left out)."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(nn.meta.unbox(dict(params))).items()}
    entries = weight_entries(model_config, architecture)
    missing = sorted(e.vlmjax for e in entries if e.vlmjax not in flat)
    if missing:
        raise ValueError(f"params do not match the model config for {architecture}: missing "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    left_out = _left_out(flat, {e.vlmjax for e in entries}, model_config, architecture)
    state = {}
    for e in entries:
        try:
            state[e.hf] = np.asarray(e.layout.to_hf(flat[e.vlmjax], e.heads), np.float32)
        except ValueError as err:
            raise ValueError(f"param {e.vlmjax} of shape {flat[e.vlmjax].shape} does not fit "
                             f"{e.hf}: {err}") from err
    tied = bool(with_defaults(BlipText, model_config["text"])["tie_word_embeddings"])
    if architecture == CAPTIONING and not tied:  # HF's untied head adds decoder.bias; the
        state[f"{HEAD}.bias"] = state[f"{HEAD}.decoder.bias"]  # unused predictions.bias: same
    return pack_qkv(state), left_out


def export_hf_blip(model, params: Mapping[str, Any], out_dir: str,
                   architecture: str | None = None, dtype: str = "float32",
                   token_ids: Mapping[str, int | None] | None = None,
                   tokenizer_dir: str | None = None) -> dict:
    """Writes the HF BLIP directory of a Blip (an instance or its model config) and its params
    (see the module docstring); returns the config.json dict."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    model_config = model_config_of(model)
    architecture = choose_architecture(model_config, architecture)
    params = nn.meta.unbox(dict(params))
    if "vision" not in params:
        raise ValueError(f"params have {sorted(params)}: no ViT 'vision' tower, which HF BLIP "
                         "needs")
    config = hf_config_from_blip(model_config, architecture,
                                 np.shape(params["vision"]["posemb"]["pos_embedding"]), dtype,
                                 token_ids)
    state, left_out = hf_state(params, model_config, architecture)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # an earlier export's shards would confuse from_pretrained
        if name.endswith(".safetensors") or name == hf_io.SHARD_INDEX:
            os.remove(os.path.join(out_dir, name))
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    hf_io.write_safetensors_streaming(out_dir, [(n, v.shape) for n, v in state.items()],
                                      state.__getitem__, dtype)
    copied = copy_model_files(tokenizer_dir, out_dir)
    for name in EXTRA_TOKENIZER_FILES if tokenizer_dir else ():
        src, dst = os.path.join(tokenizer_dir, name), os.path.join(out_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
    if "preprocessor_config.json" not in copied and model_config.get("image_mean") is not None:
        side = config["vision_config"]["image_size"]
        processor = preprocessor_config("siglip", {"size": [side, side],
                                                   "mean": model_config["image_mean"],
                                                   "std": model_config["image_std"]})
        hf_io.write_json(os.path.join(out_dir, "preprocessor_config.json"),
                         {**processor, "image_processor_type": "BlipImageProcessor"})
    if left_out:
        print(f"note: {architecture} holds one half of BLIP; not written to {out_dir}: "
              + "; ".join(left_out), file=sys.stderr)
    return config
