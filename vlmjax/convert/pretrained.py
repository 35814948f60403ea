"""`load_pretrained(SRC)`: a TwoTowers model, its params and its model config from an HF
directory, a big_vision `.npz`, a converted directory, or a trainer workdir (see
convert.workdir); and writing converted directories. Decoder LMs (HF LlamaForCausalLM /
Qwen2ForCausalLM / OPTForCausalLM, their converted directories, workdirs of task `lm`) go through
convert.decoder_pretrained and give a `Decoder`; HF LlavaForConditionalGeneration directories go
through convert.hf_llava and give a `PrefixLM`; HF BlipForImageTextRetrieval /
BlipForConditionalGeneration directories through convert.hf_blip and give a `Blip`; HF
Blip2ForConditionalGeneration directories through convert.hf_blip2 and give a `PrefixLM`; HF
IdeficsForVisionText2Text directories through convert.hf_idefics and give a `FusionLM`.

A converted directory holds
  config.json   {"format": FORMAT, "model": <model config>, "image": {"size": [H, W], "mean",
                "std"}, "tokenizer": <settings, see convert.tokenizer> or null, "source": {...}}
  params/       an orbax checkpoint of the params (restored straight into given shardings)
  tokenizer files copied from the source (tokenizer.json / spiece.model, ...).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.convert import decoder_pretrained as decoder_lib
from vlmjax.convert import (hf_align, hf_blip, hf_blip2, hf_idefics, hf_io, hf_llava,
                            llava_workdir, params as params_lib, posemb)
from vlmjax.convert import tokenizer as tok
from vlmjax.convert.big_vision import load_big_vision
from vlmjax.convert.hf import load_hf, model_config_from_hf
from vlmjax.convert.params import FORMAT, PARAMS_DIR, Pretrained
from vlmjax.convert.workdir import read_trainer_checkpoint, trainer_checkpoint

SOURCES = ("hf", "big_vision", "converted", "trainer")


def source_kind(src: str) -> str:
    """'hf', 'big_vision' or 'converted', from what SRC is."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"pretrained model {src} does not exist")
    if os.path.isfile(src) and src.endswith(".npz"):
        return "big_vision"
    if trainer_checkpoint(src) is not None:
        return "trainer"
    config_path = os.path.join(src, "config.json")
    if os.path.isdir(src) and os.path.exists(config_path):
        config = hf_io.read_json(config_path)
        if config.get("format") == FORMAT:
            return "converted"
        if "model_type" in config:
            return "hf"
    raise ValueError(f"{src} is not a pretrained model: expected an HF model directory "
                     "(config.json with model_type + weights), a big_vision .npz file, a "
                     f"directory written by `python -m vlmjax.convert import` (config.json with "
                     f"format {FORMAT!r}), or a trainer workdir / WORKDIR/checkpoints/<step>")


def read_source(src: str, kind: str | None = None, tokenizer_path: str | None = None
                ) -> Pretrained:
    """Reads an HF directory or a big_vision .npz into numpy params (not converted dirs)."""
    kind = kind or source_kind(src)
    if kind not in ("hf", "big_vision"):
        raise ValueError(f"cannot import from {kind!r}; use one of ['hf', 'big_vision']")
    if kind != source_kind(src):
        raise ValueError(f"{src} looks like a {source_kind(src)!r} source, not {kind!r}")
    if kind == "hf" and hf_align.is_align_source(src):  # ALIGN: its own table and tokenizer
        return hf_align.read_hf_align(src, tokenizer_path)
    loader = load_hf if kind == "hf" else load_big_vision
    flat, model_config, info = loader(src)
    image = {"size": info["image_size"], "mean": info["image_mean"], "std": info["image_std"]}
    text_len = model_config["text"]["max_len"]
    settings, tok_dir = None, None
    if tokenizer_path is not None:
        settings = tok.spm_tokenizer_settings(tokenizer_path, text_len)
        tok_dir = os.path.dirname(os.path.abspath(tokenizer_path))
    elif kind == "hf":
        settings, tok_dir = tok.hf_tokenizer_settings(src, info["family"], text_len), src
    source = {"kind": kind, "path": os.path.abspath(src), "family": info["family"]}
    return Pretrained(flat, model_config, image, settings, tok_dir, source)


def resized(pretrained: Pretrained, image_size: Sequence[int] | None) -> Pretrained:
    if image_size is None or list(image_size) == list(pretrained.image["size"]):
        return pretrained
    flat = posemb.resize_image_posemb(pretrained.params, pretrained.model_config,
                                      pretrained.image["size"], image_size)
    image = dict(pretrained.image, size=[int(s) for s in image_size])
    return Pretrained(flat, pretrained.model_config, image, pretrained.tokenizer,
                      pretrained.tokenizer_dir, pretrained.source)


