"""Trainer workdirs as a pretrained source: the params of a trainer checkpoint with the model,
image size and tokenizer of the run (WORKDIR/config.json, written by vlmjax.train).

    WORKDIR                      the latest checkpoint of a contrastive run
    WORKDIR/checkpoints/<step>   that step's checkpoint
"""
from __future__ import annotations

import os

import jax
import numpy as np

from vlmjax.convert import hf_io, params as params_lib, tokenizer as tok
from vlmjax.convert.hf import IMAGE_NORMALISATION
from vlmjax.convert.hf_export import hf_family
from vlmjax.convert.params import Pretrained

CHECKPOINTS = "checkpoints"
# The pipeline's value ops -> (mean, std) on [0, 1] pixels (see vlmjax.data.preprocess).
VALUE_OP_NORMALISATION = {"value_range": IMAGE_NORMALISATION["siglip"],
                          "normalize_clip": IMAGE_NORMALISATION["clip"]}
TRAINER_ONLY_MODEL_KEYS = ("dtype",)  # config.model keys that are not TwoTowers arguments


def _is_workdir(path: str) -> bool:
    config_path = os.path.join(path, "config.json")
    return (os.path.isdir(os.path.join(path, CHECKPOINTS)) and os.path.exists(config_path)
            and "task" in hf_io.read_json(config_path))


def trainer_checkpoint(path: str) -> tuple[str, int | None] | None:
    """(workdir, step) when `path` is a trainer workdir (step None: the latest) or one of its
    checkpoint directories WORKDIR/checkpoints/<step>; None otherwise."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return None
    if _is_workdir(path):
        return path, None
    parent, step = os.path.split(path)
    workdir, checkpoints = os.path.split(parent)
    if step.isdigit() and checkpoints == CHECKPOINTS and _is_workdir(workdir):
        return workdir, int(step)
    return None


def _image(config: dict, where: str) -> dict:
    size = int(config["input"]["image_size"])
    value_op = config["input"]["preprocess"].split("|")[-1].strip()
    if value_op not in VALUE_OP_NORMALISATION:
        raise ValueError(f"{where}: input.preprocess ends with {value_op!r}, not one of "
                         f"{sorted(VALUE_OP_NORMALISATION)}")
    mean, std = VALUE_OP_NORMALISATION[value_op]
    return {"size": [size, size], "mean": list(mean), "std": list(std)}


def tokenizer_settings(config: dict) -> tuple[dict | None, str | None]:
    """Settings (convert.tokenizer) of the run's tokenizer file, with the Hugging Face tokenizer
    files beside it; (None, None) for the vlm_shapes tokenizer or a file that is gone."""
    from vlmjax.data.tokenizers import load_model_tokenizer

    inp = config["input"]
    path = inp.get("tokenizer") or ""
    if path == "vlm_shapes" or not os.path.isfile(path):
        return None, None
    directory, file = os.path.split(os.path.abspath(path))
    tokenizer = load_model_tokenizer(path)
    companions = [f for f in tok.COMPANION_FILES if f != "preprocessor_config.json"
                  and os.path.exists(os.path.join(directory, f))]
    model_text = config["model"].get("text") or {}
    settings = dict(file=file, max_len=int(inp["max_text_len"]), add_bos=bool(inp["add_bos"]),
                    eos=inp["eos"], text_mask=bool(config["model"].get("use_text_mask", True)),
                    pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                    files=[file] + companions)
    if model_text.get("max_len") is not None:
        settings["max_len"] = min(settings["max_len"], int(model_text["max_len"]))
    return settings, directory


def model_and_image(config: dict, workdir: str) -> tuple[dict, dict]:
    """(TwoTowers arguments, image size/mean/std) of a trainer config.json dict."""
    if config.get("task") != "contrastive":
        raise ValueError(f"{workdir}: task {config.get('task')!r}; only contrastive (two-tower) "
                         "runs hold a CLIP / SigLIP model")
    missing = [k for k in ("model", "input") if not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"{workdir}/config.json has no {missing}: not a trainer config")
    model_config = {k: v for k, v in config["model"].items() if k not in TRAINER_ONLY_MODEL_KEYS}
    return model_config, _image(config, os.path.join(workdir, "config.json"))


def read_trainer_checkpoint(path: str):
    """A trainer workdir or checkpoint directory as a numpy `params.Pretrained`."""
    from vlmjax.train.checkpoint import restore_params  # late: orbax is slow to import

    found = trainer_checkpoint(path)
    if found is None:
        raise ValueError(f"{path} is not a trainer workdir (config.json + checkpoints/) or a "
                         f"checkpoint directory WORKDIR/{CHECKPOINTS}/<step>")
    workdir, step = found
    config = hf_io.read_json(os.path.join(workdir, "config.json"))
    model_config, image = model_and_image(config, workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            params_lib.abstract_params(model_config, image["size"]))
    try:  # a missing checkpoint is a FileNotFoundError that names the directory: not caught
        params = restore_params(workdir, abstract, step)
    except (ValueError, KeyError, TypeError) as e:  # orbax does not say which step or workdir
        raise ValueError(f"cannot read the params of step {step or 'latest'} in {workdir}/"
                         f"{CHECKPOINTS} with the model of its config.json: {e}") from e
    flat = {k: np.asarray(v) for k, v in params_lib.flatten(params).items()}
    settings, tokenizer_dir = tokenizer_settings(config)
    try:
        family = hf_family(model_config)
    except ValueError:
        family = None
    source = {"kind": "trainer", "path": workdir, "step": step, "family": family}
    return Pretrained(flat, model_config, image, settings, tokenizer_dir, source)


def preprocessor_config(family: str, image: dict) -> dict:
    """transformers' image processor config for images of `image["size"]` normalised as
    `image["mean"]` / `image["std"]` (CLIP: resize the shorter side, centre crop)."""
    height, width = image["size"]
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": image["mean"], "image_std": image["std"],
              "resample": 3, "do_convert_rgb": True}
    if family == "clip":
        return {**common, "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": min(height, width)}, "do_center_crop": True,
                "crop_size": {"height": height, "width": width}}
    return {**common, "image_processor_type": "SiglipImageProcessor",
            "size": {"height": height, "width": width}}
