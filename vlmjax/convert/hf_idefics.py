"""Hugging Face `IdeficsForVisionText2Text` (Idefics v1) -> vlmjax `FusionLM` (import; the export
back is convert.hf_idefics_export).

    model, params, model_config = load_hf_idefics(directory, shardings=None, dtype=jnp.float32)
    model_config = idefics_config_from_hf(config_json_dict)   # the config alone
    model = build_fusion_lm(model_config, dtype)

The model config is the FusionLM arguments (`fusion_lm_kwargs` drops the rest) plus INFO_KEYS:
model_type "idefics", image_size [H, W], image_mean / image_std (preprocessor_config.json's, else
Idefics' processor defaults, CLIP's), the LM's bos_id / eos_id / pad_id /
max_position_embeddings and fake_image_token_id (the tokenizer's <fake_token_around_image>, or
None).

config.json (an IdeficsConfig):
  vision_config (idefics_vision: a CLIP ViT) -> `vision`, read at its last block's output before
    post_layernorm with the class token (vision_feature_layer -1, 'full': HF's last_hidden_state);
  use_resampler + perceiver_config -> `resampler` (PerceiverResampler: LayerNorm eps 1e-5, MLP
    4 x the vision width, ReLU, qk_layer_norms_perceiver -> qk_norm), or None;
  the text keys (vocab_size, hidden_size, ..., rope_parameters) -> `llm`, a Llama Decoder
    (convert.hf_decoder_config; multi-head attention, no biases);
  cross_layer_interval -> cross_attn_every (num_hidden_layers must be a multiple: HF indexes
    past its blocks otherwise); alpha_type -> cross_attention.gate ('float' | 'vector');
    qk_layer_norms -> cross_attention.qk_norm; skip_without_media False (HF zeroes only the
    attention output of a token that sees no image; the gated FFN still applies);
  additional_vocab_size -> additional_vocab_size (decoupled embedding and lm_head rows);
  eos_token_id -> end_of_chunk_id (IdeficsProcessor ends an image's chunk at the tokenizer's eos).
image_token_id: config.json's `image_token_id` if set, else the tokenizer's "<image>"
(tokenizer.json, tokenizer_config.json or added_tokens.json), else the last added id
(vocab_size + additional_vocab_size - 1: a fallback for a directory without tokenizer files,
not read from anywhere); with neither an added vocabulary nor a tokenizer it is an error. Only
media masks derived from the tokens use it.
Other values FusionLM cannot express: a ValueError naming the field and what is supported.

Weights (safetensors, read and placed tensor by tensor): model.vision_model.X -> vision/ (CLIP's
table; post_layernorm, which last_hidden_state never reaches, is skipped),
model.perceiver_resampler.X -> perceiver/, model.gated_cross_attn_layers.{j}.X ->
llm/layers/xattn{j}/, model.embed_tokens.additional_embedding / lm_head.additional_fc ->
additional_embed / additional_head, and model.{embed_tokens, layers, norm}, lm_head -> llm/
(convert.hf_decoder's Llama table). With tie_word_embeddings the added rows' head is their
embedding transposed, as HF ties it.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.convert import hf, hf_io, hf_names
from vlmjax.convert.hf_decoder import IGNORED_SUFFIXES, open_tensors, stream_params
from vlmjax.convert.hf_decoder_config import decoder_config_from_hf, decoder_kwargs
from vlmjax.convert.hf_llava import LLMTensors, _flat_shardings, built_blocks, vision_from_hf
from vlmjax.convert.params import flatten, unflatten
from vlmjax.models.cross_attention import GATES
from vlmjax.models.fusion import FusionLM
from vlmjax.models.two_towers import with_defaults

ARCHITECTURE = "IdeficsForVisionText2Text"
MODEL_TYPE = "idefics"
INFO_KEYS = ("model_type", "image_size", "image_mean", "image_std", "bos_id", "eos_id",
             "pad_id", "max_position_embeddings", "fake_image_token_id")
IMAGE_TOKEN, FAKE_IMAGE_TOKEN = "<image>", "<fake_token_around_image>"
# transformers' IdeficsConfig / IdeficsVisionConfig / IdeficsPerceiverConfig defaults, for
# config.json files that leave values out.
DEFAULTS = dict(vocab_size=32000, additional_vocab_size=0, hidden_size=4096,
                intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                hidden_act="silu", alpha_type="float", rms_norm_eps=1e-6, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                cross_layer_interval=1, qk_layer_norms=False, use_resampler=False,
                max_position_embeddings=2048)
VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14,
                       num_hidden_layers=32, num_attention_heads=16, num_channels=3,
                       hidden_act="gelu", layer_norm_eps=1e-5)
PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=False)
# What HF's IdeficsPerceiverResampler always is (torch LayerNorm's eps, a 4x ReLU MLP).
RESAMPLER_FIXED = dict(mlp_ratio=4, activation="relu", norm_eps=1e-5)
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
             "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
             "pad_token_id", "max_position_embeddings")
VISION_PREFIX = "model.vision_model."


# ----------------------------------------------------------------------------------- config
def _vision_from_hf(vision_config: Mapping[str, Any] | None, where: str) -> tuple[dict, list]:
    """(ViT kwargs, image size) of an idefics_vision config: CLIP's vision transformer."""
    given = dict(vision_config or {})
    vision = {**VISION_DEFAULTS, **given}
    # IdeficsVisionConfig's name for the width is embed_dim (hidden_size: an alias)
    vision["hidden_size"] = given.get("embed_dim", given.get("hidden_size",
                                                             VISION_DEFAULTS["embed_dim"]))
    vision.pop("embed_dim")
    vision["model_type"] = "clip_vision_model"
    _, kwargs, size = vision_from_hf(vision, f"{where} vision_config")
    return kwargs, size


