"""Export a vlmjax `PrefixLM` to a Hugging Face `LlavaForConditionalGeneration` directory.

    config = export_hf_llava(model_or_model_config, params, out_dir, dtype="float32",
                             tokenizer_dir=None, max_shard_bytes=5 * 2**30)

writes config.json (`hf_config_from_llava`) and model.safetensors (or shards with
model.safetensors.index.json), one tensor at a time, under the hub's names
(vision_tower.vision_model.X, multi_modal_projector.X, language_model.model.X,
language_model.lm_head.weight), which transformers 4 and 5 both load;
`LlavaForConditionalGeneration.from_pretrained(out_dir)` computes the same logits. The vision
tower has the blocks PrefixLM has (num_hidden_layers = the deepest feature layer;
vision_feature_layer re-indexed to the same hidden states: LLaVA's -2 of 24 layers becomes -1 of
23), an identity post_layernorm (LLaVA never reads it) and no SigLIP head; biases HF has and the
Decoder lacks are zeros (as hf_decoder_export). The tokenizer, generation and processor files of
`tokenizer_dir` come along. The model is a PrefixLM instance or its model config
(convert.hf_llava: the PrefixLM arguments, INFO_KEYS optional: text_model_type and the LLM's
bos_id / eos_id / pad_id / max_position_embeddings go into the text config when present).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vlmjax.convert import hf_export, hf_io
from vlmjax.convert.hf_decoder import scanned_path, to_hf, weight_entries
from vlmjax.convert.hf_decoder_config import (build_decoder, hf_biases, hf_config_from_decoder,
                                              hf_family_of_decoder)
from vlmjax.convert.hf_decoder_export import EXPORT_DTYPES, copy_tokenizer_files, hf_shape
from vlmjax.convert.hf_llava import ARCHITECTURE, built_blocks, decoder_config, tower_entries
from vlmjax.convert.params import flatten
from vlmjax.models import scan_layout
from vlmjax.models.prefix_lm import PrefixLM
from vlmjax.models.two_towers import with_defaults
from vlmjax.models.vit import ViT

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_PREFIXES = {"vision_model.": "vision_tower.vision_model.",
                "projector.": "multi_modal_projector.", "model.": "language_model.model.",
                "lm_head.": "language_model.lm_head."}  # canonical name -> hub checkpoint name


def prefix_lm_config_of(model) -> dict:
    """A PrefixLM instance or a model config (with or without INFO_KEYS) -> a model config
    (plain dicts)."""
    if isinstance(model, PrefixLM):
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                  if f.init and f.name not in ("parent", "name", "dtype")}
        return {**fields, "vision": dict(model.vision), "llm": dict(model.llm),
                "qformer": None if model.qformer is None else dict(model.qformer)}
    return dict(model)


def export_inputs(model, params: Mapping[str, Any], dtype: str) -> tuple[dict, dict]:
    """(model config, unboxed params) of a PrefixLM export, after checking `dtype` and that the
    params are a PrefixLM's."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    params = nn.meta.unbox(dict(params))
    if set(params) != {"vision", "projector", "llm"}:
        raise ValueError(f"params have {sorted(params)}, a PrefixLM's are ['llm', 'projector', "
                         "'vision']")
    return prefix_lm_config_of(model), params


def write_hf_directory(out_dir: str, config: Mapping[str, Any], tensors, dtype: str,
                       max_shard_bytes: int, tokenizer_dir: str | None) -> None:
    """config.json, the safetensors shards of `tensors` ((checkpoint name, shape, make) each,
    made one at a time) and the model files of `tokenizer_dir` into `out_dir`."""
    produce = {name: make for name, _, make in tensors}
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # an earlier export's shards would confuse from_pretrained
        if name.endswith(".safetensors") or name == hf_io.SHARD_INDEX:
            os.remove(os.path.join(out_dir, name))
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    hf_io.write_safetensors_streaming(out_dir, [(n, s) for n, s, _ in tensors],
                                      lambda name: produce[name](), dtype, max_shard_bytes)
    copy_model_files(tokenizer_dir, out_dir)


