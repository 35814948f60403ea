"""The registry of preprocessing ops, in big_vision's spirit: an op string such as

    "resize_crop(64)|flip|value_range(-1, 1)|tokenize(max_len=16)"

names ops left to right, each with optional Python-literal arguments. Modules (and tasks) add
ops with a decorator on the op's factory:

    @register_op("value_range", kind="value")
    def value_range(vmin=-1.0, vmax=1.0):
        def op(example):
            return {**example, "image": ...}
        return op

A factory takes the op's arguments and returns `op(example) -> example` on one example dict of
tensors (the pipeline's example keys: pipeline.py). A factory that declares a `context`
parameter also gets the pipeline's `OpContext` (image size, tokenizer, seeds): so `resize_crop`
without an argument uses `input.image_size`, and `tokenize` the configured tokenizer.
`batched=True` ops run on whole batches (leading dim B) after batching, where a
`tf.numpy_function` pays its Python call once per batch (tokenizers); they come after every
per-example op. `kind` groups ops for structural checks (preprocess.parse_ops): "text" (caption
choice), "size", "flip", "value". `reads` names the record fields beyond image / texts / label /
key / conversation that the op reads (e.g. vlm_shapes' "boxes"): the sources parse only those.

An unknown op or arguments its factory does not take is a ValueError naming the op and what is
valid (the registered ops, or the factory's signature).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from typing import Any, Callable, Sequence

Example = dict
Op = Callable[[Example], Example]
# Modules whose import registers the built-in ops (tasks import their own op modules).
BUILTIN_OP_MODULES = ("vlmjax.data.ops_image", "vlmjax.data.ops_contrastive",
                      "vlmjax.data.ops_text", "vlmjax.data.ops_lm")


@dataclasses.dataclass(frozen=True)
class OpInfo:
    name: str
    factory: Callable[..., Op]
    kind: str | None
    batched: bool
    reads: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One parsed op: `name(*args, **kwargs)`; `text` is how it was written."""
    name: str
    args: tuple
    kwargs: dict
    text: str

    @property
    def info(self) -> OpInfo:
        return get_op(self.name)


@dataclasses.dataclass
class OpContext:
    """What ops may read from the pipeline's configuration (all optional)."""
    image_size: int | None = None
    crop_area_min: float = 0.05
    max_text_len: int | None = None
    add_bos: bool = False
    eos: str = "none"
    tokenizer_fn: Callable[[], Any] | None = None  # resolved on first use
    seed_fn: Callable[..., int] | None = None  # seed_fn(purpose) -> int, per host and purpose
    _tokenizer: Any = dataclasses.field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_fn is None:
                raise ValueError("this op needs a tokenizer, and the pipeline has none")
            self._tokenizer = self.tokenizer_fn()
        return self._tokenizer

    def seed(self, *purpose) -> int:
        if self.seed_fn is None:
            return 0
        return self.seed_fn(*purpose)


_REGISTRY: dict[str, OpInfo] = {}
_builtins_loaded = False


def register_op(name: str, *, kind: str | None = None, batched: bool = False,
                reads: Sequence[str] = ()):
    """Decorator registering `factory` as op `name` (see the module docstring)."""
    def decorate(factory):
        existing = _REGISTRY.get(name)
        if existing is not None and existing.factory.__qualname__ != factory.__qualname__:
            raise ValueError(f"op {name!r} is already registered by {existing.factory.__module__}")
        _REGISTRY[name] = OpInfo(name, factory, kind, batched, tuple(reads))
        return factory
    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_OP_MODULES:
            importlib.import_module(module)


def registered_ops() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_op(name: str) -> OpInfo:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown op {name!r}; registered ops: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def ops_of_kind(kind: str) -> tuple[str, ...]:
    _load_builtins()
    return tuple(name for name, info in _REGISTRY.items() if info.kind == kind)


def _split_top_level(spec: str) -> list[str]:
    """Splits on '|' outside brackets and quotes (arguments may hold either)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(spec):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [part.strip() for part in parts if part.strip()]


def _parse_one(text: str) -> OpSpec:
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"op {text!r} is not `name` or `name(args)` with Python-literal "
                         "arguments") from None
    if isinstance(node, ast.Name):
        return OpSpec(node.id, (), {}, text)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"op {text!r} is not `name` or `name(args)` with Python-literal "
                         "arguments")
    try:
        args = tuple(ast.literal_eval(arg) for arg in node.args)
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
        raise ValueError(f"op {text!r}: arguments must be Python literals (numbers, strings, "
                         "lists, dicts, True/False/None)") from None
    return OpSpec(node.func.id, args, kwargs, text)


def parse(spec: str | Sequence[str]) -> list[OpSpec]:
    """An op string ("a|b(1)") or a list of them -> OpSpecs of registered ops, arguments checked
    against each factory's signature."""
    texts = [spec] if isinstance(spec, str) else list(spec)
    parsed = [_parse_one(part) for text in texts for part in _split_top_level(text)]
    for op in parsed:
        _bind(op)
    return parsed


def _signature_text(info: OpInfo) -> str:
    parameters = [str(p) for p in inspect.signature(info.factory).parameters.values()
                  if p.name != "context"]
    return f"{info.name}({', '.join(parameters)})"


def _bind(op: OpSpec) -> inspect.BoundArguments:
    info = get_op(op.name)
    signature = inspect.signature(info.factory)
    if "context" in op.kwargs:
        raise ValueError(f"op {op.text!r}: `context` is given by the pipeline, not an argument")
    context_param = "context" in signature.parameters
    try:
        return signature.bind(*op.args, **op.kwargs, **({"context": None} if context_param
                                                         else {}))
    except TypeError as error:
        raise ValueError(f"op {op.text!r}: {error}; it takes {_signature_text(info)}") from None


def build(op: OpSpec, context: OpContext | None = None) -> Op:
    """The op function of one parsed op."""
    info = get_op(op.name)
    kwargs = dict(op.kwargs)
    if "context" in inspect.signature(info.factory).parameters:
        kwargs["context"] = context or OpContext()
    try:
        return info.factory(*op.args, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"op {op.text!r}: {error}") from None


def compose(ops: Sequence[OpSpec], context: OpContext | None = None) -> Op:
    """Applies the ops left to right; an op reading a key that no earlier step produced fails
    with the op's name and the keys there are."""
    built = [(op, build(op, context)) for op in ops]

    def apply(example: Example) -> Example:
        for op, fn in built:
            try:
                example = fn(example)
            except KeyError as error:
                raise ValueError(f"op {op.text!r} reads the key {error.args[0]!r}, which no "
                                 f"earlier op produced; the example has {sorted(example)} (a "
                                 "record field of the source must be in the op's `reads`)"
                                 ) from None
        return example
    return apply