def _resampler_from_hf(hf_config: Mapping[str, Any]) -> dict | None:
    if not hf_config["use_resampler"]:  # the top-level flag is the one IdeficsModel reads
        return None
    perceiver = {**PERCEIVER_DEFAULTS, **dict(hf_config.get("perceiver_config") or {})}
    return dict(num_latents=int(perceiver["resampler_n_latents"]),
                depth=int(perceiver["resampler_depth"]),
                num_heads=int(perceiver["resampler_n_heads"]),
                head_dim=int(perceiver["resampler_head_dim"]),
                qk_norm=bool(perceiver["qk_layer_norms_perceiver"]), **RESAMPLER_FIXED)


def _text_from_hf(hf_config: Mapping[str, Any], where: str) -> dict:
    """The Llama model config of Idefics' language model (its keys are at the top level)."""
    heads, width = int(hf_config["num_attention_heads"]), int(hf_config["hidden_size"])
    if width % heads:
        raise ValueError(f"{where}: hidden_size {width} is not a multiple of num_attention_heads "
                         f"{heads}")
    text = {k: hf_config[k] for k in TEXT_KEYS if hf_config.get(k) is not None}
    return decoder_config_from_hf({**text, "model_type": "llama"}, f"{where} (text)")


def idefics_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json",
                           token_ids: Mapping[str, int] | None = None) -> dict:
    """config.json dict -> model config (FusionLM arguments + INFO_KEYS). `token_ids`: the
    tokenizer's {"<image>": id, "<fake_token_around_image>": id} where known. image_mean /
    image_std are Idefics' processor defaults here: load_hf_idefics reads
    preprocessor_config.json."""
    if hf_config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not "
                         f"{MODEL_TYPE!r}")
    archs = hf_config.get("architectures") or [ARCHITECTURE]
    if ARCHITECTURE not in archs:
        raise ValueError(f"{where}: architectures {archs} are not supported; expected "
                         f"[{ARCHITECTURE!r}] (IdeficsModel has no lm_head)")
    top = {**DEFAULTS, **dict(hf_config)}
    if top["alpha_type"] not in GATES:
        raise ValueError(f"{where}: alpha_type {top['alpha_type']!r} is not supported; "
                         f"supported: {list(GATES)}")
    depth, every = int(top["num_hidden_layers"]), top["cross_layer_interval"]
    if not isinstance(every, int) or every < 1 or depth % every:
        raise ValueError(f"{where}: cross_layer_interval {every!r} must be a positive divisor of "
                         f"num_hidden_layers {depth} (IdeficsModel builds num_hidden_layers // "
                         "cross_layer_interval blocks and uses one before every interval-th "
                         "layer)")
    added = top["additional_vocab_size"]
    if not isinstance(added, int) or added < 0:
        raise ValueError(f"{where}: additional_vocab_size {added!r} must be an int >= 0")
    eos = top["eos_token_id"]
    if eos is not None and not isinstance(eos, int):
        raise ValueError(f"{where}: eos_token_id {eos!r} is not supported; supported: one int "
                         "or none (IdeficsProcessor ends an image's chunk at the tokenizer's eos)")
    decoder = _text_from_hf(top, where)
    vision, image_size = _vision_from_hf(top.get("vision_config"), where)
    vocab, token_ids = decoder["vocab_size"], dict(token_ids or {})
    image_token = top.get("image_token_id")
    if image_token is None:
        image_token = token_ids.get(IMAGE_TOKEN)
    if image_token is None:
        if not added:
            raise ValueError(f"{where}: no image token id: config.json has no image_token_id, "
                             f"the tokenizer no {IMAGE_TOKEN!r} and additional_vocab_size is 0")
        image_token = vocab + added - 1
    if not isinstance(image_token, int) or not 0 <= image_token < vocab + added:
        raise ValueError(f"{where}: image token id {image_token!r} must be in [0, "
                         f"{vocab + added}) (vocab_size + additional_vocab_size)")
    mean, std = hf.IMAGE_NORMALISATION["clip"]  # IDEFICS_STANDARD_MEAN / _STD
    return dict(
        vision=vision, vision_arch="vit", vision_feature_layer=-1,
        vision_feature_select_strategy="full", resampler=_resampler_from_hf(top),
        cross_attention=dict(qk_norm=bool(top["qk_layer_norms"]), gate=top["alpha_type"],
                             skip_without_media=False),
        cross_attn_every=every, llm=decoder_kwargs(decoder), image_token_id=int(image_token),
        end_of_chunk_id=eos, only_attend_immediate_media=True, additional_vocab_size=added,
        model_type=MODEL_TYPE, image_size=list(image_size), image_mean=list(mean),
        image_std=list(std), fake_image_token_id=token_ids.get(FAKE_IMAGE_TOKEN),
        **{k: decoder[k] for k in ("bos_id", "eos_id", "pad_id", "max_position_embeddings")})