def vision_family(vision: Mapping[str, Any]) -> str:
    """'clip' or 'siglip': the HF vision tower that computes what these ViT arguments do."""
    full = with_defaults(ViT, vision)
    has_cls = full["pool"] == "cls" if full["class_token"] is None else full["class_token"]
    problems = {}
    for family, needs in hf_export.REQUIREMENTS.items():
        needs = {k.removeprefix("image."): v for k, v in {**hf_export.COMMON, **needs}.items()
                 if k.startswith("image.") and k not in ("image.pool", "image.class_token")}
        needs["stem"] = "patch"
        wrong = [f"{k}={full[k]!r}" for k, v in needs.items()
                 if full[k] not in (v if isinstance(v, tuple) else (v,))]
        if has_cls != (family == "clip"):
            wrong.append(f"class token {has_cls}")
        if full["activation"] not in hf_export.HF_ACTIVATIONS:
            wrong.append(f"activation={full['activation']!r} (HF: "
                         f"{sorted(hf_export.HF_ACTIVATIONS)})")
        if not wrong:
            return family
        problems[family] = ", ".join(wrong)
    raise ValueError(f"the vision tower is neither an HF CLIP nor a SigLIP vision model: as CLIP "
                     f"it has {problems['clip']}; as SigLIP {problems['siglip']}")


def _exported_layers(model_config) -> int | list[int]:
    """vision_feature_layer for the tower cut after the deepest feature layer: the same hidden
    states (negative indices stay negative, counted from the new last block)."""
    layers, depth = model_config["vision_feature_layer"], model_config["vision"]["depth"]
    blocks = built_blocks(model_config)
    index = [x % (depth + 1) - (blocks + 1) * (x < 0)
             for x in ([layers] if isinstance(layers, int) else layers)]
    return index[0] if isinstance(layers, int) else index


def _image_side(posemb_shape, vision: Mapping[str, Any], family: str) -> int:
    patches = posemb_shape[1] - int(family == "clip")
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the vision position embedding has {patches} patch positions, not a "
                         "square grid; HF LLaVA configs describe square images")
    return side * int(vision["patch_size"])


def hf_config_from_llava(model_config: Mapping[str, Any], vision_params: Mapping[str, Any],
                         dtype: str = "float32") -> dict:
    """The config.json dict of the HF LLaVA model of `model_config` (PrefixLM arguments, INFO_KEYS
    optional); `vision_params` give the image size."""
    if model_config.get("projector", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"projector {model_config['projector']!r} cannot be exported: HF LLaVA's "
                         "projector is 'mlp2x_gelu' (linear_1, GELU, linear_2)")
    if model_config.get("projector_posemb"):
        raise ValueError("projector_posemb is set: HF LLaVA's projector has no position "
                         "embedding, so this model cannot be exported")
    if model_config.get("projector_norm", "none") != "none":
        raise ValueError(f"projector_norm {model_config['projector_norm']!r} cannot be "
                         "exported: HF LLaVA's projector has no input normalisation")
    if model_config.get("prefix_attention", "causal") != "causal":
        raise ValueError(f"prefix_attention {model_config['prefix_attention']!r} cannot be "
                         "exported: HF LLaVA's prefix is 'causal'")
    vision = with_defaults(ViT, model_config["vision"])
    family = vision_family(vision)
    llm = decoder_config(model_config)
    text = {k: v for k, v in hf_config_from_decoder(llm, dtype).items()
            if k not in ("architectures", "dtype")}
    side = _image_side(np.shape(vision_params["posemb"]["pos_embedding"]), vision, family)
    tower = dict(vision, depth=built_blocks(model_config),
                 mlp_dim=vision["mlp_dim"] or 4 * vision["width"])
    vision_cfg = dict(hf_export._tower_config(tower), image_size=side,
                      patch_size=int(vision["patch_size"]), num_channels=3,
                      model_type=f"{family}_vision_model")
    if family == "siglip":
        vision_cfg["vision_use_head"] = False
    strategy = model_config.get("vision_feature_select_strategy", "default")
    per_image = (side // int(vision["patch_size"])) ** 2 + int(
        family == "clip" and strategy == "full")
    return dict(architectures=[ARCHITECTURE], model_type="llava", dtype=dtype,
                text_config=text, vision_config=vision_cfg,
                image_token_index=int(model_config["image_token_id"]),
                image_seq_length=per_image, projector_hidden_act="gelu",
                vision_feature_layer=_exported_layers(model_config),
                vision_feature_select_strategy=strategy,
                multimodal_projector_bias=bool(model_config.get("projector_bias", True)),
                tie_word_embeddings=bool(text["tie_word_embeddings"]))


