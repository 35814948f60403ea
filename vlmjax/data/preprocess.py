"""Composable tf.data preprocessing ops, chosen by a config string such as

    "caption_random|inception_crop|flip_caption_aware|value_range"

Ops run left to right on one example dict: `image` (uint8 [H, W, 3], already decoded by `decode`),
`texts` (string [N], the captions) and `_seed` (int64 [2], a per-example stateless seed, so random
ops give the same result for the same example position on every run and after a resume).

  text ops (exactly one; set `text` from `texts`):
    caption_random       one caption at random          caption_first   the first caption
  size ops (exactly one; output float32 [S, S, 3] in [0, 255]):
    resize_crop          aspect-preserving resize of the shorter side to S, centre crop
    resize_pad           aspect-preserving resize of the longer side to S, centre zero-pad
    resize               plain resize to S x S (aspect ratio not kept)
    inception_crop       random crop of area_range x aspect [3/4, 4/3], resized to S x S
    random_resized_crop  the same as inception_crop (torchvision's name)
  flips (optional):
    flip                 horizontal flip with probability 1/2
    flip_caption_aware   the same, but never when the chosen caption says "left" or "right"
  value ops (exactly one, last):
    value_range          [0, 255] -> [-1, 1]
    normalize_clip       (x / 255 - mean) / std with CLIP's mean and std

Tokenizing happens on whole batches (pipeline.py), not per example.
"""
from __future__ import annotations

from typing import Callable

from vlmjax.data.tf_cpu import tf

Example = dict
Op = Callable[[Example], Example]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LEFT_RIGHT = r".*\b(left|right)\b.*"


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3]. Raises on corrupt data; the pipeline
    drops and counts such examples."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _op_seed(example: Example, salt: int) -> tf.Tensor:
    # Different ops must not share randomness, or a flip would correlate with a crop.
    return tf.random.experimental.stateless_fold_in(example["_seed"], salt)


def caption_random(example: Example) -> Example:
    texts = example["texts"]
    choice = tf.random.stateless_uniform([], _op_seed(example, 1), 0, tf.shape(texts)[0],
                                         dtype=tf.int32)
    return {**example, "text": texts[choice]}


def caption_first(example: Example) -> Example:
    return {**example, "text": example["texts"][0]}


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
    return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                           method="bilinear", antialias=True)


def _scaled_size(image: tf.Tensor, target: int, use_shorter: bool):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    side = tf.reduce_min(shape) if use_shorter else tf.reduce_max(shape)
    new = tf.cast(tf.round(shape * (target / side)), tf.int32)
    # Rounding must not leave the side that should equal `target` one pixel short.
    return (tf.maximum(new, target) if use_shorter else tf.minimum(tf.maximum(new, 1), target))


def resize_crop(size: int) -> Op:
    def op(example):
        new = _scaled_size(example["image"], size, use_shorter=True)
        image = _resize(example["image"], new[0], new[1])
        return {**example, "image": tf.image.resize_with_crop_or_pad(image, size, size)}
    return op


def resize_pad(size: int) -> Op:
    def op(example):
        new = _scaled_size(example["image"], size, use_shorter=False)
        image = _resize(example["image"], new[0], new[1])
        return {**example, "image": tf.image.resize_with_crop_or_pad(image, size, size)}
    return op


def resize(size: int) -> Op:
    def op(example):
        return {**example, "image": _resize(example["image"], size, size)}
    return op


def inception_crop(size: int, area_min: float = 0.05, area_max: float = 1.0) -> Op:
    def op(example):
        image = example["image"]
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
            seed=_op_seed(example, 2), min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(area_min, area_max), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        crop = tf.slice(image, begin, crop_size)
        return {**example, "image": _resize(crop, size, size)}
    return op


def _random_flip(example: Example, allowed: tf.Tensor) -> Example:
    coin = tf.random.stateless_uniform([], _op_seed(example, 3)) < 0.5
    image = example["image"]
    image = tf.cond(tf.logical_and(coin, allowed), lambda: tf.reverse(image, axis=[1]),
                    lambda: image)
    return {**example, "image": image}


def flip(example: Example) -> Example:
    return _random_flip(example, tf.constant(True))


def mentions_left_or_right(text: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_full_match(tf.strings.lower(text), _LEFT_RIGHT)


def flip_caption_aware(example: Example) -> Example:
    return _random_flip(example, tf.logical_not(mentions_left_or_right(example["text"])))


def value_range(example: Example) -> Example:
    return {**example, "image": tf.cast(example["image"], tf.float32) / 127.5 - 1.0}


def normalize_clip(example: Example) -> Example:
    image = tf.cast(example["image"], tf.float32) / 255.0
    return {**example, "image": (image - CLIP_MEAN) / CLIP_STD}


TEXT_OPS = ("caption_random", "caption_first")
SIZE_OPS = ("resize_crop", "resize_pad", "resize", "inception_crop", "random_resized_crop")
FLIP_OPS = ("flip", "flip_caption_aware")
VALUE_OPS = ("value_range", "normalize_clip")
ALL_OPS = TEXT_OPS + SIZE_OPS + FLIP_OPS + VALUE_OPS


def parse_ops(spec: str) -> list[str]:
    """Validates an op string: known names, one text op first, one size op, one value op last."""
    names = [name.strip() for name in spec.split("|") if name.strip()]
    unknown = [name for name in names if name not in ALL_OPS]
    if unknown:
        raise ValueError(f"input.preprocess={spec!r}: unknown op(s) {unknown}; valid ops: "
                         f"{list(ALL_OPS)}")
    for group, what in ((TEXT_OPS, "text"), (SIZE_OPS, "size"), (VALUE_OPS, "value")):
        chosen = [name for name in names if name in group]
        if len(chosen) != 1:
            raise ValueError(f"input.preprocess={spec!r}: needs exactly one {what} op of "
                             f"{list(group)}, got {chosen}")
    if names[0] not in TEXT_OPS or names[-1] not in VALUE_OPS:
        raise ValueError(f"input.preprocess={spec!r}: the text op must come first (flips read "
                         "the chosen caption) and the value op last")
    if len([name for name in names if name in FLIP_OPS]) > 1:
        raise ValueError(f"input.preprocess={spec!r}: at most one flip op")
    return names


def make_preprocess_fn(spec: str, image_size: int, crop_area_min: float = 0.05) -> Op:
    """The composition of the ops named in `spec` (see the module docstring)."""
    factories = {
        "caption_random": lambda: caption_random, "caption_first": lambda: caption_first,
        "resize_crop": lambda: resize_crop(image_size),
        "resize_pad": lambda: resize_pad(image_size),
        "resize": lambda: resize(image_size),
        "inception_crop": lambda: inception_crop(image_size, crop_area_min),
        "random_resized_crop": lambda: inception_crop(image_size, crop_area_min),
        "flip": lambda: flip, "flip_caption_aware": lambda: flip_caption_aware,
        "value_range": lambda: value_range, "normalize_clip": lambda: normalize_clip,
    }
    ops = [factories[name]() for name in parse_ops(spec)]

    def preprocess(example: Example) -> Example:
        for op in ops:
            example = op(example)
        return example
    return preprocess
