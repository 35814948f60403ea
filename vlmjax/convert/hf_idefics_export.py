"""Export a vlmjax `FusionLM` to a Hugging Face `IdeficsForVisionText2Text` (Idefics v1) directory.

    config = export_hf_idefics(model_or_model_config, params, out_dir, dtype="float32",
                               tokenizer_dir=None, max_shard_bytes=5 * 2**30)

writes config.json (`hf_config_from_idefics`, a transformers-5 IdeficsConfig) and
model.safetensors (or shards with model.safetensors.index.json), one tensor at a time, under the
names convert.hf_idefics reads; `IdeficsForVisionText2Text.from_pretrained(out_dir)` computes the
same logits given the media mask FusionLM derives (IdeficsProcessor's). The vision tower has
the blocks FusionLM builds (up to vision_feature_layer, whose output HF's last_hidden_state then
is) and an identity post_layernorm (only HF's pooled output reads it). The tokenizer,
generation and processor files of `tokenizer_dir` come along; config.json has no image token
(IdeficsConfig has none): a re-import reads it from those tokenizer files.

The model is a FusionLM instance or its model config (convert.hf_idefics: the FusionLM
arguments, INFO_KEYS optional). What HF's Idefics cannot compute is refused naming every
option that differs: another vision tower or a feature layer list, the class token dropped,
a resampler other than Idefics' (LayerNorm eps 1e-5, 4x ReLU MLP), cross-attention blocks with
other widths, kinds or norms than the LM's, skip_without_media, all-media masks, an end of chunk
other than the eos, a Decoder that is not a multi-head Llama without biases.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vlmjax.convert.hf_decoder_config import hf_config_from_decoder
from vlmjax.convert.hf_decoder_export import EXPORT_DTYPES
from vlmjax.convert.hf_export import HF_ACTIVATIONS
from vlmjax.convert.hf_idefics import (ADDED_EMBEDDING, ARCHITECTURE, MODEL_TYPE,
                                       RESAMPLER_FIXED, fusion_entries, lm_config)
from vlmjax.convert.hf_llava import built_blocks
from vlmjax.convert.hf_llava_export import (_image_side, _llm_tensors, vision_family,
                                            write_hf_directory)
from vlmjax.convert.params import flatten
from vlmjax.models import scan_layout
from vlmjax.models.cross_attention import GatedCrossAttention
from vlmjax.models.decoder import Decoder
from vlmjax.models.fusion import FusionLM, PerceiverResampler
from vlmjax.models.two_towers import with_defaults
from vlmjax.models.vit import ViT

# What HF's IdeficsForVisionText2Text computes, as FusionLM options.
FUSION_REQUIREMENTS = {"vision_arch": "vit", "vision_feature_select_strategy": "full",
                       "only_attend_immediate_media": True}
# Cross-attention block options that must be the LM's own (HF builds them from the text config).
SHARED_WITH_LM = ("num_heads", "head_dim", "mlp_dim", "activation", "mlp", "norm", "norm_eps")
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
             "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id",
             "pad_token_id")


def fusion_config_of(model) -> dict:
    """A FusionLM instance or a model config -> a model config (plain dicts)."""
    if isinstance(model, FusionLM):
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                  if f.init and f.name not in ("parent", "name", "dtype")}
        return {**fields, "vision": dict(model.vision), "llm": dict(model.llm),
                **{k: None if fields[k] is None else dict(fields[k])
                   for k in ("resampler", "cross_attention")}}
    return dict(model)


def _lm_problems(llm: Mapping[str, Any]) -> list[str]:
    full = with_defaults(Decoder, llm)
    heads = full["num_heads"]
    wanted = dict(norm="rmsnorm", mlp="gated", mlp_bias=False, qkv_bias=False, out_bias=False,
                  position_embedding="rope", sliding_window=None, scan_layers=False)
    wrong = [f"llm.{k}={full[k]!r} (HF: {v!r})" for k, v in wanted.items() if full[k] != v]
    if (full["num_kv_heads"] or heads) != heads:
        wrong.append(f"llm.num_kv_heads={full['num_kv_heads']} (HF: num_heads={heads})")
    if full["head_dim"] not in (None, full["width"] // heads) or full["width"] % heads:
        wrong.append(f"llm.head_dim={full['head_dim']} (HF: width / num_heads)")
    return wrong


def _cross_problems(config: Mapping[str, Any], llm: Mapping[str, Any]) -> list[str]:
    every, depth = int(config.get("cross_attn_every", 1)), int(llm["depth"])
    wrong = [] if depth % every == 0 else [
        f"cross_attn_every={every} (HF: a divisor of the LM's depth {depth})"]
    own = dict(config.get("cross_attention") or {})
    lm = with_defaults(Decoder, llm)
    lm_values = dict(num_heads=lm["num_heads"], head_dim=lm["head_dim"] or lm["width"] //
                     lm["num_heads"], mlp_dim=lm["mlp_dim"], activation=lm["activation"],
                     mlp=lm["mlp"], norm=lm["norm"], norm_eps=lm["norm_eps"])
    wrong += [f"cross_attention.{k}={own[k]!r} (HF: the LM's {lm_values[k]!r})"
              for k in SHARED_WITH_LM if k in own and own[k] != lm_values[k]]
    if with_defaults(GatedCrossAttention, own)["skip_without_media"]:
        wrong.append("cross_attention.skip_without_media=True (HF: False, the gated FFN "
                     "applies to tokens that see no image)")
    return wrong


def _resampler_problems(resampler: Mapping[str, Any] | None) -> list[str]:
    if resampler is None:
        return []
    full = with_defaults(PerceiverResampler, resampler)
    return [f"resampler.{k}={full[k]!r} (HF: {v!r})" for k, v in RESAMPLER_FIXED.items()
            if full[k] != v]


def check_expressible(config: Mapping[str, Any]) -> None:
    """Raises naming every option HF's Idefics cannot compute."""
    full = with_defaults(FusionLM, config)
    wrong = [f"{k}={full.get(k)!r} (HF: {v!r})" for k, v in FUSION_REQUIREMENTS.items()
             if full.get(k) != v]
    if not isinstance(full.get("vision_feature_layer"), (int, np.integer)):
        wrong.append(f"vision_feature_layer={full.get('vision_feature_layer')!r} (HF: one "
                     "layer, an int)")
    if full.get("vision_arch") == "vit":
        try:
            if vision_family(full["vision"]) != "clip":
                wrong.append("vision: a SigLIP tower (HF: a CLIP ViT with a class token)")
        except ValueError as e:
            wrong.append(str(e))
    eos, end = config.get("eos_id"), full.get("end_of_chunk_id")
    if end is None and eos is not None:
        wrong.append(f"end_of_chunk_id=None (HF: IdeficsProcessor ends chunks at the eos, "
                     f"eos_id={eos})")
    elif end is not None and eos is not None and end != eos:
        wrong.append(f"end_of_chunk_id={end} (HF: the eos, eos_id={eos})")
    wrong += _lm_problems(full["llm"]) + _cross_problems(full, full["llm"])
    wrong += _resampler_problems(full.get("resampler"))
    if wrong:
        raise ValueError("this model cannot be exported as an HF Idefics model: HF's "
                         f"{ARCHITECTURE} computes otherwise: " + ", ".join(wrong))


