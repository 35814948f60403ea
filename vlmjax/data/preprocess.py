"""The per-example op string of `input.preprocess`, such as

    "caption_random|inception_crop|flip_caption_aware|value_range"

Ops come from the registry (ops.py; image ops in ops_image.py, caption choice in
ops_contrastive.py) and may take Python-literal arguments ("resize(48)|value_range(0, 1)").
The string must have exactly one size op (resize_crop, resize_pad, resize, inception_crop,
random_resized_crop, or any op registered with kind="size"), at most one flip, a value op last
(value_range, normalize_clip, normalize), and a caption op (caption_random, caption_first), if
any, first: flip_caption_aware reads the chosen caption. Without a caption op the task's
example transform chooses one.

This module keeps the earlier function interface (`preprocess.resize_crop(16)(example)`,
`preprocess.flip(example)`, `make_preprocess_fn(spec, image_size)`) over the registry.
"""
from __future__ import annotations

from vlmjax.data import ops, ops_contrastive, ops_image
from vlmjax.data.ops import Example, Op  # noqa: F401

CLIP_MEAN, CLIP_STD = ops_image.CLIP_MEAN, ops_image.CLIP_STD
decode = ops_image.decode_image
mentions_left_or_right = ops_image.mentions_left_or_right
resize_crop, resize_pad, resize = ops_image.resize_crop, ops_image.resize_pad, ops_image.resize
inception_crop = ops_image.inception_crop
# Ops without arguments, as example -> example functions.
caption_random, caption_first = ops_contrastive.caption_random(), ops_contrastive.caption_first()
flip, flip_caption_aware = ops_image.flip(), ops_image.flip_caption_aware()
value_range, normalize_clip = ops_image.value_range(), ops_image.normalize_clip()

TEXT_OPS = ops.ops_of_kind("text")
SIZE_OPS = ops.ops_of_kind("size")
FLIP_OPS = ops.ops_of_kind("flip")
VALUE_OPS = ops.ops_of_kind("value")


def parse_ops(spec: str) -> list[str]:
    """Validates an input.preprocess string (see the module docstring); returns the op names."""
    try:
        parts = [ops._parse_one(p) for p in ops._split_top_level(spec)]
    except ValueError as error:
        raise ValueError(f"input.preprocess={spec!r}: {error}") from None
    unknown = [op.name for op in parts if op.name not in ops.registered_ops()]
    if unknown:
        raise ValueError(f"input.preprocess={spec!r}: unknown op(s) {unknown}; valid ops: "
                         f"{ops.registered_ops()}")
    try:
        parsed = ops.parse(spec)
    except ValueError as error:
        raise ValueError(f"input.preprocess={spec!r}: {error}") from None
    if any(op.info.batched for op in parsed):
        raise ValueError(f"input.preprocess={spec!r}: batched ops "
                         f"{[op.name for op in parsed if op.info.batched]} belong to the task's "
                         "example transform, not to the per-example string")
    kinds = [op.info.kind for op in parsed]
    names = [op.name for op in parsed]
    for kind, what in (("size", "size"), ("value", "value")):
        chosen = [name for name, k in zip(names, kinds) if k == kind]
        if len(chosen) != 1:
            raise ValueError(f"input.preprocess={spec!r}: needs exactly one {what} op of "
                             f"{list(ops.ops_of_kind(kind))}, got {chosen}")
    if kinds.count("text") > 1 or ("text" in kinds and kinds[0] != "text"):
        raise ValueError(f"input.preprocess={spec!r}: the text op must come first (flips read "
                         "the chosen caption) and there is at most one")
    if kinds[-1] != "value":
        raise ValueError(f"input.preprocess={spec!r}: the value op must come last")
    if kinds.count("flip") > 1:
        raise ValueError(f"input.preprocess={spec!r}: at most one flip op")
    return names


def make_preprocess_fn(spec: str, image_size: int, crop_area_min: float = 0.05) -> Op:
    """The composition of the ops named in `spec`; ops without a size use `image_size`."""
    parse_ops(spec)
    return ops.compose(ops.parse(spec), ops.OpContext(image_size=image_size,
                                                      crop_area_min=crop_area_min))
