"""Hugging Face Llama / Qwen2 / OPT config.json <-> the model config of a vlmjax `Decoder`.

The model config is the JSON-able dict of `Decoder` arguments plus `INFO_KEYS` (the HF
`model_type`, `bos_id` / `eos_id` / `pad_id`, `max_position_embeddings`), which are not module
arguments: `decoder_kwargs(model_config)` drops them, `build_decoder` builds the module.

Import (`decoder_config_from_hf`): vocab_size, hidden_size -> width, num_hidden_layers -> depth,
num_attention_heads / num_key_value_heads -> num_heads / num_kv_heads, head_dim (explicit or
hidden / heads), intermediate_size -> mlp_dim, hidden_act, rms_norm_eps, `rope_parameters` (or
the legacy rope_theta + rope_scaling, which win as in transformers 5) -> rope_theta +
rope_scaling (default / linear / llama3), Qwen2's q/k/v bias, Llama's attention_bias (q/k/v and
o bias), tie_word_embeddings, and Qwen2's sliding window when every layer slides (none: no
window; a mix is refused). Export (`hf_config_from_decoder`) writes the inverse, with both the
transformers 5 `rope_parameters` and the legacy rope_theta / rope_scaling keys.

OPT (`opt_config_from_hf`): ffn_dim -> mlp_dim, activation_function, LayerNorm (eps 1e-5, torch's
default), a plain fc1/fc2 MLP, enable_bias -> q/k/v, out and MLP biases, learned positions with
OPT's offset of 2 (num_positions = max_position_embeddings + 2), tied lm_head by default. OPT-350m
(do_layer_norm_before=False, word_embed_proj_dim != hidden_size) is refused.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import rope
from vlmjax.models.decoder import Decoder

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",  # model_type ->
                 "opt": "OPTForCausalLM"}
INFO_KEYS = ("model_type", "bos_id", "eos_id", "pad_id", "max_position_embeddings")
# transformers' config defaults, for config.json files that leave values out.
HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "opt": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                max_position_embeddings=2048, do_layer_norm_before=True,
                num_attention_heads=12, activation_function="relu", pad_token_id=1,
                bos_token_id=2, eos_token_id=2, enable_bias=True,
                layer_norm_elementwise_affine=True, tie_word_embeddings=True),
}
OPT_POSITION_OFFSET = 2   # OPTLearnedPositionalEmbedding.offset: rows 0, 1 are never read
OPT_NORM_EPS = 1e-5       # torch.nn.LayerNorm's default, which OPT does not change
DEFAULT_ROPE_THETA = 10000.0
HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}  # HF hidden_act -> vlmjax


def decoder_family(hf_config: Mapping[str, Any], where: str = "config.json") -> str | None:
    """'llama' / 'qwen2' for a causal-LM config.json, None for other model types; raises for a
    Llama / Qwen2 config whose architecture is not the causal LM."""
    family = hf_config.get("model_type")
    if family not in ARCHITECTURES:
        return None
    archs = hf_config.get("architectures") or [ARCHITECTURES[family]]
    if ARCHITECTURES[family] not in archs:
        raise ValueError(f"{where}: architectures {archs} are not supported for model_type "
                         f"{family!r}; expected {ARCHITECTURES[family]} (supported: "
                         f"{sorted(ARCHITECTURES.values())})")
    return family


def rope_from_hf(hf_config: Mapping[str, Any], where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from `rope_parameters`, or from the legacy top-level
    rope_theta / rope_scaling (which win, as in transformers 5)."""
    params = dict(hf_config.get("rope_parameters") or {})
    params.update(hf_config.get("rope_scaling") or {})
    if hf_config.get("rope_theta") is not None:
        params["rope_theta"] = hf_config["rope_theta"]
    theta = float(params.pop("rope_theta", DEFAULT_ROPE_THETA))
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    if kind not in rope.ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported; supported rope types: "
                         f"{list(rope.ROPE_TYPES)}")
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported (RoPE rotates "
                         "the whole head dim)")
    scaling = None if kind == "default" else {"rope_type": kind, **params}
    try:
        rope.validate_rope_scaling(scaling)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return theta, scaling