def hf_config_from_idefics(model_config: Mapping[str, Any], vision_params: Mapping[str, Any],
                           dtype: str = "float32") -> dict:
    """The config.json dict of the HF Idefics model of `model_config` (FusionLM arguments,
    INFO_KEYS optional); `vision_params` give the image size."""
    check_expressible(model_config)
    vision = with_defaults(ViT, model_config["vision"])
    blocks = built_blocks(with_defaults(FusionLM, model_config))  # up to the feature layer
    end = model_config.get("end_of_chunk_id")
    lm = {**lm_config(model_config), "eos_id": model_config.get("eos_id", end) if end is None
          else end}
    text = hf_config_from_decoder(lm, dtype)
    side = _image_side(np.shape(vision_params["posemb"]["pos_embedding"]), vision, "clip")
    cross = dict(model_config.get("cross_attention") or {})
    resampler = model_config.get("resampler")
    perceiver = {"model_type": "idefics_perciever", "use_resampler": resampler is not None}
    if resampler is not None:
        full = with_defaults(PerceiverResampler, resampler)
        perceiver.update(resampler_n_latents=int(full["num_latents"]),
                         resampler_depth=int(full["depth"]),
                         resampler_n_heads=int(full["num_heads"]),
                         resampler_head_dim=int(full["head_dim"]),
                         qk_layer_norms_perceiver=bool(full["qk_norm"]))
    return dict(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, dtype=dtype,
        **{k: text[k] for k in TEXT_KEYS},
        additional_vocab_size=int(model_config.get("additional_vocab_size", 0)),
        alpha_type=cross.get("gate", "float"), qk_layer_norms=bool(cross.get("qk_norm", False)),
        cross_layer_interval=int(model_config.get("cross_attn_every", 1)),
        use_resampler=resampler is not None, perceiver_config=perceiver,
        vision_config=dict(
            model_type="idefics_vision", embed_dim=int(vision["width"]), image_size=side,
            intermediate_size=int(vision["mlp_dim"] or 4 * vision["width"]),
            patch_size=int(vision["patch_size"]), num_hidden_layers=blocks,
            num_attention_heads=int(vision["num_heads"]), num_channels=3,
            hidden_act=HF_ACTIVATIONS[vision["activation"]],
            layer_norm_eps=float(vision["norm_eps"])))


