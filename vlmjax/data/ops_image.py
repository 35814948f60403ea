"""Image ops of the registry (ops.py). They read and write `image` (uint8 [H, W, 3] after the
pipeline's decode; float32 after a size op) and draw randomness from the example's `_seed`
(int64 [2], stateless per example position: the same crop on every run and after a resume).

  decode                      (the pipeline decodes already; kept so big_vision-style strings
                              starting with it work)
  resize_crop(size)           aspect-preserving resize of the shorter side to size, centre crop
  resize_pad(size)            aspect-preserving resize of the longer side to size, centre pad
  resize(size)                plain resize to size x size (aspect ratio not kept)
  inception_crop(size, area_min, area_max)   random crop of area in [area_min, area_max] and
                              aspect in [3/4, 4/3], resized to size x size
  random_resized_crop(...)    the same (torchvision's name)
  flip                        horizontal flip with probability 1/2
  flip_caption_aware          the same, never when the chosen caption (`text`) says left/right
  value_range(vmin, vmax)     [0, 255] -> [vmin, vmax] (default [-1, 1])
  normalize_clip              (x / 255 - mean) / std with CLIP's mean and std
  normalize(mean, std)        the same with a given per-channel mean and std (on [0, 1] pixels)

`size` defaults to `input.image_size`, `area_min` to `input.crop_area_min`. Size ops output
float32 [size, size, 3] in [0, 255].
"""
from __future__ import annotations

from vlmjax.data.ops import Example, Op, OpContext, register_op
from vlmjax.data.tf_cpu import tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LEFT_RIGHT = r".*\b(left|right)\b.*"
# Salts of the per-op seeds: different ops must not share randomness (a flip correlated with a
# crop). The caption choice uses 1 (ops_contrastive.py).
CROP_SALT, FLIP_SALT = 2, 3


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3]. Raises on corrupt data; the pipeline
    drops and counts such examples."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def op_seed(example: Example, salt: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(example["_seed"], salt)


def _size(size, context: OpContext | None) -> int:
    size = size if size is not None else (context.image_size if context else None)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size {size!r} must be a positive integer (default: input.image_size)")
    return size


@register_op("decode")
def decode():
    def op(example):
        image = example["image"]
        if image.dtype == tf.string:
            image = decode_image(image)
        return {**example, "image": image}
    return op


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
    return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                           method="bilinear", antialias=True)


def _scaled_size(image: tf.Tensor, target: int, use_shorter: bool):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    side = tf.reduce_min(shape) if use_shorter else tf.reduce_max(shape)
    new = tf.cast(tf.round(shape * (target / side)), tf.int32)
    # Rounding must not leave the side that should equal `target` one pixel short.
    return (tf.maximum(new, target) if use_shorter else tf.minimum(tf.maximum(new, 1), target))


def _fit_then_crop_or_pad(size: int, use_shorter: bool) -> Op:
    """Scale so the shorter (crop) or longer (pad) side is `size`, then centre-crop/pad."""
    def op(example):
        new = _scaled_size(example["image"], size, use_shorter=use_shorter)
        image = _resize(example["image"], new[0], new[1])
        return {**example, "image": tf.image.resize_with_crop_or_pad(image, size, size)}
    return op


@register_op("resize_crop", kind="size")
def resize_crop(size: int | None = None, *, context: OpContext | None = None) -> Op:
    return _fit_then_crop_or_pad(_size(size, context), use_shorter=True)


@register_op("resize_pad", kind="size")
def resize_pad(size: int | None = None, *, context: OpContext | None = None) -> Op:
    return _fit_then_crop_or_pad(_size(size, context), use_shorter=False)


@register_op("resize", kind="size")
def resize(size: int | None = None, *, context: OpContext | None = None) -> Op:
    size = _size(size, context)

    def op(example):
        return {**example, "image": _resize(example["image"], size, size)}
    return op


@register_op("inception_crop", kind="size")
def inception_crop(size: int | None = None, area_min: float | None = None,
                   area_max: float = 1.0, *, context: OpContext | None = None) -> Op:
    size = _size(size, context)
    if area_min is None:
        area_min = context.crop_area_min if context else 0.05
    if not 0.0 < area_min <= area_max <= 1.0:
        raise ValueError(f"area_min={area_min}, area_max={area_max}: need 0 < area_min <= "
                         "area_max <= 1")

    def op(example):
        image = example["image"]
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
            seed=op_seed(example, CROP_SALT), min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(area_min, area_max), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        crop = tf.slice(image, begin, crop_size)
        return {**example, "image": _resize(crop, size, size)}
    return op


register_op("random_resized_crop", kind="size")(inception_crop)


def random_flip(example: Example, allowed: tf.Tensor) -> Example:
    coin = tf.random.stateless_uniform([], op_seed(example, FLIP_SALT)) < 0.5
    image = example["image"]
    image = tf.cond(tf.logical_and(coin, allowed), lambda: tf.reverse(image, axis=[1]),
                    lambda: image)
    return {**example, "image": image}


@register_op("flip", kind="flip")
def flip() -> Op:
    return lambda example: random_flip(example, tf.constant(True))


def mentions_left_or_right(text: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_full_match(tf.strings.lower(text), _LEFT_RIGHT)


@register_op("flip_caption_aware", kind="flip")
def flip_caption_aware() -> Op:
    """Reads `text`, the chosen caption: a caption op must come before it."""
    return lambda example: random_flip(
        example, tf.logical_not(mentions_left_or_right(example["text"])))


@register_op("value_range", kind="value")
def value_range(vmin: float = -1.0, vmax: float = 1.0) -> Op:
    if not vmin < vmax:
        raise ValueError(f"vmin={vmin} must be below vmax={vmax}")

    def op(example):
        image = tf.cast(example["image"], tf.float32)
        if (vmin, vmax) == (-1.0, 1.0):  # the pinned batches' exact arithmetic
            return {**example, "image": image / 127.5 - 1.0}
        return {**example, "image": image * ((vmax - vmin) / 255.0) + vmin}
    return op


@register_op("normalize", kind="value")
def normalize(mean, std) -> Op:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean={mean}, std={std}: need 3 channel values each, std > 0")

    def op(example):
        image = tf.cast(example["image"], tf.float32) / 255.0
        return {**example, "image": (image - tuple(mean)) / tuple(std)}
    return op


@register_op("normalize_clip", kind="value")
def normalize_clip() -> Op:
    return normalize(CLIP_MEAN, CLIP_STD)