def sliding_window_from_hf(hf: Mapping[str, Any], family: str, where: str) -> int | None:
    """Qwen2's window when every layer slides, None when none does; a mix is an error."""
    if family != "qwen2":
        return None
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    depth = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf["max_window_layers"]
        else "full_attention" for i in range(depth)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != depth:
        raise ValueError(f"{where}: layer_types {types} must be {depth} entries of "
                         "'full_attention' / 'sliding_attention'")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not all(sliding):
        layers = [i for i, s in enumerate(sliding) if s]
        raise ValueError(f"{where}: layers {layers} of {depth} use sliding-window attention and "
                         "the others full attention (use_sliding_window with max_window_layers="
                         f"{hf.get('max_window_layers')}); only all-sliding or no-sliding models "
                         "are supported")
    if all(sliding) and not hf.get("sliding_window"):
        raise ValueError(f"{where}: every layer is 'sliding_attention' but sliding_window is "
                         f"{hf.get('sliding_window')!r}")
    return int(hf["sliding_window"]) if all(sliding) else None


def decoder_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """HF config.json dict -> model config (Decoder arguments + INFO_KEYS)."""
    family = decoder_family(hf_config, where)
    if family is None:
        raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r} is not a "
                         f"supported decoder LM; expected one of {sorted(ARCHITECTURES)}")
    if family == "opt":
        return opt_config_from_hf(hf_config, where)
    hf = {**HF_DEFAULTS[family], **hf_config}
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=True is not supported (the SwiGLU MLP has no bias)")
    if hf["hidden_act"] not in HF_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; supported: "
                         f"{sorted(HF_ACTIVATIONS)}")
    heads = int(hf["num_attention_heads"])
    theta, scaling = rope_from_hf(hf, where)
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        vocab_size=int(hf["vocab_size"]), width=int(hf["hidden_size"]),
        depth=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]), activation=HF_ACTIVATIONS[hf["hidden_act"]],
        norm_eps=float(hf["rms_norm_eps"]), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=family == "qwen2" or attention_bias,
        out_bias=family == "llama" and attention_bias,
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        sliding_window=sliding_window_from_hf(hf, family, where),
        model_type=family, bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
        pad_id=hf.get("pad_token_id"), max_position_embeddings=hf.get("max_position_embeddings"))


def opt_config_from_hf(hf_config: Mapping[str, Any], where: str = "config.json") -> dict:
    """OPTForCausalLM config.json dict -> model config (see the module docstring)."""
    hf = {**HF_DEFAULTS["opt"], **hf_config}
    width, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if not hf["do_layer_norm_before"]:
        raise ValueError(f"{where}: do_layer_norm_before=False (OPT-350m's post-LayerNorm "
                         "blocks) is not supported; supported: do_layer_norm_before=True")
    projected = hf.get("word_embed_proj_dim") or width
    if projected != width:
        raise ValueError(f"{where}: word_embed_proj_dim {projected} != hidden_size {width} "
                         "(OPT-350m's project_in / project_out) is not supported; supported: "
                         "word_embed_proj_dim = hidden_size")
    if hf.get("_remove_final_layer_norm"):
        raise ValueError(f"{where}: _remove_final_layer_norm=True (pre-v4.20 fine-tunes) is not "
                         "supported; supported: False")
    if not hf["layer_norm_elementwise_affine"]:
        raise ValueError(f"{where}: layer_norm_elementwise_affine=False is not supported; "
                         "supported: True (LayerNorm with scale and bias)")
    if hf["activation_function"] not in HF_ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {hf['activation_function']!r} is not "
                         f"supported; supported: {sorted(HF_ACTIVATIONS)}")
    if width % heads:
        raise ValueError(f"{where}: hidden_size {width} is not a multiple of "
                         f"num_attention_heads {heads}")
    bias = bool(hf["enable_bias"])
    max_len = int(hf["max_position_embeddings"])
    return dict(
        vocab_size=int(hf["vocab_size"]), width=width, depth=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=heads, head_dim=width // heads,
        mlp_dim=int(hf["ffn_dim"]), activation=HF_ACTIVATIONS[hf["activation_function"]],
        norm="layernorm", norm_eps=OPT_NORM_EPS, mlp="plain", qkv_bias=bias, out_bias=bias,
        mlp_bias=bias, position_embedding="learned",
        num_positions=max_len + OPT_POSITION_OFFSET, position_offset=OPT_POSITION_OFFSET,
        tie_embeddings=bool(hf["tie_word_embeddings"]), model_type="opt",
        bos_id=hf.get("bos_token_id"), eos_id=hf.get("eos_token_id"),
        pad_id=hf.get("pad_token_id"), max_position_embeddings=max_len)


