"""`config.model_init` of the `fusion` task: a pretrained image tower and decoder LM for the
FusionLM's frozen parts.

    model_init = {"vision": SRC, "llm": SRC}    # either or both

vision: a CLIP / SigLIP source (HF, converted, big_vision, a `contrastive` workdir): its image
tower; llm: a decoder source (HF Llama / Qwen2 / OPT, converted, an `lm` workdir). What a
source holds and whether its architecture matches config.model are checked as for the llava
task (llava_init.source_info / check_source) before any weights are read. The loaded LM has no
gated cross-attention blocks: they (and the resampler, the added tokens, every part not named)
keep the random init, whose gates are 0, so the model starts as the frozen LM.
"""
from __future__ import annotations

import jax

from vlmjax.config import ConfigError
from vlmjax.convert import model_init as model_init_lib
from vlmjax.models import scan_layout
from vlmjax.train.tasks import llava_init

SUB_MODELS = {"vision": ("vision",), "llm": ("llm",)}


def parse(model_init) -> list[model_init_lib.InitEntry]:
    """The entries of model_init; pure (reads no files)."""
    entries = model_init_lib.parse_model_init(model_init, SUB_MODELS) if model_init else []
    for entry in entries:
        if entry.sub_model is None:
            raise ConfigError(f"model_init {entry.source}: the fusion task reads parts, "
                              "{'vision': SRC, 'llm': SRC}, not a whole model")
        if entry.prefix:
            raise ConfigError(f"{entry.name}: 'prefix' is not used by the fusion task; give "
                              "the source alone")
    return entries


def _shape_diffs(where: str, ours, theirs) -> list[str]:
    ours_flat = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_flatten_with_path(ours)[0]}
    theirs_flat = {jax.tree_util.keystr(k): v.shape
                   for k, v in jax.tree_util.tree_flatten_with_path(theirs)[0]}
    diffs = [f"{where}{k}: config {ours_flat.get(k)}, pretrained {theirs_flat.get(k)}"
             for k in sorted(set(ours_flat) | set(theirs_flat))
             if ours_flat.get(k) != theirs_flat.get(k)]
    return diffs


def assemble(model_init, model_config, image_size: int, init_random) -> dict:
    """The FusionLM params of `model_init` (module docstring)."""
    entries = parse(model_init)
    infos = {}
    for entry in entries:  # every check before any weights are read
        infos[entry.source] = llava_init.source_info(entry.source, entry.name)
        llava_init.check_source(entry, infos[entry.source], model_config, image_size)
    params = dict(init_random())
    for entry in entries:
        loaded = llava_init.load_parts(entry.source, infos[entry.source], model_config,
                                       image_size, shardings=None)[entry.sub_model]
        loaded = scan_layout.to_unrolled(dict(loaded))  # the fusion LM runs unrolled
        ours = params[entry.sub_model]
        if entry.sub_model == "llm":  # the gated blocks are new: the random ones stay
            layers = {**{k: v for k, v in ours["layers"].items() if k.startswith("xattn")},
                      **loaded["layers"]}
            loaded = {**loaded, "layers": layers}
        diffs = _shape_diffs(f"model.{entry.sub_model}", ours, loaded)
        if diffs:
            raise ConfigError(f"{entry.name}: {entry.source} does not fit config.model: "
                              + "; ".join(diffs[:6]))
        params[entry.sub_model] = jax.tree.map(lambda ref, new: new.astype(ref.dtype), ours,
                                               loaded)
    return params
