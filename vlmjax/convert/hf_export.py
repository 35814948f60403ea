"""Export vlmjax two-tower params to a Hugging Face CLIPModel / SiglipModel directory.

`export_hf(params, model_config, out_dir)` writes `config.json` + `model.safetensors` that
`CLIPModel.from_pretrained` / `SiglipModel.from_pretrained` load. The family is read off the
model config; a model neither family can represent (e.g. a CLIP text tower without a causal
mask) is refused with the reason, rather than exported into something that computes otherwise.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_names import pack_attention, weight_map
from vlmjax.convert.params import unrolled_flat
from vlmjax.models.text import TextTransformer
from vlmjax.models.two_towers import with_defaults
from vlmjax.models.vit import ViT

HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _full_config(model_config: Mapping[str, Any]) -> dict:
    if model_config.get("image") is None or model_config.get("text") is None:
        raise ValueError("HF export needs both an image and a text tower")
    full = {"image_projection": True, "image_projection_bias": False, "text_projection": True,
            "text_projection_bias": False, "bias_init": None, **dict(model_config)}
    full["image"] = with_defaults(ViT, model_config["image"])
    full["text"] = with_defaults(TextTransformer, model_config["text"])
    for tower in (full["image"], full["text"]):
        tower["mlp_dim"] = tower["mlp_dim"] or 4 * tower["width"]
    return full


# What each family's HF implementation computes, as vlmjax options.
REQUIREMENTS = {
    "clip": {"image.pool": "cls", "image.class_token": (None, True), "image.pre_norm": True,
             "image.patch_bias": False, "text.causal": True, "text.pool": "eos",
             "image_projection": True, "image_projection_bias": False, "text_projection": True,
             "text_projection_bias": False, "bias_init": (None,)},
    "siglip": {"image.pool": "map", "image.class_token": (None, False), "image.pre_norm": False,
               "image.patch_bias": True, "text.causal": False, "text.pool": "last",
               "image_projection": False, "text_projection": True,
               "text_projection_bias": True},
}
COMMON = {"image.posemb": "learn", "image.norm": "layernorm", "image.output_layer": (None,),
          "text.norm": "layernorm"}


def _mismatches(full: dict, family: str) -> list[str]:
    out = []
    for key, want in {**COMMON, **REQUIREMENTS[family]}.items():
        node = full
        for part in key.split("."):
            node = node[part]
        allowed = want if isinstance(want, tuple) else (want,)
        if node not in allowed:
            out.append(f"{key}={node!r} (needs {' or '.join(map(repr, allowed))})")
    if family == "siglip" and full["bias_init"] is None:
        out.append("bias_init=None (SigLIP needs a logit bias)")
    if family == "siglip" and full["embed_dim"] != full["image"]["width"]:
        out.append(f"embed_dim={full['embed_dim']} differs from the image width "
                   f"{full['image']['width']} (SigLIP has no image projection)")
    for tower in ("image", "text"):
        if full[tower]["activation"] not in HF_ACTIVATIONS:
            out.append(f"{tower}.activation={full[tower]['activation']!r} (needs one of "
                       f"{sorted(HF_ACTIVATIONS)})")
    return out


def hf_family(model_config: Mapping[str, Any]) -> str:
    """'clip' or 'siglip': the HF model that computes what this vlmjax config computes."""
    full = _full_config(model_config)
    problems = {family: _mismatches(full, family) for family in REQUIREMENTS}
    for family, mismatches in problems.items():
        if not mismatches:
            return family
    raise ValueError("this model is neither an HF CLIPModel nor a SiglipModel: as CLIP it has "
                     + ", ".join(problems["clip"]) + "; as SigLIP it has "
                     + ", ".join(problems["siglip"]))


def _image_size(flat: dict, full: dict) -> int:
    posemb = np.shape(flat["image_tower/posemb/pos_embedding"])
    patches = posemb[1] - int(full["image"]["pool"] == "cls")
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the image position embedding has {patches} patch positions, not a "
                         "square grid; HF configs describe square images: resize it to a square "
                         "grid first (vlmjax.convert.posemb.resize_posemb)")
    return side * full["image"]["patch_size"]


def _tower_config(tower: dict) -> dict:
    return dict(hidden_size=tower["width"], intermediate_size=tower["mlp_dim"],
                num_hidden_layers=tower["depth"], num_attention_heads=tower["num_heads"],
                hidden_act=HF_ACTIVATIONS[tower["activation"]],
                layer_norm_eps=float(tower["norm_eps"]))


def hf_config(model_config: Mapping[str, Any], flat_params: dict,
              token_ids: Mapping[str, int | None] | None = None) -> dict:
    """The config.json dict. `token_ids` (pad_id / bos_id / eos_id of the tokenizer) fill the
    text config's special ids where known."""
    family = hf_family(model_config)
    full = _full_config(model_config)
    image, text = full["image"], full["text"]
    vision_cfg = dict(_tower_config(image), image_size=_image_size(flat_params, full),
                      patch_size=image["patch_size"], num_channels=3)
    text_cfg = dict(_tower_config(text), vocab_size=text["vocab_size"],
                    max_position_embeddings=text["max_len"])
    ids = {f"{k}_token_id": (token_ids or {}).get(f"{k}_id") for k in ("pad", "bos", "eos")}
    text_cfg.update({k: v for k, v in ids.items() if v is not None})
    log_scale = float(np.asarray(flat_params["log_temperature"]))
    if family == "clip":
        if text["eos_id"] == 2:
            raise ValueError("eos_id=2 cannot be exported: HF CLIP reads eos_token_id 2 as the "
                             "legacy 'pool at the highest token id' rule")
        text_cfg["eos_token_id"] = text["eos_id"]
        embed = full["embed_dim"]
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": embed,
                "logit_scale_init_value": log_scale, "dtype": "float32",
                "text_config": dict(text_cfg, model_type="clip_text_model", projection_dim=embed),
                "vision_config": dict(vision_cfg, model_type="clip_vision_model",
                                      projection_dim=embed)}
    return {"architectures": ["SiglipModel"], "model_type": "siglip", "dtype": "float32",
            "text_config": dict(text_cfg, model_type="siglip_text_model",
                                projection_size=full["embed_dim"]),
            "vision_config": dict(vision_cfg, model_type="siglip_vision_model",
                                  vision_use_head=True)}


