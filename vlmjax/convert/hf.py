"""Import Hugging Face `CLIPModel` / `SiglipModel` directories as vlmjax params + model config.

The semantics matched (transformers' modeling_clip.py / modeling_siglip.py):
- CLIP: class token, `pre_layrnorm`, `post_layernorm` on the class token, projections without
  bias, causal text tower pooled at the first EOS token. Configs with the legacy
  `eos_token_id == 2` pool at `argmax(input_ids)` instead, i.e. at the highest id in the
  vocabulary, which is CLIP's end-of-text token: we pool at `eos_id = vocab_size - 1`.
- SigLIP: no class token, MAP head (torch MultiheadAttention with packed q/k/v), no image
  projection, bidirectional text tower pooled at the *last position* (SigLIP feeds padded
  sequences without a mask) followed by the `head` Linear with bias; logit scale and bias.

HF config.json files written with `use_diff` omit values equal to transformers' defaults, so
the defaults are repeated here.
"""
from __future__ import annotations

import math
import os

import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_decoder_config import ARCHITECTURES as DECODER_ARCHITECTURES
from vlmjax.convert.hf_names import split_packed_attention, weight_map

MODEL_TYPES = {"clip": "clip", "siglip": "siglip"}  # config.json model_type -> family
DEFAULTS = {
    "clip": {
        "top": {"projection_dim": 512},
        "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
    },
    "siglip": {
        "top": {},
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16, num_channels=3,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    },
}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
IMAGE_NORMALISATION = {  # pixel/255 then (x - mean) / std, as the HF image processors do
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}
IGNORED_BUFFERS = ("position_ids",)  # non-persistent buffers some older checkpoints contain


def family_of(hf_config: dict, where: str) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; expected one of "
                         f"{sorted(MODEL_TYPES)} (CLIPModel, SiglipModel) or one of "
                         f"{sorted(DECODER_ARCHITECTURES)} ("
                         f"{', '.join(sorted(DECODER_ARCHITECTURES.values()))})")
    return MODEL_TYPES[model_type]


def _activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {name!r} has no vlmjax equivalent; supported: "
                         f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def model_config_from_hf(hf_config: dict, where: str = "config.json") -> tuple[dict, dict]:
    """HF config.json dict -> (vlmjax model config, info: family and image size).

    `temperature_init` / `bias_init` are placeholders here; `load_hf` sets them from the weights.
    """
    family = family_of(hf_config, where)
    defaults = DEFAULTS[family]
    top = {**defaults["top"], **hf_config}
    text = {**defaults["text"], **(hf_config.get("text_config") or {})}
    vision = {**defaults["vision"], **(hf_config.get("vision_config") or {})}
    patch = _pair(vision["patch_size"])
    if patch[0] != patch[1]:
        raise ValueError(f"{where}: patch_size {vision['patch_size']} is not square")
    if vision["num_channels"] != 3:
        raise ValueError(f"{where}: num_channels {vision['num_channels']}; only RGB (3) is "
                         "supported")
    image = dict(patch_size=patch[0], width=vision["hidden_size"],
                 depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                 mlp_dim=vision["intermediate_size"], posemb="learn",
                 activation=_activation(vision["hidden_act"], where),
                 norm_eps=float(vision["layer_norm_eps"]))
    txt = dict(vocab_size=text["vocab_size"], max_len=text["max_position_embeddings"],
               width=text["hidden_size"], depth=text["num_hidden_layers"],
               num_heads=text["num_attention_heads"], mlp_dim=text["intermediate_size"],
               activation=_activation(text["hidden_act"], where),
               norm_eps=float(text["layer_norm_eps"]))
    if family == "clip":
        image.update(pool="cls", pre_norm=True, patch_bias=False)
        eos_id = text["eos_token_id"]
        if eos_id == 2:  # legacy config: HF pools at argmax(input_ids), CLIP's EOT is the max id
            eos_id = text["vocab_size"] - 1
        txt.update(causal=True, pool="eos", eos_id=int(eos_id))
        model = dict(image=image, text=txt, embed_dim=top["projection_dim"],
                     image_projection=True, image_projection_bias=False,
                     text_projection=True, text_projection_bias=False,
                     temperature_init=math.exp(2.6592), bias_init=None)
    else:
        if not vision["vision_use_head"]:
            raise ValueError(f"{where}: vision_use_head=False (no MAP head) gives no image "
                             "embedding; only two-tower SigLIP models are supported")
        embed_dim = text["projection_size"] or text["hidden_size"]
        if embed_dim != vision["hidden_size"]:
            raise ValueError(f"{where}: text projection_size {embed_dim} differs from the vision "
                             f"hidden_size {vision['hidden_size']} (SigLIP has no image "
                             "projection)")
        image.update(pool="map", patch_bias=True)
        txt.update(causal=False, pool="last")
        model = dict(image=image, text=txt, embed_dim=embed_dim,
                     image_projection=False, image_projection_bias=False,
                     text_projection=True, text_projection_bias=True,
                     temperature_init=10.0, bias_init=-10.0)
    info = {"family": family, "image_size": list(_pair(vision["image_size"]))}
    return model, info