def write_converted(pretrained: Pretrained, out_dir: str, overwrite: bool = False) -> None:
    params_lib.check_params(params_lib.unflatten(pretrained.params), pretrained.model_config,
                            pretrained.image["size"], pretrained.source["path"])
    decoder_lib.fresh_dir(out_dir, overwrite)
    import orbax.checkpoint as ocp

    ocp.v1.save(os.path.join(os.path.abspath(out_dir), PARAMS_DIR),
                params_lib.unflatten({k: np.asarray(v, np.float32)
                                      for k, v in pretrained.params.items()}))
    tok.copy_tokenizer_files(pretrained.tokenizer_dir, pretrained.tokenizer, out_dir)
    settings = tok.with_tokenizer_config(pretrained.tokenizer, pretrained.tokenizer_dir, out_dir)
    hf_io.write_json(os.path.join(out_dir, "config.json"), {
        "format": FORMAT, "model": pretrained.model_config, "image": pretrained.image,
        "tokenizer": settings, "source": pretrained.source})


def import_pretrained(src: str, out_dir: str, kind: str | None = None,
                      image_size: Sequence[int] | None = None,
                      tokenizer_path: str | None = None, overwrite: bool = False) -> dict:
    """HF dir / big_vision .npz -> converted directory. Returns its config.json dict."""
    if (kind or source_kind(src)) == "hf" and decoder_lib.is_decoder_source(src, "hf"):
        if image_size is not None or tokenizer_path is not None:
            raise ValueError(f"{src} is a decoder LM: image_size and tokenizer_path do not apply")
        return decoder_lib.import_decoder(src, out_dir, overwrite)
    pretrained = resized(read_source(src, kind, tokenizer_path), image_size)
    write_converted(pretrained, out_dir, overwrite)
    return hf_io.read_json(os.path.join(out_dir, "config.json"))


def _shardings_for(abstract: Any, shardings: Any) -> Any:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, abstract)
    return shardings


def _load_converted(directory: str, shardings: Any) -> tuple[dict, dict]:
    """(nested jax params restored into `shardings`, config.json dict)."""
    import orbax.checkpoint as ocp

    config = hf_io.read_json(os.path.join(directory, "config.json"))
    abstract = params_lib.abstract_params(config["model"], config["image"]["size"])
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, _shardings_for(abstract, shardings))
    path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/ orbax checkpoint")
    try:
        params = ocp.v1.load(path, placed)
    except Exception as e:  # orbax's structure errors do not say which directory
        raise ValueError(f"the params in {path} do not fit the model in "
                         f"{directory}/config.json: {e}") from e
    return params, config


def read_pretrained(src: str) -> Pretrained:
    """Any source (including converted dirs and trainer workdirs) as numpy `Pretrained`."""
    kind = source_kind(src)
    if decoder_lib.is_decoder_source(src, kind):
        return decoder_lib.read_decoder(src, kind)
    if kind == "trainer":
        return read_trainer_checkpoint(src)
    if kind != "converted":
        return read_source(src)
    params, config = _load_converted(src, None)
    flat = {k: np.asarray(v) for k, v in params_lib.flatten(params).items()}
    return Pretrained(flat, config["model"], config["image"], config["tokenizer"], src,
                      config["source"])


