"""`pretrained_recipe(SRC)`: what a trainer config needs to fine-tune a pretrained model, read
from its config files only (no weights are loaded).

    recipe = pretrained_recipe("path/to/siglip_hf_dir")   # or a converted directory
    config.model = {**recipe.model_config, "use_text_mask": recipe.tokenizer["text_mask"]}
    config.model_init = SRC   # the weights, loaded by the trainer into its shardings

The model config's `temperature_init` / `bias_init` are the family's defaults when SRC is an HF
directory (their values live in the weights, which `model_init` loads); a converted directory
stores the checkpoint's own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from vlmjax.convert import hf_align, hf_io, tokenizer as tok, workdir as workdir_lib
from vlmjax.convert.hf import image_normalisation, model_config_from_hf
from vlmjax.convert.hf_export import hf_family
from vlmjax.convert.pretrained import source_kind
from vlmjax.data.tokenizers import load_model_tokenizer

LOSSES = {"siglip": "siglip", "clip": "clip", hf_align.FAMILY: "clip"}


@dataclass(frozen=True)
class Recipe:
    family: str           # 'clip' | 'siglip' | 'align'
    model_config: dict    # TwoTowers keyword arguments (JSON-able)
    image_size: list      # [H, W] the model was trained at
    image_mean: list      # per channel, on pixels scaled to [0, 1]
    image_std: list
    tokenizer: dict | None  # convert.tokenizer settings + `path` (absolute path of its file)

    @property
    def loss(self) -> str:
        return LOSSES[self.family]

    def value_op(self) -> str:
        """The preprocessing op that normalises pixels as this model expects."""
        for op, (mean, std) in workdir_lib.VALUE_OP_NORMALISATION.items():
            if np.allclose(self.image_mean, mean, atol=1e-6) and np.allclose(
                    self.image_std, std, atol=1e-6):
                return op
        raise ValueError(f"image mean {self.image_mean} / std {self.image_std} match no "
                         "preprocessing op; supported: " + ", ".join(
                             f"{op} (mean {list(m)}, std {list(s)})"
                             for op, (m, s) in workdir_lib.VALUE_OP_NORMALISATION.items()))

    def square_image_size(self) -> int:
        height, width = self.image_size
        if height != width:
            raise ValueError(f"the model was trained at {height}x{width}; the input pipeline "
                             "makes square images: choose a square size (e.g. res=N)")
        return int(height)


def _family(model_config) -> str:
    return hf_align.FAMILY if hf_align.is_align_model(model_config) else hf_family(model_config)


def _recipe_from_hf(src: str) -> Recipe:
    config_path = os.path.join(src, "config.json")
    if hf_align.is_align_source(src):
        model_config, info = hf_align.model_config_from_hf(hf_io.read_json(config_path),
                                                           config_path)
        mean, std = hf_align.image_normalisation(src)
        settings = hf_align.tokenizer_settings(src, model_config["text"]["max_len"])
        return Recipe(hf_align.FAMILY, model_config, info["image_size"], mean, std, settings)
    model_config, info = model_config_from_hf(hf_io.read_json(config_path), config_path)
    mean, std = image_normalisation(src, info["family"])
    settings = tok.hf_tokenizer_settings(src, info["family"], model_config["text"]["max_len"])
    return Recipe(info["family"], model_config, info["image_size"], mean, std, settings)


def _recipe_from_converted(src: str) -> Recipe:
    config = hf_io.read_json(os.path.join(src, "config.json"))
    family = (config.get("source") or {}).get("family") or _family(config["model"])
    image = config["image"]
    return Recipe(family, config["model"], list(image["size"]), list(image["mean"]),
                  list(image["std"]), config.get("tokenizer"))


def _recipe_from_trainer(src: str) -> Recipe:
    """A previous fine-tuning run (WORKDIR or WORKDIR/checkpoints/<step>): its model and input."""
    workdir, _ = workdir_lib.trainer_checkpoint(src)
    config = hf_io.read_json(os.path.join(workdir, "config.json"))
    model_config, image = workdir_lib.model_and_image(config, workdir)
    settings, _ = workdir_lib.tokenizer_settings(config)
    if settings is not None:  # the path is resolved below, relative to `src`
        settings = dict(settings, file=os.path.abspath(config["input"]["tokenizer"]))
    return Recipe(_family(model_config), model_config, image["size"], image["mean"],
                  image["std"], settings)


def pretrained_recipe(src: str) -> Recipe:
    """The model config, image size/normalisation and tokenizer settings of an HF model
    directory, a converted directory (`python -m vlmjax.convert import`) or a trainer workdir
    (WORKDIR[/checkpoints/<step>]: fine-tune a fine-tuned model), from config files only."""
    kind = source_kind(src)
    if kind == "big_vision":
        raise ValueError(f"{src}: a big_vision .npz holds no config; import it first: python -m "
                         "vlmjax.convert import --from big_vision X.npz --out DIR --tokenizer "
                         "spiece.model, then use DIR")
    readers = {"hf": _recipe_from_hf, "converted": _recipe_from_converted,
               "trainer": _recipe_from_trainer}
    recipe = readers[kind](src)
    settings = recipe.tokenizer
    if settings is not None:
        path = os.path.abspath(os.path.join(src, settings["file"]))
        # The pipeline loads input.tokenizer with load_model_tokenizer: check that it pads and
        # ends texts with the ids the reference uses (SigLIP reads the padding).
        tokenizer = load_model_tokenizer(path)
        got = {"pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id}
        want = {k: settings.get(k) for k in got}
        if got != want:
            raise ValueError(f"{path} loads with special ids {got}, but {src} uses {want}: "
                             "declare them in a tokenizer_config.json beside the file")
        settings = dict(settings, path=path)
    return Recipe(recipe.family, recipe.model_config, [int(s) for s in recipe.image_size],
                  recipe.image_mean, recipe.image_std, settings)
