"""Import Hugging Face `AlignModel` directories as a vlmjax `TwoTowers` (the export back is
convert.hf_align_export).

    flat, model_config, info = load_hf_align(directory)        # numpy params, as hf.load_hf
    pretrained = read_hf_align(directory)                      # + tokenizer: a Pretrained

`load_pretrained` / `python -m vlmjax.convert import` reach it through pretrained.read_source.
ALIGN (transformers' modeling_align.py) maps onto TwoTowers as:
- image tower: models.efficientnet.EfficientNet (image_arch "efficientnet"), its fields HF's
  AlignVisionConfig's; the image embedding is the pooled last block (HF `pooler_output`, what
  `get_image_features` returns), no projection (image_projection=False);
- text tower: models.bert.BertTextTower (text_arch "bert") pooled at the first token, then
  HF's `text_projection` (a Linear with bias) as text_proj; `embed_dim` is projection_dim, which
  must equal the image tower's width (HF multiplies the two embeddings);
- temperature: HF's logits are cos / `temperature`, ours cos * exp(log_temperature), so
  log_temperature = -log(temperature) (HF's must be > 0) and temperature_init = 1 / HF's.
Dropped on import: `token_type_embeddings` (row 0, what AlignModel adds when given no token
types, is folded into the position embeddings), the text pooler (dense + tanh: AlignModel's
embeddings and logits never read it), BatchNorm `num_batches_tracked` and buffers.
Images are float32 NHWC, (pixel / 255 - image_mean) / image_std: preprocessor_config.json's
EfficientNetImageProcessor settings are turned into that form (default: ALIGN's [-1, 1]).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from vlmjax.convert import hf, hf_blip, hf_io, hf_names
from vlmjax.convert import tokenizer as tok
from vlmjax.convert.hf_names import CONV, SAME, Entry, Layout
from vlmjax.convert.params import Pretrained
from vlmjax.models.efficientnet import EfficientNet

MODEL_TYPE = "align"
FAMILY = "align"
# transformers' AlignVisionConfig / AlignTextConfig / AlignConfig defaults, for config.json
# files that leave values out (use_diff).
VISION_DEFAULTS = dict(
    num_channels=3, image_size=600, width_coefficient=2.0, depth_coefficient=3.1, depth_divisor=8,
    kernel_sizes=[3, 3, 5, 3, 5, 5, 3], in_channels=[32, 16, 24, 40, 80, 112, 192],
    out_channels=[16, 24, 40, 80, 112, 192, 320], depthwise_padding=[],
    strides=[1, 2, 2, 2, 1, 2, 1], num_block_repeats=[1, 2, 2, 3, 3, 4, 1],
    expand_ratios=[1, 6, 6, 6, 6, 6, 6], squeeze_expansion_ratio=0.25, hidden_act="swish",
    hidden_dim=2560, pooling_type="mean", batch_norm_eps=1e-3, drop_connect_rate=0.2)
TEXT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                     max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                     pad_token_id=0, position_embedding_type="absolute")
TOP_DEFAULTS = dict(projection_dim=640, temperature_init_value=1.0)
# Copied between AlignVisionConfig and EfficientNet under the same name.
VISION_FIELDS = ("width_coefficient", "depth_coefficient", "depth_divisor", "kernel_sizes",
                 "in_channels", "out_channels", "strides", "num_block_repeats", "expand_ratios",
                 "depthwise_padding", "squeeze_expansion_ratio", "batch_norm_eps",
                 "drop_connect_rate")
VISION_ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}
TEXT_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
                    "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
POOLS = {"mean": "mean", "max": "max"}
ALIGN_IMAGE_NORMALISATION = ([0.5] * 3, [0.5] * 3)  # ALIGN's pixel / 127.5 - 1
TYPE_EMBEDDINGS = "text_model.embeddings.token_type_embeddings.weight"
DROPPED = ("text_model.pooler.", "num_batches_tracked", "position_ids", "token_type_ids")
TEXT_TOWER = "text_tower/bert"
# HF's temperature t_hf (logits = cos / t_hf) <-> our log_temperature (logits = cos * e^t').
TEMPERATURE = Layout(lambda t, h: -np.log(np.asarray(t, np.float32)).reshape(()),
                     lambda f, h: np.exp(-np.asarray(f, np.float32)).reshape(()))


def is_align_source(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    return os.path.isdir(directory) and os.path.exists(path) and (
        hf_io.read_json(path).get("model_type") == MODEL_TYPE)


def is_align_model(model_config: Mapping[str, Any]) -> bool:
    """Whether a TwoTowers model config has ALIGN's towers (what hf_align_export writes)."""
    return (model_config.get("image_arch") == "efficientnet"
            and model_config.get("text_arch") == "bert")


