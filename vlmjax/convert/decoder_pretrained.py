"""Decoder LMs (Llama / Qwen2 / OPT family) as pretrained sources, beside the two-tower ones.

    model, params, model_config = load_decoder(src, kind, shardings=None, scan_layers=None)

SRC (`kind` as `pretrained.source_kind` names it):
  hf         an HF LlamaForCausalLM / Qwen2ForCausalLM / OPTForCausalLM directory, streamed
             tensor by tensor into `shardings` (hf_decoder.load_hf_decoder)
  converted  a directory written by `python -m vlmjax.convert import --from hf`:
             config.json {"format", "architecture": "decoder", "model": <model config>,
             "tokenizer": <settings> or null, "source"} + params/ (orbax, unrolled layers,
             restored straight into `shardings`) + the tokenizer files
  trainer    a workdir of task `lm` (or WORKDIR/checkpoints/<step>): WORKDIR/config.json's
             `model` (Decoder arguments + `dtype`) and the checkpoint's params

Layers come in the layout `scan_layers` asks for (default: the layout of `shardings`, else
the stored one), and `model_config["scan_layers"]` says which.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.convert import hf_io
from vlmjax.convert.hf_decoder import load_hf_decoder
from vlmjax.convert.hf_decoder_config import (abstract_decoder_params, build_decoder,
                                              decoder_config_from_hf, decoder_family)
from vlmjax.convert.hf_decoder_export import TOKENIZER_FILES, copy_tokenizer_files
from vlmjax.convert.params import FORMAT, PARAMS_DIR, Pretrained, flatten, unflatten
from vlmjax.convert.workdir import TRAINER_ONLY_MODEL_KEYS, trainer_checkpoint
from vlmjax.models import scan_layout

ARCHITECTURE = "decoder"   # converted config.json "architecture" (absent: two towers)
LM_TASKS = ("lm",)         # trainer tasks whose params are a Decoder's
BOS_FAMILIES = ("llama", "opt")  # whose tokenizers prepend BOS (OPT's is </s>) by default


def is_decoder_source(src: str, kind: str) -> bool:
    if kind == "hf":
        config_path = os.path.join(src, "config.json")
        return decoder_family(hf_io.read_json(config_path), config_path) is not None
    if kind == "converted":
        return hf_io.read_json(os.path.join(src, "config.json")).get("architecture") == ARCHITECTURE
    if kind == "trainer":
        workdir, _ = trainer_checkpoint(src)
        return hf_io.read_json(os.path.join(workdir, "config.json")).get("task") in LM_TASKS
    return False


def fresh_dir(out_dir: str, overwrite: bool) -> None:
    """Creates `out_dir`; a non-empty one is an error unless `overwrite` (then replaced)."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def tokenizer_settings(directory: str | None, model_config: Mapping[str, Any]) -> dict | None:
    """The LM tokenizer beside a model: `file` (tokenizer.json / tokenizer.model, or None when
    only other tokenizer files exist), `files` (all TOKENIZER_FILES there), `add_bos`
    (tokenizer_config's add_bos_token; default: Llama and OPT yes, Qwen2 no), `max_len`, the
    special tokens and ids. Open it with `convert.tokenizer.open_tokenizer(directory, settings)`."""
    from vlmjax.data.tokenizers import hf_special_tokens, load_model_tokenizer

    files = [f for f in TOKENIZER_FILES if directory and os.path.isfile(
        os.path.join(directory, f))]
    if not files:
        return None
    file = next((f for f in ("tokenizer.json", "tokenizer.model") if f in files), None)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = hf_io.read_json(config_path) if os.path.exists(config_path) else {}
    names = hf_special_tokens(directory)
    settings = dict(file=file, files=files, eos="none", text_mask=True,
                    add_bos=bool(config.get("add_bos_token",
                                            model_config.get("model_type") in BOS_FAMILIES)),
                    max_len=int(model_config.get("max_position_embeddings") or 2048),
                    **{k: names[k] for k in ("bos_token", "eos_token", "pad_token") if k in names})
    ids = {k: model_config.get(k) for k in ("bos_id", "eos_id", "pad_id")}
    if file is not None:
        tokenizer = load_model_tokenizer(os.path.join(directory, file))
        ids = {k: ids[k] if v is None else v for k, v in zip(
            ("bos_id", "eos_id", "pad_id"), (tokenizer.bos_id, tokenizer.eos_id,
                                             tokenizer.pad_id))}
    return {**settings, **ids}


def read_decoder_tokenizer_settings(src: str, kind: str) -> dict | None:
    """The tokenizer settings of an HF or converted decoder directory (None: no tokenizer
    file there, or another kind of source)."""
    config_path = os.path.join(src, "config.json")
    if kind == "hf":
        settings = tokenizer_settings(src, decoder_config_from_hf(hf_io.read_json(config_path),
                                                                  config_path))
    elif kind == "converted":
        settings = hf_io.read_json(config_path).get("tokenizer")
    else:
        settings = None
    return settings if settings and settings.get("file") else None