def params_from_hf_state(state: dict[str, np.ndarray], family: str, model_config: dict,
                         where: str) -> dict[str, np.ndarray]:
    """HF state dict -> flat {vlmjax/param/path: array}; raises on missing/unused tensors."""
    state = {k: v for k, v in split_packed_attention(state).items()
             if not k.endswith(IGNORED_BUFFERS)}
    return params_from_entries(state, weight_map(family, model_config), f"{family} model",
                               where)


def params_from_entries(state: dict[str, np.ndarray], entries, what: str,
                        where: str) -> dict[str, np.ndarray]:
    """The flat {vlmjax/param/path: array} of `entries` (hf_names.WeightEntry) read from an HF
    state dict; raises naming missing and unused tensors (of a `what` of this config.json) and a
    tensor whose shape does not fit."""
    missing = [e.hf for e in entries if e.hf not in state]
    unused = sorted(set(state) - {e.hf for e in entries})
    if missing or unused:
        raise ValueError(f"{where}: the weights do not match a {what} of this config.json:"
                         f" missing {missing[:10]}{' ...' if len(missing) > 10 else ''}; unused "
                         f"{unused[:10]}{' ...' if len(unused) > 10 else ''}")
    flat = {}
    for e in entries:
        try:
            flat[e.vlmjax] = e.layout.to_vlmjax(state[e.hf], e.heads)
        except ValueError as err:
            raise ValueError(f"{where}: tensor {e.hf} of shape {state[e.hf].shape} does not fit "
                             f"{e.vlmjax}: {err}") from err
    return flat


def image_normalisation(directory: str | None, family: str) -> tuple[list, list]:
    path = os.path.join(directory, "preprocessor_config.json") if directory else None
    mean, std = IMAGE_NORMALISATION[family]
    if path and os.path.exists(path):
        pre = hf_io.read_json(path)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    return [float(m) for m in mean], [float(s) for s in std]


def load_hf(directory: str) -> tuple[dict, dict, dict]:
    """HF directory -> (flat numpy params, model config, info).

    info: `family`, `image_size` [H, W], `image_mean` / `image_std`.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    hf_config = hf_io.read_json(config_path)
    model_config, info = model_config_from_hf(hf_config, config_path)
    flat = params_from_hf_state(hf_io.read_state_dict(directory), info["family"], model_config,
                                directory)
    # The initial values become the checkpoint's own, so re-initialising reproduces them.
    model_config["temperature_init"] = float(np.exp(flat["log_temperature"]))
    if "logit_bias" in flat:
        model_config["bias_init"] = float(flat["logit_bias"])
    info["image_mean"], info["image_std"] = image_normalisation(directory, info["family"])
    return flat, model_config, info