def lm_config(model_config: Mapping[str, Any]) -> dict:
    """The hf_decoder model config of the language model (a Llama)."""
    info = ("bos_id", "eos_id", "pad_id", "max_position_embeddings")
    return {**dict(model_config["llm"]), "model_type": "llama",
            **{k: model_config.get(k) for k in info}}


def fusion_lm_kwargs(model_config: Mapping[str, Any]) -> dict:
    """The FusionLM arguments of a model config (INFO_KEYS and a trainer's `dtype` dropped)."""
    return {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}


def build_fusion_lm(model_config: Mapping[str, Any], dtype=jnp.float32) -> FusionLM:
    try:
        return FusionLM(**fusion_lm_kwargs(model_config), dtype=dtype)
    except TypeError as e:  # an unknown key in a hand-edited config
        raise ValueError(f"model config is not a set of FusionLM arguments: {e}") from e


def abstract_fusion_params(model_config: Mapping[str, Any]) -> dict:
    """Nested ShapeDtypeStructs of the (unboxed) params for images of model_config's size."""
    model = build_fusion_lm(model_config)
    height, width = model_config["image_size"]
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
        images=jnp.zeros((1, 1, height, width, 3), jnp.float32)))
    return nn.meta.unbox(shapes)["params"]


def tokenizer_token_ids(directory: str | None) -> dict[str, int]:
    """{token: id} of the added tokens in a directory's tokenizer files (empty without)."""
    ids: dict[str, int] = {}
    if not directory:
        return ids
    path = os.path.join(directory, "added_tokens.json")
    if os.path.isfile(path):
        ids.update({str(k): int(v) for k, v in hf_io.read_json(path).items()})
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        decoder = hf_io.read_json(path).get("added_tokens_decoder") or {}
        ids.update({v["content"]: int(k) for k, v in decoder.items() if "content" in v})
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        ids.update({t["content"]: int(t["id"]) for t in
                    hf_io.read_json(path).get("added_tokens") or [] if "content" in t})
    return ids