def decoder_kwargs(model_config: Mapping[str, Any]) -> dict:
    """The `Decoder` arguments of a model config (INFO_KEYS and a trainer's `dtype` dropped)."""
    return {k: v for k, v in model_config.items() if k not in (*INFO_KEYS, "dtype")}


def build_decoder(model_config: Mapping[str, Any], dtype=jnp.float32, **overrides) -> Decoder:
    try:
        return Decoder(**{**decoder_kwargs(model_config), "dtype": dtype, **overrides})
    except TypeError as e:  # an unknown key in a hand-edited config.json
        raise ValueError(f"model config is not a set of Decoder arguments: {e}") from e


def abstract_decoder_params(model_config: Mapping[str, Any]) -> dict:
    """Nested ShapeDtypeStructs of the (unboxed) params of the model config's Decoder."""
    model = build_decoder(model_config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.meta.unbox(shapes)["params"]


# ----------------------------------------------------------------------------------- export
def _with_defaults(model_config: Mapping[str, Any]) -> dict:
    """The model config with every Decoder argument it leaves out at its default."""
    return {**{f.name: f.default for f in Decoder.__dataclass_fields__.values()
               if f.name not in ("parent", "name")}, **dict(model_config)}


def _opt_mismatches(kwargs: Mapping[str, Any]) -> list[str]:
    """What keeps a Decoder (all arguments) from being an HF OPT model."""
    expected = dict(norm="layernorm", mlp="plain", position_embedding="learned",
                    position_offset=OPT_POSITION_OFFSET, sliding_window=None,
                    mlp_bias=kwargs["qkv_bias"], out_bias=kwargs["qkv_bias"])
    wrong = [f"{k}={kwargs[k]!r} (OPT: {v!r})" for k, v in expected.items() if kwargs[k] != v]
    heads = kwargs["num_heads"]
    if (kwargs["num_kv_heads"] or heads) != heads:
        wrong.append(f"num_kv_heads={kwargs['num_kv_heads']} (OPT: num_heads={heads})")
    if (kwargs["head_dim"] or kwargs["width"] // heads) * heads != kwargs["width"]:
        wrong.append(f"head_dim={kwargs['head_dim']} (OPT: width / num_heads)")
    if abs(float(kwargs["norm_eps"]) - OPT_NORM_EPS) > 1e-12:
        wrong.append(f"norm_eps={kwargs['norm_eps']} (OPT: {OPT_NORM_EPS})")
    return wrong


def hf_family_of_decoder(model_config: Mapping[str, Any]) -> str:
    """'llama', 'qwen2' or 'opt': the HF model that computes what this Decoder computes (the
    model config's own model_type where it can). Llama expresses any q/k/v/o bias (zeros where
    the Decoder has none); Qwen2 always has q/k/v bias, never o bias, and alone a sliding
    window; OPT has learned positions, LayerNorm and a plain MLP, all biased or none."""
    kwargs = _with_defaults(model_config)
    if model_config.get("model_type") == "opt" or kwargs["position_embedding"] == "learned":
        wrong = _opt_mismatches(kwargs)
        if wrong:
            raise ValueError(f"this Decoder is not an HF OPT model: {'; '.join(wrong)}")
        return "opt"
    llama_like = dict(norm="rmsnorm", mlp="gated", mlp_bias=False)
    wrong = [f"{k}={kwargs[k]!r}" for k, v in llama_like.items() if kwargs[k] != v]
    if wrong:
        raise ValueError(f"a RoPE Decoder with {', '.join(wrong)} is neither an HF Llama nor a "
                         f"Qwen2 model (they need {llama_like})")
    if kwargs["sliding_window"]:
        if kwargs["out_bias"]:
            raise ValueError("a Decoder with sliding_window and out_bias is neither an HF "
                             "Llama (no sliding window) nor a Qwen2 (no o_proj bias) model")
        return "qwen2"
    wanted = model_config.get("model_type")
    if wanted == "llama" or kwargs["out_bias"]:
        return "llama"
    return "qwen2" if wanted == "qwen2" or kwargs["qkv_bias"] else "llama"


def hf_config_from_decoder(model_config: Mapping[str, Any], dtype: str = "float32") -> dict:
    """The config.json dict of the HF model of `model_config` (weights saved as `dtype`)."""
    family = hf_family_of_decoder(model_config)
    if family == "opt":
        return hf_opt_config_from_decoder(model_config, dtype)
    model = build_decoder(model_config)
    activations = {v: k for k, v in reversed(HF_ACTIVATIONS.items())}  # first HF name wins
    if model.activation not in activations:
        raise ValueError(f"activation {model.activation!r} has no HF hidden_act; supported: "
                         f"{sorted(activations)}")
    scaling = dict(model.rope_scaling or {"rope_type": "default"})
    max_len = (model_config.get("max_position_embeddings")
               or HF_DEFAULTS[family]["max_position_embeddings"])
    config = dict(
        architectures=[ARCHITECTURES[family]], model_type=family, dtype=dtype,
        vocab_size=model.vocab_size, hidden_size=model.width,
        intermediate_size=model.mlp_dim, num_hidden_layers=model.depth,
        num_attention_heads=model.num_heads, num_key_value_heads=model.kv_heads,
        head_dim=model.dims_per_head, hidden_act=activations[model.activation],
        rms_norm_eps=float(model.norm_eps), max_position_embeddings=int(max_len),
        tie_word_embeddings=bool(model.tie_embeddings), use_cache=True,
        rope_parameters={**scaling, "rope_theta": float(model.rope_theta)},
        rope_theta=float(model.rope_theta),  # the legacy keys, for transformers 4 readers
        bos_token_id=model_config.get("bos_id"), eos_token_id=model_config.get("eos_id"),
        pad_token_id=model_config.get("pad_id"))
    if model.rope_scaling:
        config["rope_scaling"] = dict(scaling)
    if family == "llama":
        config.update(attention_bias=bool(model.qkv_bias or model.out_bias), mlp_bias=False)
    else:
        window = model.sliding_window
        config.update(use_sliding_window=bool(window), sliding_window=window,
                      max_window_layers=0 if window else model.depth,
                      layer_types=[("sliding_attention" if window else "full_attention")
                                   ] * model.depth)
    return config


def hf_opt_config_from_decoder(model_config: Mapping[str, Any], dtype: str = "float32") -> dict:
    """The OPTForCausalLM config.json dict of an OPT-shaped `model_config`."""
    model = build_decoder(model_config)
    activations = {v: k for k, v in reversed(HF_ACTIVATIONS.items())}
    if model.activation not in activations:
        raise ValueError(f"activation {model.activation!r} has no HF activation_function; "
                         f"supported: {sorted(activations)}")
    return dict(
        architectures=[ARCHITECTURES["opt"]], model_type="opt", dtype=dtype,
        vocab_size=model.vocab_size, hidden_size=model.width, word_embed_proj_dim=model.width,
        num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
        ffn_dim=model.mlp_dim, activation_function=activations[model.activation],
        max_position_embeddings=model.num_positions - OPT_POSITION_OFFSET,
        do_layer_norm_before=True, layer_norm_elementwise_affine=True,
        enable_bias=bool(model.qkv_bias), tie_word_embeddings=bool(model.tie_embeddings),
        use_cache=True, bos_token_id=model_config.get("bos_id"),
        eos_token_id=model_config.get("eos_id"), pad_token_id=model_config.get("pad_id"))


def hf_biases(family: str, model_config: Mapping[str, Any]) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) that the HF `family` checkpoint of this model config holds."""
    if family == "qwen2":
        return True, False
    if family == "opt":  # enable_bias: the Decoder's own (checked equal by hf_family_of_decoder)
        bias = bool(model_config.get("qkv_bias"))
        return bias, bias
    bias = bool(model_config.get("qkv_bias") or model_config.get("out_bias"))
    return bias, bias