def _placed(abstract: Mapping, shardings: Any) -> dict:
    """ShapeDtypeStructs of `abstract` carrying `shardings` (a matching tree or one sharding)."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _restore(stored_config: Mapping, restore_fn, shardings: Any, scan_layers: bool | None,
             where: str) -> tuple[dict, dict]:
    """(params in the wanted layout and shardings, model config) of an orbax checkpoint in the
    layout of `stored_config`; `restore_fn(placed_abstract)` reads it."""
    stored_scan = bool(stored_config.get("scan_layers"))
    if scan_layers is None:
        scan_layers = (scan_layout.is_scanned(shardings) if isinstance(shardings, Mapping)
                       else stored_scan)
    model_config = {k: v for k, v in stored_config.items() if k != "scan_layers"}
    if scan_layers:  # as load_hf_decoder: the key only when the layers are stacked
        model_config["scan_layers"] = True
    abstract = abstract_decoder_params(stored_config)
    try:
        if scan_layers == stored_scan:  # straight into the shardings
            return restore_fn(_placed(abstract, shardings)), model_config
        host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        params = restore_fn(_placed(abstract, host))
    except (ValueError, KeyError, TypeError) as e:  # orbax does not say which directory
        raise ValueError(f"the params in {where} do not fit its model config: {e}") from e
    return _relayout(params, model_config, shardings), model_config


def _relayout(params: Mapping, model_config: Mapping, shardings: Any) -> dict:
    """Host params in the other layer layout -> the layout of `model_config`, placed one
    parameter at a time (unrolled layers are dropped once stacked)."""
    want = flatten(_placed(abstract_decoder_params(model_config), shardings))
    have = flatten(params)
    out = {}
    for path, spec in want.items():
        top, block, *rest = path.split("/")
        if path in have:
            value = np.asarray(have.pop(path))
        elif block == scan_layout.SCANNED:  # stack block0..block{n-1}
            value = np.stack([np.asarray(have.pop("/".join([top, f"block{i}", *rest])))
                              for i in range(model_config["depth"])])
        else:  # block{i}: a slice of the stacked parameter
            value = np.asarray(have["/".join([top, scan_layout.SCANNED, *rest])][
                int(block[len("block"):])])
        out[path] = jax.device_put(value, spec.sharding).block_until_ready()
        del value
    return unflatten(out)


def _read(src: str, kind: str, shardings: Any = None, scan_layers: bool | None = None
          ) -> tuple[dict, dict, str | None, dict]:
    """(params, model config, tokenizer directory, source) of a decoder source."""
    import orbax.checkpoint as ocp

    if kind == "hf":
        params, model_config = load_hf_decoder(src, shardings, scan_layers)
        source = {"kind": "hf", "path": os.path.abspath(src), "family": model_config["model_type"]}
        return params, model_config, src, source
    if kind == "converted":
        config = hf_io.read_json(os.path.join(src, "config.json"))
        path = os.path.join(os.path.abspath(src), PARAMS_DIR)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{src} has no {PARAMS_DIR}/ orbax checkpoint")
        params, model_config = _restore(config["model"], lambda a: ocp.v1.load(path, a),
                                        shardings, scan_layers, path)
        return params, model_config, src, config["source"]
    if kind != "trainer":
        raise ValueError(f"{src}: a {kind!r} source holds no decoder LM")
    from vlmjax.train.checkpoint import restore_params  # late: orbax is slow to import

    workdir, step = trainer_checkpoint(src)
    config = hf_io.read_json(os.path.join(workdir, "config.json"))
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{workdir}/config.json has no model section: not a trainer config")
    stored = {k: v for k, v in config["model"].items() if k not in TRAINER_ONLY_MODEL_KEYS}
    params, model_config = _restore(stored, lambda a: restore_params(workdir, a, step),
                                    shardings, scan_layers, f"{workdir}/checkpoints")
    tokenizer = (config.get("input") or {}).get("tokenizer") or ""
    tokenizer_dir = os.path.dirname(os.path.abspath(tokenizer)) if os.path.isfile(
        tokenizer) else None
    source = {"kind": "trainer", "path": workdir, "step": step,
              "family": model_config.get("model_type")}
    return params, model_config, tokenizer_dir, source


def load_decoder(src: str, kind: str, shardings: Any = None, dtype=jnp.float32,
                 scan_layers: bool | None = None):
    """-> (Decoder with compute `dtype`, float32 params placed by `shardings`, model config)."""
    params, model_config, _, _ = _read(src, kind, shardings, scan_layers)
    return build_decoder(model_config, dtype), params, model_config


def read_decoder(src: str, kind: str) -> Pretrained:
    """A decoder source as a numpy `Pretrained` (flat params; no image)."""
    params, model_config, tokenizer_dir, source = _read(src, kind)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    return Pretrained(flat, model_config, None, tokenizer_settings(tokenizer_dir, model_config),
                      tokenizer_dir, source)


def import_decoder(src: str, out_dir: str, overwrite: bool = False) -> dict:
    """HF decoder directory -> converted directory; returns its config.json dict."""
    import orbax.checkpoint as ocp

    params, model_config, tokenizer_dir, source = _read(src, "hf", scan_layers=False)
    fresh_dir(out_dir, overwrite)
    ocp.v1.save(os.path.join(os.path.abspath(out_dir), PARAMS_DIR), params)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    model_config = {k: v for k, v in model_config.items() if k != "scan_layers"}
    config = {"format": FORMAT, "architecture": ARCHITECTURE, "model": model_config,
              "tokenizer": tokenizer_settings(out_dir, model_config), "source": source}
    hf_io.write_json(os.path.join(out_dir, "config.json"), config)
    return config


def export_decoder(src: str, kind: str, out_dir: str, dtype: str = "float32") -> str:
    """Any decoder source -> HF directory with its tokenizer files; returns the model_type."""
    from vlmjax.convert.hf_decoder_export import export_hf_decoder

    params, model_config, tokenizer_dir, _ = _read(src, kind)
    return export_hf_decoder(params, model_config, out_dir, dtype, tokenizer_dir)