def _pick(table: Mapping[str, str], value, field: str, where: str) -> str:
    if value not in table:
        raise ValueError(f"{where}: {field}={value!r} has no vlmjax equivalent; supported: "
                         f"{sorted(table)}")
    return table[value]


def feature_map_size(size: int, image: Mapping[str, Any]) -> int:
    """Side of the last feature map for images of side `size` (stem and stride-2 blocks)."""
    size = (size + 1 - 3) // 2 + 1  # stem: pad 1 right/bottom, 3x3 stride 2
    for spec in EfficientNet(**image).blocks():
        if spec.stride == 2:
            half = spec.kernel // 2
            pad = 2 * half - 1 if spec.adjust_padding else 2 * half
            size = (size + pad - spec.kernel) // 2 + 1
    return size


def model_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json"
                         ) -> tuple[dict, dict]:
    """config.json dict -> (TwoTowers model config, info: family, image_size, hidden_dim,
    type_vocab_size, pad_id). Raises naming a field TwoTowers cannot compute as HF does."""
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not "
                         f"{MODEL_TYPE!r} (AlignModel)")
    top = {**TOP_DEFAULTS, **hf_config}
    vision = {**VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    text = {**TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}
    if vision["num_channels"] != 3:
        raise ValueError(f"{where}: vision num_channels={vision['num_channels']}; only RGB (3) "
                         "is supported")
    if text["position_embedding_type"] != "absolute":
        raise ValueError(f"{where}: text position_embedding_type="
                         f"{text['position_embedding_type']!r} (supported: 'absolute')")
    image = {k: (list(vision[k]) if isinstance(vision[k], (list, tuple)) else vision[k])
             for k in VISION_FIELDS}
    image["activation"] = _pick(VISION_ACTIVATIONS, vision["hidden_act"], "vision hidden_act",
                                where)
    image["pool"] = _pick(POOLS, vision["pooling_type"], "vision pooling_type", where)
    try:
        width = EfficientNet(**image).width
    except ValueError as e:
        raise ValueError(f"{where}: vision_config: {e}") from e
    if int(top["projection_dim"]) != width:
        raise ValueError(f"{where}: projection_dim {top['projection_dim']} differs from the image "
                         f"embedding width {width} (round_filters(out_channels[-1]) = the last "
                         "EfficientNet block's channels); AlignModel multiplies the two, so they "
                         "must be equal")
    image_size = [int(s) for s in np.broadcast_to(vision["image_size"], (2,))]
    side = max(feature_map_size(s, image) for s in image_size)
    if int(vision["hidden_dim"]) < side:
        raise ValueError(f"{where}: vision hidden_dim {vision['hidden_dim']} (HF's pooling "
                         f"window) is smaller than the {side}x{side} last feature map at "
                         f"image_size {image_size}: HF would not pool globally")
    temperature = float(top["temperature_init_value"])
    if temperature <= 0:
        raise ValueError(f"{where}: temperature_init_value {temperature} must be > 0")
    txt = dict(vocab_size=int(text["vocab_size"]), max_len=int(text["max_position_embeddings"]),
               width=int(text["hidden_size"]), depth=int(text["num_hidden_layers"]),
               num_heads=int(text["num_attention_heads"]),
               mlp_dim=int(text["intermediate_size"]),
               activation=_pick(TEXT_ACTIVATIONS, text["hidden_act"], "text hidden_act", where),
               norm_eps=float(text["layer_norm_eps"]))
    model = dict(image=image, text=txt, image_arch="efficientnet", text_arch="bert",
                 embed_dim=width, image_projection=False, text_projection=True,
                 text_projection_bias=True, temperature_init=1.0 / temperature, bias_init=None)
    info = dict(family=FAMILY, image_size=image_size, hidden_dim=int(vision["hidden_dim"]),
                type_vocab_size=int(text["type_vocab_size"]), pad_id=text.get("pad_token_id"))
    return model, info


# ------------------------------------------------------------------------------------ weights
def _bn(hf_name: str, ours: str) -> list[Entry]:
    return [Entry(f"{hf_name}.{theirs}", f"{ours}/{mine}", SAME) for theirs, mine in
            (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
             ("running_var", "var"))]


def _conv(hf_name: str, ours: str, bias: bool = False) -> list[Entry]:
    return [Entry(f"{hf_name}.weight", f"{ours}/kernel", CONV)] + (
        [Entry(f"{hf_name}.bias", f"{ours}/bias", SAME)] if bias else [])


def vision_entries(image: Mapping[str, Any]) -> list[Entry]:
    v, o = "vision_model", "image_tower"
    entries = (_conv(f"{v}.embeddings.convolution", f"{o}/stem_conv")
               + _bn(f"{v}.embeddings.batchnorm", f"{o}/stem_bn"))
    for i, spec in enumerate(EfficientNet(**image).blocks()):
        h, b = f"{v}.encoder.blocks.{i}", f"{o}/block{i}"
        if spec.expand_ratio != 1:
            entries += (_conv(f"{h}.expansion.expand_conv", f"{b}/expand_conv")
                        + _bn(f"{h}.expansion.expand_bn", f"{b}/expand_bn"))
        entries += (_conv(f"{h}.depthwise_conv.depthwise_conv", f"{b}/depthwise_conv")
                    + _bn(f"{h}.depthwise_conv.depthwise_norm", f"{b}/depthwise_bn")
                    + _conv(f"{h}.squeeze_excite.reduce", f"{b}/se_reduce", bias=True)
                    + _conv(f"{h}.squeeze_excite.expand", f"{b}/se_expand", bias=True)
                    + _conv(f"{h}.projection.project_conv", f"{b}/project_conv")
                    + _bn(f"{h}.projection.project_bn", f"{b}/project_bn"))
    return entries


def text_entries(text: Mapping[str, Any]) -> list[Entry]:
    """BLIP's BERT table (hf_blip.text_entries) without cross-attention, renamed to ALIGN's."""
    prefix = hf_blip.TEXT_PREFIX["encoder"] + "."
    return [Entry("text_model." + e.hf.removeprefix(prefix), e.vlmjax, e.layout, e.heads)
            for e in hf_blip.text_entries(text, "encoder", TEXT_TOWER)
            if ".crossattention." not in e.hf]


def weight_entries(model_config: Mapping[str, Any]) -> list[Entry]:
    """Every kept AlignModel tensor and the TwoTowers param it is."""
    return (vision_entries(model_config["image"]) + text_entries(model_config["text"])
            + hf_names._linear("text_projection", "text_proj/dense")
            + [Entry("temperature", "log_temperature", TEMPERATURE)])


def image_normalisation(directory: str) -> tuple[list[float], list[float]]:
    """(mean, std) with which (pixel / 255 - mean) / std is what the directory's
    EfficientNetImageProcessor computes (rescale [- 1], normalize, include_top's extra / std)."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
        return ALIGN_IMAGE_NORMALISATION
    pre = hf_io.read_json(path)
    scale, shift = np.ones(3), np.zeros(3)  # x = scale * pixel / 255 + shift
    if pre.get("do_rescale", True):
        scale = scale * 255 * float(pre.get("rescale_factor", 1 / 255))
        shift = shift - float(bool(pre.get("rescale_offset", False)))
    else:
        scale = scale * 255
    std = np.broadcast_to(np.asarray(pre.get("image_std", [0.5] * 3), np.float64), (3,))
    if pre.get("do_normalize", True):
        mean = np.broadcast_to(np.asarray(pre.get("image_mean", [0.5] * 3), np.float64), (3,))
        scale, shift = scale / std, (shift - mean) / std
    if pre.get("include_top", True):
        scale, shift = scale / std, shift / std
    return [float(m) for m in -shift / scale], [float(s) for s in 1 / scale]


def image_size(directory: str, default: list[int]) -> list[int]:
    path = os.path.join(directory, "preprocessor_config.json")
    pre = hf_io.read_json(path) if os.path.exists(path) else {}
    size = pre.get("crop_size") if pre.get("do_center_crop") else pre.get("size")
    if isinstance(size, Mapping) and "height" in size and "width" in size:
        return [int(size["height"]), int(size["width"])]
    return default


def load_hf_align(directory: str) -> tuple[dict, dict, dict]:
    """HF AlignModel directory -> (flat numpy params, TwoTowers model config, info: family,
    image_size, image_mean, image_std, hidden_dim, type_vocab_size, pad_id)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config, info = model_config_from_hf(hf_io.read_json(config_path), config_path)
    state = hf_io.read_state_dict(directory)
    types = state.pop(TYPE_EMBEDDINGS, None)
    state = {k: v for k, v in state.items() if not any(d in k for d in DROPPED)}
    if float(np.asarray(state.get("temperature", 1.0))) <= 0:
        raise ValueError(f"{directory}: temperature {float(state['temperature'])} must be > 0 "
                         "(logits = cos / temperature)")
    flat = hf.params_from_entries(state, weight_entries(model_config), "AlignModel", directory)
    if types is not None:
        flat[f"{TEXT_TOWER}/pos_embedding"] = flat[f"{TEXT_TOWER}/pos_embedding"] + types[0]
    model_config["temperature_init"] = float(np.exp(flat["log_temperature"]))
    info["image_size"] = image_size(directory, info["image_size"])
    info["image_mean"], info["image_std"] = image_normalisation(directory)
    return flat, model_config, info


def tokenizer_settings(directory: str, max_len: int) -> dict | None:
    """BERT's: [CLS] first, [SEP] last (kept under truncation), padding masked; None without
    tokenizer files."""
    settings = tok.hf_tokenizer_settings(directory, "clip", max_len)  # CLIP's framing is BERT's
    if settings is None or not settings["file"].endswith(".json"):
        return settings
    config_path = os.path.join(directory, "tokenizer_config.json")
    declared = hf_io.read_json(config_path) if os.path.exists(config_path) else {}
    names = {"bos_token": declared.get("cls_token", "[CLS]"),
             "eos_token": declared.get("sep_token", "[SEP]"),
             "pad_token": declared.get("pad_token", "[PAD]")}
    settings.update(names)
    tokenizer = tok.open_tokenizer(directory, settings)
    settings.update(add_bos=tokenizer.bos_id is not None, pad_id=tokenizer.pad_id,
                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return settings


def read_hf_align(directory: str, tokenizer_path: str | None = None) -> Pretrained:
    """An HF AlignModel directory as a `Pretrained` (pretrained.read_source's result)."""
    if tokenizer_path is not None:
        raise ValueError(f"{directory} is an HF ALIGN model: it brings its own tokenizer files; "
                         "--tokenizer is for big_vision checkpoints")
    flat, model_config, info = load_hf_align(directory)
    image = {"size": info["image_size"], "mean": info["image_mean"], "std": info["image_std"]}
    settings = tokenizer_settings(directory, model_config["text"]["max_len"])
    source = {"kind": "hf", "path": os.path.abspath(directory), "family": FAMILY}
    return Pretrained(flat, model_config, image, settings, directory if settings else None,
                      source)