def load_pretrained(src: str, *, image_size: Sequence[int] | None = None,
                    shardings: Any = None, dtype=jnp.float32, scan_layers: bool | None = None):
    """-> (model, params, model_config) from an HF directory, a big_vision .npz, a converted
    directory or a trainer workdir / checkpoint directory.

    Decoder LMs (HF Llama / Qwen2, their converted directories, `lm` workdirs): `model` is a
    `Decoder`, `params` float32 streamed tensor by tensor into `shardings`, `model_config` the
    Decoder arguments plus model_type / bos_id / eos_id / pad_id / max_position_embeddings
    (convert.hf_decoder_config); `scan_layers` (default: the layout of `shardings`) stacks the
    layers.

    HF LLaVA (LlavaForConditionalGeneration): `model` is a `PrefixLM`, `model_config` its
    arguments plus image size / mean / std and the LLM's special ids (convert.hf_llava). A
    `llava` workdir: a `PrefixLM` too, with the run's image size, tokenizer and chat template
    (convert.llava_workdir).

    HF BLIP (BlipForImageTextRetrieval / BlipForConditionalGeneration): `model` is a `Blip`
    with the encoder or the decoder part, `model_config` its arguments plus the HF class, image
    size / mean / std and the text special ids (convert.hf_blip).

    HF BLIP-2 (Blip2ForConditionalGeneration): `model` is a `PrefixLM` with the Q-Former
    projector, `model_config` its arguments plus image size / mean / std and the LLM's special
    ids (convert.hf_blip2).

    HF Idefics v1 (IdeficsForVisionText2Text): `model` is a `FusionLM` (Perceiver resampler,
    gated cross-attention blocks), `model_config` its arguments plus image size / mean / std and
    the LM's special ids (convert.hf_idefics).

    `model` is a `TwoTowers` (compute `dtype`); `params` are float32 jax arrays placed by
    `shardings` (a pytree of shardings matching the params, or one sharding for all) when given;
    `model_config` is the JSON-serialisable dict of TwoTowers arguments. `image_size` (H, W)
    resizes the learned image position embedding for another resolution.
    """
    kind = source_kind(src)
    if kind == "hf" and hf_llava.is_llava_source(src):
        if image_size is not None:
            raise ValueError(f"{src} is a LLaVA model: image_size does not apply")
        return hf_llava.load_hf_llava(src, shardings, dtype, scan_layers)
    if kind == "hf" and hf_blip.is_blip_source(src):
        if image_size is not None:
            raise ValueError(f"{src} is a BLIP model: image_size does not apply")
        return hf_blip.load_hf_blip(src, shardings, dtype)
    if kind == "hf" and hf_blip2.is_blip2_source(src):
        if image_size is not None or scan_layers:
            raise ValueError(f"{src} is a BLIP-2 model: image_size and scan_layers do not apply")
        return hf_blip2.load_hf_blip2(src, shardings, dtype)
    if kind == "hf" and hf_idefics.is_idefics_source(src):
        if image_size is not None or scan_layers:
            raise ValueError(f"{src} is an Idefics model: image_size and scan_layers do not "
                             "apply")
        return hf_idefics.load_hf_idefics(src, shardings, dtype)
    if decoder_lib.is_decoder_source(src, kind):
        if image_size is not None:
            raise ValueError(f"{src} is a decoder LM: image_size does not apply")
        return decoder_lib.load_decoder(src, kind, shardings, dtype, scan_layers)
    if kind == "trainer" and llava_workdir.is_llava_workdir(src):
        if image_size is not None:
            raise ValueError(f"{src} is a LLaVA run: image_size does not apply")
        return llava_workdir.load_llava_workdir(src, shardings, dtype)
    if kind == "converted":
        stored_size = hf_io.read_json(os.path.join(src, "config.json"))["image"]["size"]
        if image_size is None or list(image_size) == stored_size:
            params, config = _load_converted(src, shardings)  # straight into the shardings
            return params_lib.build_model(config["model"], dtype), params, config["model"]
    pretrained = resized(read_pretrained(src), image_size)
    model_config = pretrained.model_config
    params = params_lib.unflatten(pretrained.params)
    params_lib.check_params(params, model_config, pretrained.image["size"], src)
    params = params_lib.to_device(params, shardings)
    return params_lib.build_model(model_config, dtype), params, model_config


def load_pretrained_tokenizer(src: str):
    """-> (tokenizer, settings) for an HF directory or a converted directory; encode with
    `tokenizer.encode_batch(texts, settings["max_len"], settings["add_bos"], settings["eos"])`
    and pass the mask to the model only if `settings["text_mask"]`."""
    kind = source_kind(src)
    if decoder_lib.is_decoder_source(src, kind):
        settings = decoder_lib.read_decoder_tokenizer_settings(src, kind)
    elif kind == "hf" and hf_align.is_align_source(src):
        settings = hf_align.tokenizer_settings(src, hf_align.model_config_from_hf(
            hf_io.read_json(os.path.join(src, "config.json")))[0]["text"]["max_len"])
    elif kind == "hf":
        config_path = os.path.join(src, "config.json")
        model_config, info = model_config_from_hf(hf_io.read_json(config_path), config_path)
        settings = tok.hf_tokenizer_settings(src, info["family"], model_config["text"]["max_len"])
    elif kind == "converted":
        settings = hf_io.read_json(os.path.join(src, "config.json"))["tokenizer"]
    else:
        settings = None
    if settings is None:
        raise FileNotFoundError(f"{src} has no tokenizer: expected one of {tok.TOKENIZER_FILES} "
                                "(a big_vision .npz needs `import --tokenizer spiece.model`)")
    return tok.open_tokenizer(src, settings), settings
