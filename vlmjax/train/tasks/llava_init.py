"""`config.model_init` of the `llava` task: which pretrained source fills which part of the
PrefixLM (vision/, projector/, llm/).

    model_init = SRC                                   # the whole model: a LLaVA source
    model_init = {"vision": SRC, "llm": SRC}           # parts; the projector: random init
    model_init = {"vision": SRC, "projector": SRC, "llm": SRC}

What a source holds is read from its config files alone:
  llava       an HF LlavaForConditionalGeneration or Blip2ForConditionalGeneration directory, or
              a `llava` (or `blip2` stage-2) trainer workdir (WORKDIR or
              WORKDIR/checkpoints/<step>, e.g. stage 1's): every part
  decoder     an HF Llama / Qwen2 directory, a converted decoder directory, an `lm` workdir:
              the llm
  two_towers  an HF CLIP / SigLIP directory, a converted or big_vision one, a `contrastive`
              workdir: the vision tower (its ViT image tower, without the blocks after the
              deepest feature layer, the final norm and the pooling head, which a PrefixLM does
              not build; its position embedding resized to input.image_size)
A part from a source that does not hold it, or a whole model from one that is not LLaVA, is a
ConfigError naming what the source holds. Before any weights are read, every field that
defines the function a part computes is compared with config.model (ViT fields of the vision
tower, Decoder fields of the llm, the projector and its features for the projector; compute
switches such as dtype, remat and scan_layers may differ); then every shape is
(convert/model_init.py). `prefix` entries are not used: the task knows where each kind of source
keeps each part.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.config import ConfigError, plain
from vlmjax.convert import model_init as model_init_lib
from vlmjax.models import scan_layout
from vlmjax.models.prefix_lm import PrefixLM
from vlmjax.models.qformer import QFormer
from vlmjax.models.two_towers import IMAGE_TOWERS, with_defaults
from vlmjax.train.tasks import lm as lm_task
from vlmjax.train.tasks.base import raise_architecture_diffs

SUB_MODELS = {"vision": ("vision",), "projector": ("projector",), "llm": ("llm",)}
HOLDS = {"llava": ("vision", "projector", "llm"), "decoder": ("llm",),
         "two_towers": ("vision",)}
DESCRIBED = {"llava": "a LLaVA model", "decoder": "a decoder LM",
             "two_towers": "a CLIP / SigLIP (two-tower) model"}
# ViT fields that change how, not what, the tower computes, or that a PrefixLM sets itself
# (pooling, output layers); class_token is compared resolved.
VISION_NOT_ARCHITECTURE = ("dtype", "remat", "scan_layers", "fused_attention", "dropout",
                           "attention_dropout", "pool", "class_token", "output_layer",
                           "return_layers", "attention_layout")
PROJECTOR_FIELDS = ("projector", "projector_bias", "projector_posemb", "projector_norm",
                    "qformer", "vision_feature_layer",
                    "vision_feature_select_strategy")
UNBUILT_VISION = ("final_norm", "map_head")  # tower parts after the features a PrefixLM reads


@dataclasses.dataclass
class SourceInfo:
    holds: str                    # llava | decoder | two_towers
    kind: str                     # convert.pretrained.source_kind
    model: dict | None            # PrefixLM kwargs (llava), Decoder kwargs, or TwoTowers kwargs
    image_size: list | None = None  # llava sources: the size its position embedding is for


def parse(model_init) -> list[model_init_lib.InitEntry]:
    """The entries of model_init; pure (reads no files)."""
    entries = model_init_lib.parse_model_init(model_init, SUB_MODELS)
    for entry in entries:
        if entry.prefix:
            raise ConfigError(f"{entry.name}: 'prefix' is not used by the llava task; give the "
                              "source alone (it reads a CLIP / SigLIP source's image tower, a "
                              "decoder's whole params and a LLaVA source's parts itself)")
    return entries


def source_info(src: str, where: str) -> SourceInfo:
    """What `src` holds, from its config files."""
    from vlmjax.convert import decoder_pretrained, hf_blip2, hf_io, hf_llava
    from vlmjax.convert.pretrained import source_kind
    from vlmjax.convert.workdir import model_and_image, trainer_checkpoint
    try:
        kind = source_kind(src)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
    if kind == "trainer":
        workdir, _ = trainer_checkpoint(src)
        config = hf_io.read_json(os.path.join(workdir, "config.json"))
        task = config.get("task")
        if task == "llava" or (task == "blip2" and config.get("stage") == 2):
            size = int(config["input"]["image_size"])
            return SourceInfo("llava", kind, config["model"], [size, size])
        if task == "contrastive":  # its config.json alone (any two-tower layout)
            return SourceInfo("two_towers", kind, model_and_image(config, workdir)[0])
        if task not in decoder_pretrained.LM_TASKS:
            raise ConfigError(f"{where}: {src} is a workdir of task {task!r}, which holds none "
                              "of vision / projector / llm (tasks llava, lm, contrastive do)")
    if kind == "hf" and hf_llava.is_llava_source(src):
        path = os.path.join(src, "config.json")
        config = hf_llava.llava_config_from_hf(hf_io.read_json(path), path)
        return SourceInfo("llava", kind, hf_llava.prefix_lm_kwargs(config), config["image_size"])
    if kind == "hf" and hf_blip2.is_blip2_source(src):  # a PrefixLM with the Q-Former projector
        path = os.path.join(src, "config.json")
        config = hf_blip2.blip2_config_from_hf(hf_io.read_json(path), path)
        return SourceInfo("llava", kind, hf_blip2.prefix_lm_kwargs(config), config["image_size"])
    if decoder_pretrained.is_decoder_source(src, kind):
        return SourceInfo("decoder", kind, lm_task.source_model_config(src))
    if kind == "big_vision":  # no config: shapes alone are checked
        return SourceInfo("two_towers", kind, None)
    from vlmjax.convert.recipe import pretrained_recipe
    try:
        return SourceInfo("two_towers", kind, pretrained_recipe(src).model_config)
    except ValueError as error:  # an HF model of another family, ...
        raise ConfigError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------- architecture
def _vision_fields(vision, arch: str) -> dict:
    full = with_defaults(IMAGE_TOWERS[arch], plain(vision))
    fields = {k: v for k, v in full.items() if k not in VISION_NOT_ARCHITECTURE}
    if arch == "vit":
        class_token = full["class_token"]
        fields["class_token"] = full["pool"] == "cls" if class_token is None else bool(class_token)
    return fields


def _qformer_fields(qformer) -> dict:
    """A Q-Former projector's fields, defaults filled (a stage-2 one has no text input)."""
    if qformer is None:
        return {}
    full = with_defaults(QFormer, {**plain(qformer), "text_input": False})
    return {k: v for k, v in full.items() if k not in ("dtype", "dropout", "attention_dropout")}


