"""Evaluators by type: `config.evals.<name> = {type, data, every, batch_size, ...}`.

    evals = dict(
        test=dict(type="zero_shot", data=dict(split="test"), templates="vlm_shapes"),
        coco=dict(type="retrieval", data=dict(source="tfds", name="coco_captions", split="test",
                                              text_key="captions/text"), max_images=5000),
        use_ema=False)   # reserved: read by the trainer

Metrics are named `{type}/{name}/{metric}` (zero_shot/test/top1, retrieval/coco/i2t_r1).
`data` is described in evals/data.py. Registering a type is one line in TYPES: a class with
  KEYS                      {key: doc} of its own entry keys, beside COMMON_KEYS
  check(entry, where)       raises ConfigError for a bad value (pure: reads nothing)
  __init__(name, entry, context)   builds nothing that reads data
  __call__(params) -> dict  its metrics
and `every` (steps between runs, 0 = only at the end). Subclass `Evaluator` for these.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections

from vlmjax.config import ConfigError, check_keys

TYPES = {
    "zero_shot": "vlmjax.evals.zero_shot:ZeroShotEvaluator",
    "retrieval": "vlmjax.evals.retrieval:RetrievalEvaluator",
    "perplexity": "vlmjax.evals.perplexity:PerplexityEvaluator",
    "vqa": "vlmjax.evals.vqa:VqaEvaluator",
    "captioning": "vlmjax.evals.captioning:CaptioningEvaluator",
    "cot": "vlmjax.evals.cot:CotEvaluator",
    "itm": "vlmjax.evals.itm:ItmEvaluator",
}
COMMON_KEYS = {
    "type": f"evaluator type, one of {sorted(TYPES)}",
    "data": "data config (vlmjax/evals/data.py); default: the training source at data.split",
    "every": "steps between evaluations (0 = only at the end of training)",
    "batch_size": "examples per embedding batch (rounded up to a multiple of the devices)",
}
RESERVED_KEYS = {"use_ema": "also evaluate the EMA params (optim.ema_decay); read by the trainer"}
DEFAULT_BATCH_SIZE = 256


@dataclasses.dataclass
class EvalContext:
    """What evaluators get from the trainer and the task."""
    mesh: Any
    train_data: ml_collections.ConfigDict   # config.data: the default source of `data`
    input: ml_collections.ConfigDict        # config.input: tokenizer, image size, value op
    model: Any                              # the task's model interface for its evaluators
                                            # (contrastive: evals.embed.TwoTowerEncoders)


def evaluator_class(type_name: str, where: str):
    if type_name not in TYPES:
        raise ConfigError(f"{where}.type {type_name!r} is not one of {sorted(TYPES)}")
    module, _, cls = TYPES[type_name].partition(":")
    return getattr(importlib.import_module(module), cls)


def entries(evals) -> dict[str, ml_collections.ConfigDict]:
    """The evaluator entries of config.evals (every key but the reserved ones)."""
    return {name: entry for name, entry in (evals or {}).items() if name not in RESERVED_KEYS}


def check_evals(evals, train_data, where: str = "evals", types=None) -> None:
    """Validate every entry of config.evals against its type, data included; reads nothing.
    `types`: the evaluator types the task can run (None: all)."""
    from vlmjax.evals.data import resolve_data_config  # late: TensorFlow is slow to import
    for name, entry in entries(evals).items():
        here = f"{where}.{name}"
        if not isinstance(entry, (dict, ml_collections.ConfigDict)) or "type" not in entry:
            raise ConfigError(
                f"{here} is not an evaluator entry: each key of {where} but "
                f"{sorted(RESERVED_KEYS)} is a dict {{type, data, every, batch_size, ...}} "
                f"with type one of {sorted(TYPES)}")
        cls = evaluator_class(entry["type"], here)
        if types is not None and entry["type"] not in types:
            raise ConfigError(f"{here}.type {entry['type']!r} does not apply to this task's "
                              f"model; it runs {sorted(types)}")
        check_keys(entry, {**COMMON_KEYS, **cls.KEYS}, here)
        for key, minimum in (("every", 0), ("batch_size", 1)):
            value = entry.get(key, minimum)
            if type(value) is not int or value < minimum:
                raise ConfigError(f"{here}.{key} must be an integer >= {minimum}, got {value!r}")
        resolve_data_config(entry.get("data"), train_data, f"{here}.data")
        cls.check(entry, here)
    use_ema = (evals or {}).get("use_ema", False)
    if not isinstance(use_ema, bool):
        raise ConfigError(f"{where}.use_ema must be True or False, got {use_ema!r}")


def build_evaluators(evals, context: EvalContext) -> list:
    """One evaluator per entry, in name order; nothing is read until one runs."""
    check_evals(evals, context.train_data)
    return [evaluator_class(entry["type"], f"evals.{name}")(name, entry, context)
            for name, entry in sorted(entries(evals).items())]


def check_counts(entry, keys, where: str) -> None:
    """Each of `keys` in `entry` (absent: 0) is an integer >= 0 (a count, 0 = all / off)."""
    for key in keys:
        value = entry.get(key, 0)
        if type(value) is not int or value < 0:
            raise ConfigError(f"{where}.{key} must be an integer >= 0, got {value!r}")


class Evaluator:
    """Common entry keys; `self.data` (evals.data.EvalData) reads on first use."""
    KEYS: dict[str, str] = {}

    @classmethod
    def check(cls, entry, where: str) -> None:
        del entry, where

    def __init__(self, name: str, entry, context: EvalContext):
        from vlmjax.evals.data import EvalData, resolve_data_config
        self.name, self.type, self.context = name, entry["type"], context
        self.every = int(entry.get("every", 0))
        self.batch_size = int(entry.get("batch_size", DEFAULT_BATCH_SIZE))
        self.data = EvalData(resolve_data_config(entry.get("data"), context.train_data,
                                                 f"evals.{name}.data"),
                             context.input, context.train_data)

    def metric_names(self, metrics: dict) -> dict:
        """{metric: v} -> {'{type}/{name}/{metric}': v}; says how many bad records the data
        pass skipped (never silently)."""
        import jax
        if self.data.skipped and jax.process_index() == 0:
            print(f"warning: evals.{self.name}: skipped {self.data.skipped} bad record(s) of "
                  f"{self.data.describe()}", flush=True)
        return {f"{self.type}/{self.name}/{k}": v for k, v in metrics.items()}

    def __call__(self, params) -> dict:
        raise NotImplementedError