def _llm_tensors(llm_params: Mapping[str, Any], llm_config: Mapping[str, Any]) -> list:
    """[(canonical name, HF shape, produce())] of the LLM, in checkpoint order; the biases the
    HF family has and the Decoder lacks are zeros (as hf_decoder_export)."""
    flat = flatten(dict(llm_params))
    scanned = scan_layout.is_scanned(dict(llm_params))

    def path_of(entry):
        return scanned_path(entry.path) if scanned and entry.layer is not None else entry.path

    ours = {path_of(e) for e in weight_entries(llm_config)}
    if set(flat) != ours:
        raise ValueError(f"llm params do not match the model config: missing "
                         f"{sorted(ours - set(flat))[:10]}, unused {sorted(set(flat) - ours)[:10]}")
    qkv_bias, out_bias = hf_biases(hf_family_of_decoder(llm_config), llm_config)
    model = build_decoder(llm_config)
    out = []
    for e in weight_entries({**llm_config, "qkv_bias": qkv_bias, "out_bias": out_bias}):
        path = path_of(e)
        if path not in flat:  # a zero bias
            shape = (e.heads * model.dims_per_head,) if e.layout == "proj_bias" else (model.width,)
            out.append((e.hf, shape, lambda shape=shape: np.zeros(shape, np.float32)))
            continue
        layer = e.layer if scanned and e.layer is not None else None
        shape = np.shape(flat[path])
        shape = hf_shape(e, shape[1:] if layer is not None else shape)
        out.append((e.hf, shape, lambda e=e, path=path, layer=layer: to_hf(np.asarray(
            flat[path] if layer is None else flat[path][layer], np.float32), e)))
    return out


def _tower_tensors(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> list:
    """[(canonical name, HF shape, produce())] of the vision tower and the projector, with an
    identity post_layernorm."""
    flat = flatten({"vision": scan_layout.to_unrolled(dict(params["vision"])),
                    "projector": dict(params["projector"])})
    entries = tower_entries(model_config)
    missing = sorted({e.vlmjax for e in entries} - set(flat))
    unused = sorted(set(flat) - {e.vlmjax for e in entries})
    if missing or unused:
        raise ValueError(f"vision / projector params do not match the model config: missing "
                         f"{missing[:10]}, unused {unused[:10]}")
    out = []
    for e in entries:
        value = np.asarray(flat[e.vlmjax], np.float32)
        out.append((e.hf, e.layout.to_hf(value, e.heads).shape,
                    lambda e=e: e.layout.to_hf(np.asarray(flat[e.vlmjax], np.float32), e.heads)))
    width = int(model_config["vision"]["width"])
    out += [("vision_model.post_layernorm.weight", (width,), lambda: np.ones(width, np.float32)),
            ("vision_model.post_layernorm.bias", (width,), lambda: np.zeros(width, np.float32))]
    return out


def hub_name(canonical: str) -> str:
    for prefix, hub in HUB_PREFIXES.items():
        if canonical.startswith(prefix):
            return hub + canonical[len(prefix):]
    raise ValueError(f"tensor {canonical} has no LLaVA checkpoint name")


def copy_model_files(src_dir: str | None, out_dir: str) -> list[str]:
    """The tokenizer, generation and processor files of `src_dir` into `out_dir`."""
    files = copy_tokenizer_files(src_dir, out_dir)
    for name in PROCESSOR_FILES if src_dir else ():
        src, dst = os.path.join(src_dir, name), os.path.join(out_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
            files.append(name)
    return files


def export_hf_llava(model, params: Mapping[str, Any], out_dir: str, dtype: str = "float32",
                    tokenizer_dir: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Writes the HF LLaVA directory of a PrefixLM (an instance or its model config) and its
    params (see the module docstring); returns the config.json dict."""
    model_config, params = export_inputs(model, params, dtype)
    config = hf_config_from_llava(model_config, params["vision"], dtype)
    model_config["vision_family"] = vision_family(model_config["vision"])
    tensors = (_tower_tensors(params, model_config)
               + _llm_tensors(params["llm"], decoder_config(model_config)))
    write_hf_directory(out_dir, config, [(hub_name(n), s, m) for n, s, m in tensors], dtype,
                       max_shard_bytes, tokenizer_dir)
    return config
