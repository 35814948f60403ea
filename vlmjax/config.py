"""Config files, presets and overrides.

A config file defines `get_config(arg)`; `arg` is the text after ':' in `file.py:ARGS`, which
`parse_preset_args` turns into a ConfigDict: `runlocal,res=64,batch=256` ->
{runlocal: True, res: 64, batch: 256}. Overrides are `key.sub=value` strings; an unknown key is
an error that names the nearest valid one. Consumers check their sections with `check_keys`, so a
key that nothing reads is an error too.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    pass


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def parse_preset_args(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'runlocal,res=64' -> ConfigDict(runlocal=True, res=64), over `defaults`; a preset name
    that `defaults` does not know is an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if defaults and key not in defaults:
            raise ConfigError(f"unknown config preset {key!r}{_suggest(key, defaults)}; "
                              f"valid: {sorted(defaults)}")
        out[key] = _literal(value) if value else True
    return ml_collections.ConfigDict(out)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/siglip/tiny.py:runlocal' -> the config its get_config('runlocal') returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_vlmjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg or None)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flat_keys(config: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            keys += flat_keys(value, prefix + key + ".")
    return keys


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    """Apply 'a.b=value' overrides in place; values are Python literals or bare strings."""
    valid = flat_keys(config)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"config override {override!r} is not of the form key=value")
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, valid)}")
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        with node.ignore_type():
            node[leaf] = _literal(value)
    return config


def plain(value: Any) -> Any:
    """A ConfigDict (a config section) as a plain dict; any other value as it is."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def plain_dict(section: Any) -> dict:
    """A config section (ConfigDict, dict or None) as a plain dict ({} for None)."""
    return dict(plain(section) or {})


def check_keys(section: Mapping, allowed: Iterable[str], where: str):
    """Raise for a key of `section` that its consumer does not read."""
    allowed = list(allowed)
    for key in section.keys():
        if key not in allowed:
            raise ConfigError(f"config key {where}.{key} is not used by anything"
                              f"{_suggest(key, allowed)}; valid keys of {where}: {sorted(allowed)}")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