def _fusion_tensors(params: Mapping[str, Any], model_config: Mapping[str, Any]) -> list:
    """[(HF name, HF shape, produce())] of every tensor outside the Llama LM's own table, and
    an identity post_layernorm."""
    flat = flatten(params)
    entries = [e for e in fusion_entries(model_config) if e.hf != ADDED_EMBEDDING
               or e.vlmjax == "additional_embed"]  # tied: the head is not written
    if model_config["llm"].get("tie_embeddings") and model_config.get("additional_vocab_size"):
        head, embed = np.asarray(flat["additional_head/kernel"]), np.asarray(
            flat["additional_embed"])
        if not np.array_equal(head, embed.T):
            raise ValueError("llm.tie_embeddings is set but additional_head is not "
                             "additional_embed transposed: HF ties them (tie_word_embeddings)")
    ours = {e.vlmjax for e in fusion_entries(model_config)}
    have = {k for k in flat if not k.startswith("llm/") or "/xattn" in k}
    if ours != have:
        raise ValueError(f"params do not match the model config: missing "
                         f"{sorted(ours - have)[:10]}, unused {sorted(have - ours)[:10]}")
    out = [(e.hf, e.layout.to_hf(np.asarray(flat[e.vlmjax], np.float32), e.heads).shape,
            lambda e=e: e.layout.to_hf(np.asarray(flat[e.vlmjax], np.float32), e.heads))
           for e in entries]
    width = int(model_config["vision"]["width"])
    return out + [
        ("model.vision_model.post_layernorm.weight", (width,), lambda: np.ones(width, np.float32)),
        ("model.vision_model.post_layernorm.bias", (width,), lambda: np.zeros(width, np.float32))]


def export_hf_idefics(model, params: Mapping[str, Any], out_dir: str, dtype: str = "float32",
                      tokenizer_dir: str | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> dict:
    """Writes the HF Idefics directory of a FusionLM (an instance or its model config) and its
    params (see the module docstring); returns the config.json dict."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    model_config = fusion_config_of(model)
    params = nn.meta.unbox(dict(params))
    config = hf_config_from_idefics(model_config, params["vision"], dtype)
    params = {**params, "vision": scan_layout.to_unrolled(dict(params["vision"]))}
    lm = {k: v for k, v in params["llm"].items() if k != "layers"}
    lm["layers"] = {k: v for k, v in params["llm"]["layers"].items()
                    if not k.startswith("xattn")}
    tensors = _fusion_tensors(params, model_config) + _llm_tensors(lm, lm_config(model_config))
    write_hf_directory(out_dir, config, tensors, dtype, max_shard_bytes, tokenizer_dir)
    return config
