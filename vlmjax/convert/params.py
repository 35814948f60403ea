"""Model config <-> TwoTowers model, and checks that converted params fit that model.

A *model config* is a plain JSON-serialisable dict of `TwoTowers` keyword arguments
(`image`: ViT kwargs, `text`: TextTransformer kwargs, `embed_dim`, the projection flags,
`temperature_init`, `bias_init`). Converted params are a nested dict of arrays with exactly the
structure and shapes that `TwoTowers(**model_config).init` gives (unboxed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.models import scan_layout
from vlmjax.models.two_towers import TwoTowers

SEP = "/"
FORMAT = "vlmjax.convert/1"   # config.json "format" of a converted directory
PARAMS_DIR = "params"         # its orbax checkpoint of the params


@dataclass
class Pretrained:
    """Everything read from a source; `params` is a flat {path: numpy array} dict."""
    params: dict
    model_config: dict
    image: dict                 # size [H, W], mean, std
    tokenizer: dict | None      # settings (convert.tokenizer), `files` relative to `tokenizer_dir`
    tokenizer_dir: str | None
    source: dict


def build_model(model_config: Mapping[str, Any], dtype=jnp.float32) -> TwoTowers:
    try:
        return TwoTowers(**dict(model_config), dtype=dtype)
    except TypeError as e:  # an unknown key in a hand-edited config.json
        raise ValueError(f"model config is not a set of TwoTowers arguments: {e}") from e


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{SEP}{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEP)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def unrolled_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat numpy params (from nested or flat `params`) in the converters' layout: scanned
    layers (`blocks`, `layer_scan`) unrolled, as the exporters write each layer."""
    return {k: np.asarray(v) for k, v in flatten(scan_layout.to_unrolled(unflatten(
        flatten(params)))).items()}


def abstract_params(model_config: Mapping[str, Any], image_size: Sequence[int]) -> dict:
    """ShapeDtypeStructs of the params `TwoTowers(**model_config)` has for images of
    `image_size` (H, W): the learned position embedding's length depends on it."""
    model = build_model(model_config)
    images = jnp.zeros((1, *image_size, 3), jnp.float32) if model.image is not None else None
    tokens = None
    if model.text is not None:
        tokens = jnp.zeros((1, model_config["text"].get("max_len", 64)), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens))
    return nn.unbox(shapes)["params"]


def shape_problems(want: Mapping[str, Any], have: Mapping[str, Any],
                   have_name: str = "pretrained") -> list[str]:
    """Every missing, unexpected or mis-shaped parameter of the nested trees `have` against
    `want` (arrays or ShapeDtypeStructs), one line each with the path and both shapes."""
    want, have = flatten(want), flatten(have)
    problems = [f"missing {k} {tuple(np.shape(want[k]))}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {tuple(np.shape(have[k]))}"
                 for k in sorted(set(have) - set(want))]
    problems += [f"{k}: model {tuple(np.shape(want[k]))}, {have_name} {tuple(np.shape(have[k]))}"
                 for k in sorted(set(want) & set(have))
                 if tuple(np.shape(have[k])) != tuple(np.shape(want[k]))]
    return problems


def format_problems(problems: list[str], limit: int = 20) -> str:
    return "\n  ".join(problems[:limit]) + ("\n  ..." if len(problems) > limit else "")


def check_params(params: Mapping[str, Any], model_config: Mapping[str, Any],
                 image_size: Sequence[int], source: str) -> None:
    """Raises naming every missing, unexpected or mis-shaped parameter."""
    problems = shape_problems(abstract_params(model_config, image_size), params, "converted")
    if problems:
        shown = format_problems(problems)
        raise ValueError(f"params converted from {source} do not fit the model config "
                         f"({len(problems)} problems):\n  {shown}")


def to_device(params: Mapping[str, Any], shardings: Any = None) -> dict:
    """numpy params -> float32 jax arrays, placed by `shardings` (a matching pytree of
    `jax.sharding.Sharding`, or one sharding for all) when given."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    if shardings is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, shardings)