def hf_state_dict(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict:
    """vlmjax params (scanned layers too) -> HF state dict (float32 numpy, torch layouts)."""
    family = hf_family(model_config)
    flat = {k: v.astype(np.float32) for k, v in unrolled_flat(params).items()}
    entries = weight_map(family, _full_config(model_config))
    missing = [e.vlmjax for e in entries if e.vlmjax not in flat]
    unused = sorted(set(flat) - {e.vlmjax for e in entries})
    if missing or unused:
        raise ValueError(f"params do not match the {family} model config: missing {missing[:10]}, "
                         f"unused {unused[:10]}")
    state = {e.hf: e.layout.to_hf(flat[e.vlmjax], e.heads) for e in entries}
    return pack_attention(state)


def export_hf(params: Mapping[str, Any], model_config: Mapping[str, Any], out_dir: str,
              token_ids: Mapping[str, int | None] | None = None) -> str:
    """Writes `out_dir/config.json` + `out_dir/model.safetensors`; returns the family. Params
    of a `scan_layers` model (a scanned workdir) are unrolled first: HF stores each layer."""
    flat = unrolled_flat(params)
    config = hf_config(model_config, flat, token_ids)
    state = hf_state_dict(flat, model_config)
    os.makedirs(out_dir, exist_ok=True)
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    hf_io.write_safetensors(os.path.join(out_dir, "model.safetensors"), state)
    return config["model_type"]
