"""`llava` trainer workdirs as a pretrained source: the PrefixLM of the run's config.json with the
params of a checkpoint, plus what answering about an image needs (image size and
normalisation, tokenizer, chat template, visual tokens per image).

    model, params, model_config = load_llava_workdir(WORKDIR)   # or WORKDIR/checkpoints/<step>
    model_config["image_size"], ["image_mean"], ["image_std"], ["template"],
    model_config["tokenizer"] (the run's input.tokenizer), ["special_tokens"],
    model_config["image_token"], ["num_image_tokens"]
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from vlmjax.convert import hf_io
from vlmjax.convert.workdir import VALUE_OP_NORMALISATION, trainer_checkpoint

TASK = "llava"


def is_llava_workdir(src: str) -> bool:
    found = trainer_checkpoint(src)
    return found is not None and hf_io.read_json(
        os.path.join(found[0], "config.json")).get("task") == TASK


def load_llava_workdir(src: str, shardings=None, dtype=jnp.float32):
    """-> (PrefixLM with compute `dtype`, float32 params, model config; see the module
    docstring). `shardings`: one sharding for every param (default: the first device)."""
    import ml_collections

    from vlmjax.data import llava_pipeline
    from vlmjax.train.tasks import llava, llava_init

    workdir, step = trainer_checkpoint(src)
    config = hf_io.read_json(os.path.join(workdir, "config.json"))
    if config.get("task") != TASK:
        raise ValueError(f"{workdir}: task {config.get('task')!r}, not {TASK!r}")
    model_config = ml_collections.ConfigDict(config["model"])
    kwargs = llava.model_kwargs(model_config)
    inp = config["input"]
    size = int(inp["image_size"])
    info = llava_init.SourceInfo("llava", "trainer", config["model"], [size, size])
    params = llava_init.restore_llava_workdir(src, info)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    value_op = inp["preprocess"].split("|")[-1].strip()
    mean, std = VALUE_OP_NORMALISATION.get(value_op, (None, None))
    model = llava.PrefixLM(**{**kwargs, "dtype": dtype})
    image_token = inp.get("image_token", llava_pipeline.OPTIONAL_INPUT["image_token"])
    out = {**{k: v for k, v in config["model"].items() if k != "dtype"},
           "image_size": [size, size], "image_mean": mean, "image_std": std,
           "preprocess": inp["preprocess"], "template": inp["template"],
           "tokenizer": inp["tokenizer"], "special_tokens": list(inp.get("special_tokens", [])),
           "image_token": image_token, "source": {"kind": "trainer", "path": workdir,
                                                   "step": step}}
    out["num_image_tokens"] = llava.num_image_tokens(model, size)
    return model, params, out
