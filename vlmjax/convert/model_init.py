"""`config.model_init`: which pretrained source initialises which part of a model.

    model_init = SRC                                    # the whole model
    model_init = {"source": SRC, "prefix": "model"}     # the whole model, from a subtree of SRC
    model_init = {"image": SRC}                         # one sub-model; the rest: random init
    model_init = {"image": {"source": SRC, "prefix": "vision_tower"}, "text": SRC2}

A task names its sub-models and the parameter subtrees each one owns (`sub_models`, e.g. the
contrastive task's image -> (image_tower, image_proj), text -> (text_tower, text_proj)). Without
a prefix a sub-model's subtrees are read at the same paths of the source's params. With a prefix
the source's subtree at that path (`a/b` for nested ones) is read into the sub-model's first
subtree, its tower (e.g. another model's `vision_tower` into `image_tower`), and the sub-model's
other subtrees keep their random init. Sub-models not named keep their random init.

Any task reuses this: its `pretrained_params` calls `parse_model_init` (eagerly, to validate the
config) and `assemble_params` with its own loader and random init. Every error names the
sub-model, the source and, for shapes, each mismatching parameter with both shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from vlmjax.config import ConfigError, plain
from vlmjax.convert.params import SEP, format_problems, shape_problems
from vlmjax.models import scan_layout

SPEC_KEYS = ("source", "prefix")
WHOLE = "model_init"  # how errors name the whole-model entry


@dataclass(frozen=True)
class InitEntry:
    sub_model: str | None   # None: the whole model
    source: str
    prefix: str | None      # the source's subtree to read, or None: the same paths as ours

    @property
    def name(self) -> str:
        return WHOLE if self.sub_model is None else f"{WHOLE}.{self.sub_model}"


def _entry(sub_model: str | None, value, where: str) -> InitEntry:
    value = plain(value)
    if isinstance(value, str):
        spec = {"source": value}
    elif isinstance(value, Mapping):
        spec = dict(value)
    else:
        raise ConfigError(f"{where} must be a source path or {{'source': SRC, 'prefix': PATH}}, "
                          f"got {value!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {list(SPEC_KEYS)}")
    source, prefix = spec.get("source"), spec.get("prefix") or None
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where} needs a non-empty 'source' (a pretrained model path), got "
                          f"{source!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"{where}.prefix must be a parameter path such as 'vision_tower', got "
                          f"{prefix!r}")
    return InitEntry(sub_model, source, prefix.strip(SEP) if prefix else None)


def parse_model_init(model_init, sub_models: Mapping[str, Sequence[str]]) -> list[InitEntry]:
    """The entries of `config.model_init` (see the module docstring); [] for '' / None / {}.
    Pure: reads no files, so a task can call it when it validates its config."""
    model_init = plain(model_init)
    if not model_init:
        return []
    if isinstance(model_init, str) or (isinstance(model_init, Mapping) and "source" in model_init):
        return [_entry(None, model_init, WHOLE)]
    if not isinstance(model_init, Mapping):
        raise ConfigError(f"model_init must be a source path, {{'source': SRC, 'prefix': PATH}} "
                          f"or a dict of sources per sub-model {sorted(sub_models)}, got "
                          f"{model_init!r}")
    unknown = sorted(set(model_init) - set(sub_models))
    if unknown:
        raise ConfigError(f"model_init names unknown sub-model(s) {unknown}; this task's "
                          f"sub-models: {sorted(sub_models)} (or give one source for the whole "
                          "model)")
    return [_entry(name, value, f"{WHOLE}.{name}") for name, value in model_init.items()
            if plain(value)]


def _subtree(tree: Mapping[str, Any], path: str, entry: InitEntry, whose: str | None = None
             ) -> Any:
    node = tree
    for key in path.split(SEP):
        if not isinstance(node, Mapping) or key not in node:
            top = sorted(tree) if isinstance(tree, Mapping) else []
            raise ConfigError(f"{entry.name}: {whose or entry.source} has no parameters under "
                              f"{path!r}; its top-level subtrees: {top}")
        node = node[key]
    return node


def _has(tree: Mapping[str, Any], path: str) -> bool:
    """Whether `tree` has a subtree at `path` (a model without e.g. an image projection has
    none: nothing to read for it)."""
    for key in path.split(SEP):
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def _set_subtree(tree: dict, path: str, value) -> dict:
    *parents, leaf = path.split(SEP)
    out = dict(tree)
    node = out
    for key in parents:
        node[key] = dict(node[key])
        node = node[key]
    node[leaf] = value
    return out


def _fitted(entry: InitEntry, ours: str, theirs: Any, want: Any) -> Any:
    """`theirs` in the layout of `want` (scanned or unrolled blocks), shape-checked."""
    theirs = scan_layout.match_layout(theirs, want) if isinstance(theirs, Mapping) else theirs
    problems = shape_problems({ours: want} if ours else want, {ours: theirs} if ours else theirs)
    if problems:
        read = f" (read from its {entry.prefix!r})" if entry.prefix else ""
        raise ConfigError(f"{entry.name}: {entry.source}{read} does not fit config.model at "
                          f"{len(problems)} parameter(s) (build config.model from the source's "
                          f"config: vlmjax.convert.pretrained_recipe):\n  "
                          f"{format_problems(problems)}")
    return theirs


def assemble_params(entries: Sequence[InitEntry], sub_models: Mapping[str, Sequence[str]],
                    abstract_params: Mapping[str, Any], load: Callable[[str], Mapping],
                    init_random: Callable[[], Mapping]) -> dict:
    """The model's params with each entry's part read from its source.

    `load(source)` -> the source's nested params (each source is loaded once); `init_random()`
    -> the model's random params (unboxed), called only for sub-model entries: what no entry
    names (other sub-models, parameters of no sub-model such as a temperature) keeps it.
    `abstract_params` gives the shapes every part is checked against.
    """
    loaded: dict[str, Mapping] = {}

    def source_params(entry):
        if entry.source not in loaded:
            loaded[entry.source] = load(entry.source)
        tree = loaded[entry.source]
        return _subtree(tree, entry.prefix, entry) if entry.prefix else tree

    whole = [e for e in entries if e.sub_model is None]
    if whole:
        if len(entries) > 1:
            raise ConfigError("model_init is either one source for the whole model or a dict of "
                              "sources per sub-model, not both")
        return dict(_fitted(whole[0], "", source_params(whole[0]), abstract_params))

    params = dict(init_random())
    for entry in entries:
        subtrees = sub_models[entry.sub_model]
        # With a prefix the source's subtree goes into the sub-model's tower; otherwise every
        # subtree of the sub-model is read at its own path.
        pairs = [(subtrees[0], None)] if entry.prefix else [(path, path) for path in subtrees
                                                            if _has(abstract_params, path)]
        tree = source_params(entry)
        for ours, theirs_path in pairs:
            theirs = tree if theirs_path is None else _subtree(tree, theirs_path, entry)
            want = _subtree(abstract_params, ours, entry, whose="config.model")
            params = _set_subtree(params, ours, _fitted(entry, ours, theirs, want))
    return params
