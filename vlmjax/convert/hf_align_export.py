"""Export a vlmjax ALIGN (`TwoTowers` with image_arch "efficientnet", text_arch "bert") to a
Hugging Face `AlignModel` directory: config.json, model.safetensors and, given the image
settings, an EfficientNetImageProcessor preprocessor_config.json.

    export_hf_align(params, model_config, out_dir, token_ids=None, image=None)

The inverse of convert.hf_align. HF tensors our model does not have are written so that
AlignModel computes what we do: `token_type_embeddings` zeros (their row 0 is already in our
position embeddings), the text pooler zeros (AlignModel's embeddings and logits never read it),
BatchNorm `num_batches_tracked` 0. A model AlignModel cannot represent (an image projection, a
text projection without bias, a logit bias, an embed_dim other than the image width, an
activation HF lacks) is refused with the reason. A model whose BERT runs under `scan_layers`
(`layer_scan`) is unrolled to `layer_{i}` first (params.unrolled_flat).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from vlmjax.convert import hf_align, hf_io
from vlmjax.convert.params import unrolled_flat
from vlmjax.models.bert import BertTextTower
from vlmjax.models.efficientnet import EfficientNet
from vlmjax.models.two_towers import with_defaults

HF_VISION_ACTIVATIONS = {"silu": "swish", "relu": "relu", "gelu": "gelu"}
HF_TEXT_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh",
                       "silu": "silu"}
TYPE_VOCAB_SIZE = 2  # BERT's
MIN_HIDDEN_DIM = 2560  # AlignVisionConfig's default pooling window


def _full_config(model_config: Mapping[str, Any]) -> dict:
    """The model config with every tower field filled; raises naming what HF cannot express."""
    if not hf_align.is_align_model(model_config):
        raise ValueError("HF AlignModel export needs image_arch 'efficientnet' and text_arch "
                         f"'bert', got {model_config.get('image_arch')!r} / "
                         f"{model_config.get('text_arch')!r}")
    if model_config.get("image") is None or model_config.get("text") is None:
        raise ValueError("HF AlignModel export needs both an image and a text tower")
    full = {"image_projection": True, "text_projection": True, "text_projection_bias": False,
            "bias_init": None, **dict(model_config)}
    full["image"] = with_defaults(EfficientNet, model_config["image"])
    full["text"] = with_defaults(BertTextTower, model_config["text"])
    full["text"]["mlp_dim"] = full["text"]["mlp_dim"] or 4 * full["text"]["width"]
    width = EfficientNet(**full["image"]).width
    problems = []
    for key, want in (("image_projection", False), ("text_projection", True),
                      ("text_projection_bias", True), ("bias_init", None)):
        if full[key] != want:
            problems.append(f"{key}={full[key]!r} (AlignModel has {want!r})")
    if full.get("embed_dim") != width:
        problems.append(f"embed_dim={full.get('embed_dim')!r} differs from the image width "
                        f"{width} (AlignModel has no image projection)")
    if full["image"]["pool"] not in ("mean", "max"):
        problems.append(f"image.pool={full['image']['pool']!r} (needs 'mean' or 'max')")
    for tower, table in (("image", HF_VISION_ACTIVATIONS), ("text", HF_TEXT_ACTIVATIONS)):
        if full[tower]["activation"] not in table:
            problems.append(f"{tower}.activation={full[tower]['activation']!r} (needs one of "
                            f"{sorted(table)})")
    if problems:
        raise ValueError("this model is not an HF AlignModel: " + "; ".join(problems))
    return full


def hf_config(model_config: Mapping[str, Any], flat_params: Mapping[str, Any],
              image_size=None, token_ids: Mapping[str, Any] | None = None) -> dict:
    """The config.json dict; `image_size` [H, W] sets image_size and a pooling window
    (hidden_dim) that covers the last feature map; `token_ids` the text pad id."""
    full = _full_config(model_config)
    image, text = full["image"], full["text"]
    vision_cfg = {k: image[k] for k in hf_align.VISION_FIELDS}
    vision_cfg = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vision_cfg.items()}
    size = [int(s) for s in (image_size or [hf_align.VISION_DEFAULTS["image_size"]] * 2)]
    side = max(hf_align.feature_map_size(s, image) for s in size)
    vision_cfg.update(model_type="align_vision_model", num_channels=3,
                      image_size=size[0] if size[0] == size[1] else size,
                      hidden_act=HF_VISION_ACTIVATIONS[image["activation"]],
                      pooling_type=image["pool"], hidden_dim=max(MIN_HIDDEN_DIM, side))
    text_cfg = dict(model_type="align_text_model", vocab_size=text["vocab_size"],
                    hidden_size=text["width"], num_hidden_layers=text["depth"],
                    num_attention_heads=text["num_heads"], intermediate_size=text["mlp_dim"],
                    hidden_act=HF_TEXT_ACTIVATIONS[text["activation"]],
                    max_position_embeddings=text["max_len"], layer_norm_eps=text["norm_eps"],
                    type_vocab_size=TYPE_VOCAB_SIZE)
    pad_id = (token_ids or {}).get("pad_id")
    if pad_id is not None:
        text_cfg["pad_token_id"] = int(pad_id)
    temperature = float(hf_align.TEMPERATURE.to_hf(flat_params["log_temperature"], 0))
    return {"architectures": ["AlignModel"], "model_type": hf_align.MODEL_TYPE,
            "projection_dim": full["embed_dim"], "temperature_init_value": temperature,
            "dtype": "float32", "text_config": text_cfg, "vision_config": vision_cfg}


def hf_state_dict(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> dict:
    """vlmjax params (either text layout) -> AlignModel state dict (numpy, torch layouts;
    float32 but the int64 num_batches_tracked)."""
    full = _full_config(model_config)
    flat = {k: v.astype(np.float32) for k, v in unrolled_flat(params).items()}
    entries = hf_align.weight_entries(full)
    missing = [e.vlmjax for e in entries if e.vlmjax not in flat]
    unused = sorted(set(flat) - {e.vlmjax for e in entries})
    if missing or unused:
        raise ValueError(f"params do not match the ALIGN model config: missing {missing[:10]}, "
                         f"unused {unused[:10]}")
    state = {e.hf: np.asarray(e.layout.to_hf(flat[e.vlmjax], e.heads), np.float32)
             for e in entries}
    width = full["text"]["width"]
    state[hf_align.TYPE_EMBEDDINGS] = np.zeros((TYPE_VOCAB_SIZE, width), np.float32)
    state["text_model.pooler.dense.weight"] = np.zeros((width, width), np.float32)
    state["text_model.pooler.dense.bias"] = np.zeros((width,), np.float32)
    for name in [n for n in state if n.endswith(".running_var")]:
        state[name.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def preprocessor_config(image: Mapping[str, Any]) -> dict:
    """EfficientNetImageProcessor settings computing (pixel / 255 - mean) / std at our size."""
    height, width = (int(s) for s in image["size"])
    size = {"height": height, "width": width}
    return {"image_processor_type": "EfficientNetImageProcessor", "do_resize": True,
            "size": size, "do_center_crop": False, "crop_size": size, "do_rescale": True,
            "rescale_factor": 1 / 255, "rescale_offset": False, "do_normalize": True,
            "image_mean": list(image["mean"]), "image_std": list(image["std"]),
            "include_top": False}


def export_hf_align(params: Mapping[str, Any], model_config: Mapping[str, Any], out_dir: str,
                    token_ids: Mapping[str, Any] | None = None,
                    image: Mapping[str, Any] | None = None) -> str:
    """Writes out_dir/config.json + model.safetensors (+ preprocessor_config.json when `image`,
    {"size", "mean", "std"}, is given); returns 'align'."""
    from safetensors.numpy import save_file

    flat = unrolled_flat(params)
    config = hf_config(model_config, flat, image["size"] if image else None, token_ids)
    state = hf_state_dict(flat, model_config)
    os.makedirs(out_dir, exist_ok=True)
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    save_file({k: np.array(v, order="C") for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if image is not None:
        hf_io.write_json(os.path.join(out_dir, "preprocessor_config.json"),
                         preprocessor_config(image))
    return hf_align.FAMILY