# ---------------------------------------------------------------------------------- weights
def _gate_layout(gate: str) -> hf_names.Layout:
    """HF alphas are [1] ('float') or [1, 1, D] ('vector'); ours [] or [D]."""
    if gate == "float":
        return hf_names.SCALAR1
    return hf_names.Layout(lambda t, h: t.reshape(-1), lambda f, h: f.reshape(1, 1, -1))


def _heads_entries(hf_prefix: str, ours: str, heads: int, names) -> list[hf_names.Entry]:
    """q/k/v [H*K, E] -> [E, H, K] and the output [E, H*K] -> [H, K, E], no biases."""
    (q, k, v, out) = names
    return [hf_names.Entry(f"{hf_prefix}.{q}.weight", f"{ours}/query/kernel",
                           hf_names.QKV_KERNEL, heads),
            hf_names.Entry(f"{hf_prefix}.{k}.weight", f"{ours}/key/kernel",
                           hf_names.QKV_KERNEL, heads),
            hf_names.Entry(f"{hf_prefix}.{v}.weight", f"{ours}/value/kernel",
                           hf_names.QKV_KERNEL, heads),
            hf_names.Entry(f"{hf_prefix}.{out}.weight", f"{ours}/out/kernel",
                           hf_names.OUT_KERNEL, heads)]


def vision_entries(vision: Mapping[str, Any]) -> list[hf_names.Entry]:
    """The vision tower's tensors (CLIP's table under model.vision_model., no post_layernorm)
    for `vision["depth"]` blocks."""
    towers = {"image": dict(vision), "text": {"depth": 0, "num_heads": 1}}  # the image half
    return [hf_names.Entry(VISION_PREFIX + e.hf.removeprefix("vision_model."),
                           "vision/" + e.vlmjax.removeprefix("image_tower/"), e.layout, e.heads)
            for e in hf_names.weight_map("clip", towers)
            if e.hf.startswith("vision_model.")
            and not e.hf.startswith("vision_model.post_layernorm.")]


def resampler_entries(resampler: Mapping[str, Any]) -> list[hf_names.Entry]:
    top, entries = "model.perceiver_resampler", []
    entries.append(hf_names.Entry(f"{top}.latents", "perceiver/latents", hf_names.SAME))
    for i in range(int(resampler["depth"])):
        attn, mlp, ours = f"{top}.blocks.{i}.0", f"{top}.blocks.{i}.1", f"perceiver/block{i}"
        norms = [("context_layer_norm", "features_norm"), ("latents_layer_norm", "latents_norm")]
        if resampler.get("qk_norm"):
            norms += [("q_layer_norm", "q_norm"), ("k_layer_norm", "k_norm")]
        for hf_name, name in norms:
            entries += hf_names._norm(f"{attn}.{hf_name}", f"{ours}_attn/{name}")
        entries += _heads_entries(attn, f"{ours}_attn", int(resampler["num_heads"]),
                                  ("q_proj", "k_proj", "v_proj", "output_proj"))
        entries += hf_names._norm(f"{mlp}.ln", f"{ours}_mlp_norm")
        entries += hf_names._linear(f"{mlp}.fc", f"{ours}_fc", bias=False)
        entries += hf_names._linear(f"{mlp}.c_proj", f"{ours}_proj", bias=False)
    return entries + hf_names._norm(f"{top}.layer_norm", "perceiver/final_norm")