def _llm_fields(llm) -> dict:
    llm = plain(llm)
    return {k: plain(llm.get(k, default)) for k, default in lm_task.decoder_fields().items()
            if k not in lm_task.NOT_ARCHITECTURE}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (
            isinstance(a, bool) or isinstance(b, bool)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _diffs(where: str, ours: dict, theirs: dict) -> list[str]:
    return [f"{where}.{key}: config {ours.get(key)!r}, pretrained {theirs.get(key)!r}"
            for key in sorted(set(ours) | set(theirs)) if not _same(ours.get(key), theirs.get(key))]


def check_source(entry, info: SourceInfo, model_config, image_size: int) -> None:
    """The entry's part(s) of `info` fit config.model (see the module docstring)."""
    src, ours = entry.source, plain(model_config)
    if entry.sub_model is None and info.holds != "llava":
        raise ConfigError(f"model_init {src} is {DESCRIBED[info.holds]}, not a whole LLaVA "
                          f"model; name the parts it fills: model_init = {{'"
                          f"{HOLDS[info.holds][0]}': SRC, ...}} (sub-models "
                          f"{sorted(SUB_MODELS)})")
    parts = HOLDS["llava"] if entry.sub_model is None else (entry.sub_model,)
    if entry.sub_model is not None and entry.sub_model not in HOLDS[info.holds]:
        raise ConfigError(f"{entry.name}: {src} is {DESCRIBED[info.holds]}, which holds "
                          f"{list(HOLDS[info.holds])}, not the {entry.sub_model}")
    if info.model is None:
        return
    theirs = info.model
    diffs = []
    if "vision" in parts:
        arch = ours.get("vision_arch", "vit")
        their_arch = (theirs.get("image_arch", "vit") if info.holds == "two_towers" else
                      theirs.get("vision_arch", "vit"))
        if their_arch != arch:
            raise ConfigError(f"{entry.name}: {src} has a {their_arch!r} image tower, and "
                              f"config.model.vision_arch is {arch!r}; set it to {their_arch!r} "
                              "with that tower's fields")
        vision = theirs["image"] if info.holds == "two_towers" else theirs["vision"]
        diffs += _diffs("model.vision", _vision_fields(ours["vision"], arch),
                        _vision_fields(vision, arch))
        if info.image_size is not None and list(info.image_size) != [image_size] * 2:
            diffs.append(f"input.image_size: config {image_size}, pretrained "
                         f"{info.image_size} (a LLaVA source's vision tower is not resized)")
    if "llm" in parts:
        llm = theirs if info.holds == "decoder" else theirs["llm"]
        diffs += _diffs("model.llm", _llm_fields(ours["llm"]), _llm_fields(llm))
    if "projector" in parts:
        defaults = with_defaults(PrefixLM, None)
        fields = [k for k in PROJECTOR_FIELDS if k != "qformer"]
        diffs += _diffs("model", {k: ours.get(k, defaults.get(k)) for k in fields},
                        {k: theirs.get(k, defaults.get(k)) for k in fields})
        if ours.get("qformer") is not None or theirs.get("qformer") is not None:
            diffs += _diffs("model.qformer", _qformer_fields(ours.get("qformer")),
                            _qformer_fields(theirs.get("qformer")))
    raise_architecture_diffs(diffs, entry.name, src)


# --------------------------------------------------------------------------------- loading
def _built_vision(tower: dict, model_config) -> dict:
    """An image tower's params without what a PrefixLM does not build (unrolled layout)."""
    model = plain(model_config)
    arch = model.get("vision_arch", "vit")
    vision = with_defaults(IMAGE_TOWERS[arch], plain(model["vision"]))
    depth = int(vision["depth"]) if arch == "vit" else len(vision["channels"])
    layers = model.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) else list(layers)
    blocks = max(layer % (depth + 1) for layer in layers)
    if arch == "cnn":  # stages conv0 .. conv{depth-1}; those after the deepest read are unbuilt
        return {k: v for k, v in tower.items() if not (k.startswith("conv") and
                                                       int(k[4:]) >= blocks)}
    tower = {k: v for k, v in scan_layout.to_unrolled(tower).items() if k not in UNBUILT_VISION}
    if blocks == 0:
        tower.pop("encoder", None)
    elif "encoder" in tower:
        tower["encoder"] = {k: v for k, v in tower["encoder"].items()
                            if not (k.startswith("block") and k[5:].isdigit()
                                    and int(k[5:]) >= blocks)}
    return tower