def cross_attention_entries(model_config: Mapping[str, Any]) -> list[hf_names.Entry]:
    """The gated cross-attention blocks (HF's IdeficsGatedCrossAttentionLayer)."""
    llm, cross = model_config["llm"], dict(model_config.get("cross_attention") or {})
    every, entries = int(model_config.get("cross_attn_every", 1)), []
    gate = _gate_layout(cross.get("gate", "float"))
    for j in range(-(-int(llm["depth"]) // every)):
        hf_prefix, ours = f"model.gated_cross_attn_layers.{j}", f"llm/layers/xattn{j}"
        entries += [hf_names.Entry(f"{hf_prefix}.alpha_cross_attn", f"{ours}/alpha_attn", gate),
                    hf_names.Entry(f"{hf_prefix}.alpha_dense", f"{ours}/alpha_ffn", gate)]
        entries += _heads_entries(f"{hf_prefix}.cross_attn", ours,
                                  int(cross.get("num_heads", llm["num_heads"])),
                                  ("q_proj", "k_proj", "v_proj", "o_proj"))
        if cross.get("qk_norm"):
            entries += [hf_names.Entry(f"{hf_prefix}.cross_attn.{n}_layer_norm.weight",
                                       f"{ours}/{n}_norm/scale", hf_names.SAME)
                        for n in ("q", "k")]
        entries += [hf_names.Entry(f"{hf_prefix}.mlp.{n}_proj.weight", f"{ours}/ffn/{n}/kernel",
                                   hf_names.DENSE) for n in ("gate", "up", "down")]
        entries += [hf_names.Entry(f"{hf_prefix}.input_layernorm.weight",
                                   f"{ours}/attn_norm/scale", hf_names.SAME),
                    hf_names.Entry(f"{hf_prefix}.post_attention_layernorm.weight",
                                   f"{ours}/mlp_norm/scale", hf_names.SAME)]
    return entries


ADDED_EMBEDDING = "model.embed_tokens.additional_embedding.weight"
ADDED_HEAD = "lm_head.additional_fc.weight"


def fusion_entries(model_config: Mapping[str, Any]) -> list[hf_names.Entry]:
    """Every tensor outside the Llama LM's own table (HF name -> FusionLM path). With tied
    embeddings the added rows' head reads the added embedding (transposed)."""
    entries = vision_entries({**dict(model_config["vision"]),
                              "depth": built_blocks(with_defaults(FusionLM, model_config))})
    if model_config.get("resampler") is not None:
        entries += resampler_entries(model_config["resampler"])
    entries += cross_attention_entries(model_config)
    if model_config.get("additional_vocab_size"):
        tied = model_config["llm"].get("tie_embeddings")
        entries += [hf_names.Entry(ADDED_EMBEDDING, "additional_embed", hf_names.SAME),
                    hf_names.Entry(ADDED_EMBEDDING if tied else ADDED_HEAD,
                                   "additional_head/kernel", hf_names.DENSE)]
    return entries


def _is_llm_tensor(name: str) -> bool:
    return (name.startswith(("model.layers.", "model.norm.", "lm_head.weight"))
            or name == "model.embed_tokens.weight")


def _split_names(tensors, model_config, where: str) -> list[str]:
    """The Llama LM's checkpoint names; raises on the other tensors that are missing or that
    the model does not have."""
    names = set(tensors.names())
    wanted = {e.hf for e in fusion_entries(model_config)}
    ignored = {ADDED_HEAD} if model_config["llm"].get("tie_embeddings") else set()
    llm = sorted(n for n in names if _is_llm_tensor(n))
    unused = sorted(n for n in names - wanted - set(llm) - ignored
                    if not n.startswith(VISION_PREFIX + "post_layernorm.")
                    and not n.endswith((*hf.IGNORED_BUFFERS, *IGNORED_SUFFIXES)))
    missing = sorted(wanted - names)
    if missing or unused:
        raise ValueError(f"{where}: the weights do not match an Idefics model of this "
                         f"config.json: missing {missing[:10]}; unused {unused[:10]}")
    return llm


def _check_coverage(model_config: Mapping[str, Any], abstract: Mapping, where: str) -> None:
    """The weight table must name every non-LM param of the model."""
    table = {e.vlmjax for e in fusion_entries(model_config)}
    ours = {k for k in abstract if not k.startswith("llm/") or "/xattn" in k}
    if table != ours:
        raise ValueError(f"{where}: the Idefics weight map does not cover the model's params: "
                         f"{sorted(table ^ ours)[:10]}")


def stream_fusion_params(tensors, model_config: Mapping[str, Any], shardings,
                         where: str) -> dict:
    """FusionLM params from an Idefics checkpoint, placed one tensor at a time: the tables of
    `fusion_entries`, then the LM (hf_decoder.stream_params). `shardings`: one sharding or a
    pytree matching the params."""
    abstract = flatten(abstract_fusion_params(model_config))
    _check_coverage(model_config, abstract, where)
    llm_names = _split_names(tensors, model_config, where)
    flat_shardings = _flat_shardings(shardings, abstract, "Idefics")
    out = {}
    for e in fusion_entries(model_config):
        value = e.layout.to_vlmjax(tensors.read(e.hf, np.float32), e.heads)
        want = tuple(abstract[e.vlmjax].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{where}: tensor {e.hf} converts to {tuple(value.shape)}, the "
                             f"model's {e.vlmjax} is {want}")
        # np.asarray keeps a 0-d gate 0-d (np.ascontiguousarray would make it [1])
        out[e.vlmjax] = jax.device_put(np.asarray(value, order="C"),
                                       flat_shardings[e.vlmjax]).block_until_ready()
        del value
    lm_shardings = unflatten({k.removeprefix("llm/"): v for k, v in flat_shardings.items()
                              if k.startswith("llm/") and "/xattn" not in k})
    lm = stream_params(LLMTensors(tensors, {n: n for n in llm_names}),
                       lm_config(model_config), lm_shardings, where)
    return unflatten({**out, **{f"llm/{k}": v for k, v in flatten(lm).items()}})


def load_hf_idefics(directory: str, shardings: Any = None,
                    dtype=jnp.float32) -> tuple[FusionLM, dict, dict]:
    """HF IdeficsForVisionText2Text directory -> (FusionLM with compute `dtype`, float32
    params, model config). `shardings`: one sharding, or a pytree matching the params."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"HF model directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    model_config = idefics_config_from_hf(hf_io.read_json(config_path), config_path,
                                          tokenizer_token_ids(directory))
    mean, std = hf.image_normalisation(directory, "clip")
    model_config.update(image_mean=mean, image_std=std)
    params = stream_fusion_params(open_tensors(directory), model_config, shardings, directory)
    return build_fusion_lm(model_config, dtype), params, model_config


def is_idefics_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict is an HF Idefics (v1) model (load_hf_idefics reads it or says
    why not)."""
    return (config.get("model_type") == MODEL_TYPE
            or ARCHITECTURE in (config.get("architectures") or []))


def is_idefics_source(directory: str) -> bool:
    """Whether an HF directory's config.json is an Idefics (v1) model."""
    return is_idefics_config(hf_io.read_json(os.path.join(directory, "config.json")))