def restore_llava_workdir(src: str, info: SourceInfo) -> dict:
    """The params of a llava workdir, in the layout its own config built."""
    from vlmjax.convert.workdir import trainer_checkpoint
    from vlmjax.train.checkpoint import restore_params
    from vlmjax.train.tasks.llava import init_prefix, model_kwargs
    workdir, step = trainer_checkpoint(src)
    model = PrefixLM(**model_kwargs(info.model))
    height, width = info.image_size
    filler = 0 if model.image_token_id != 0 else 1
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.full((1, 1), filler, jnp.int32),
        images=jnp.zeros((1, height, width, 3), jnp.float32), **init_prefix(model)))["params"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            shapes)
    return restore_params(workdir, abstract, step)


def load_parts(src: str, info: SourceInfo, model_config, image_size: int, shardings) -> dict:
    """The source's params under the PrefixLM's part names (only the parts it holds)."""
    from vlmjax.convert import load_pretrained
    if info.holds == "llava":
        if info.kind == "trainer":
            return restore_llava_workdir(src, info)
        # HF LLaVA streams straight into the shardings (its vision tower unrolled).
        direct = isinstance(shardings, Mapping) and not scan_layout.is_scanned(shardings["vision"])
        return dict(load_pretrained(src, shardings=shardings if direct else None)[1])
    if info.holds == "decoder":  # streamed into the llm's shardings, in their layer layout
        llm_shardings = shardings["llm"] if isinstance(shardings, Mapping) else None
        return {"llm": load_pretrained(src, shardings=llm_shardings)[1]}
    params = load_pretrained(src, image_size=(image_size, image_size))[1]
    return {"vision": _built_vision(params["image_tower"], model_config)}


def assemble(model_init, model_config, image_size: int, abstract_params, shardings,
             init_random: Callable[[], Any]) -> dict:
    """The PrefixLM params of `model_init` (see the module docstring); parts no entry names
    come from `init_random()`."""
    entries = parse(model_init)
    infos: dict[str, SourceInfo] = {}
    for entry in entries:  # every check before any weights are read
        if entry.source not in infos:
            infos[entry.source] = source_info(entry.source, entry.name)
        check_source(entry, infos[entry.source], model_config, image_size)

    def load(src):
        return load_parts(src, infos[src], model_config, image_size, shardings)
    return model_init_lib.assemble_params(entries, SUB_MODELS, abstract_params, load,
                                          init_random)
