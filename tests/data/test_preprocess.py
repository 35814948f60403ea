"""Preprocessing ops: resizing/cropping geometry, flips, value ranges, caption choice, parsing."""
from __future__ import annotations

import numpy as np
import pytest

from tests.data.conftest import image_bytes, truncated_jpeg
from vlmjax.data import preprocess
from vlmjax.data.tf_cpu import tf


def _example(image, texts=("a caption",), index=0):
    return {"image": tf.constant(image), "texts": tf.constant(list(texts)),
            "_seed": tf.constant([0, index], tf.int64)}


def _stripes(height, width):
    """Column index as the red channel: geometry can be read back from the pixels."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    return image


def test_decode_formats_and_corrupt_data():
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        image = preprocess.decode(tf.constant(image_bytes(30, 20, fmt=fmt))).numpy()
        assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess.decode(tf.constant(truncated_jpeg())).numpy()


def test_resize_crop_keeps_aspect_and_centres():
    out = preprocess.resize_crop(16)(_example(_stripes(32, 64)))["image"].numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    # 32x64 -> 16x32, centre crop keeps source columns 16..47 of 64: red from ~16 to ~47.
    assert 14 <= out[8, 0, 0] <= 19 and 44 <= out[8, -1, 0] <= 49
    assert out[0, 8, 1] < 2 and out[-1, 8, 1] > 29  # full height kept


def test_resize_pad_keeps_everything_and_pads_with_zeros():
    out = preprocess.resize_pad(16)(_example(_stripes(32, 64) + 1))["image"].numpy()
    assert out.shape == (16, 16, 3)
    assert np.all(out[:4] == 0) and np.all(out[-4:] == 0)  # 8 rows of content in the middle
    assert out[8, 0, 0] < 4 and out[8, -1, 0] > 58  # full width kept


def test_plain_resize_and_value_ops():
    out = preprocess.resize(8)(_example(_stripes(32, 64)))["image"]
    assert out.shape == (8, 8, 3)
    full = {"image": tf.constant([[[0.0, 127.5, 255.0]]])}
    np.testing.assert_allclose(preprocess.value_range(full)["image"].numpy(), [[[-1, 0, 1]]])
    normalised = preprocess.normalize_clip(full)["image"].numpy()[0, 0]
    expected = (np.array([0.0, 0.5, 1.0]) - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
    np.testing.assert_allclose(normalised, expected, rtol=1e-5)


def test_inception_crop_is_seeded_and_varies():
    op = preprocess.inception_crop(16, area_min=0.1)
    image = _stripes(64, 64)
    a = op(_example(image, index=1))["image"].numpy()
    b = op(_example(image, index=1))["image"].numpy()
    others = [op(_example(image, index=i))["image"].numpy() for i in range(2, 10)]
    assert a.shape == (16, 16, 3)
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, other) for other in others)
    spans = [other[..., 0].max() - other[..., 0].min() for other in others]
    assert min(spans) < 60  # some crops are smaller than the whole image


def test_flip_and_caption_aware_flip():
    image = _stripes(8, 8)
    flipped = [preprocess.flip(_example(image, index=i))["image"].numpy()[0, 0, 0] == 7
               for i in range(40)]
    assert 8 < sum(flipped) < 32
    for words, may_flip in (("a red star on the left", False), ("LEFT: a star", False),
                            ("a star on the right side", False), ("a star at the top", True),
                            ("leftover cake", True)):
        results = []
        for i in range(40):
            example = {**_example(image, index=i), "text": tf.constant(words)}
            results.append(preprocess.flip_caption_aware(example)["image"].numpy()[0, 0, 0] == 7)
        assert any(results) == may_flip, words


def test_caption_choice():
    texts = ("first", "second", "third")
    chosen = {preprocess.caption_random(_example(_stripes(2, 2), texts, i))["text"].numpy()
              for i in range(40)}
    assert chosen == {b"first", b"second", b"third"}
    first = preprocess.caption_first(_example(_stripes(2, 2), texts))["text"].numpy()
    assert first == b"first"


def test_make_preprocess_fn_composes_in_order():
    fn = preprocess.make_preprocess_fn("caption_first|resize_crop|flip_caption_aware|value_range",
                                       image_size=16)
    out = fn(_example(_stripes(32, 64), ("the left one",)))
    image = out["image"].numpy()
    assert image.shape == (16, 16, 3) and -1 <= image.min() and image.max() <= 1
    assert image[8, 0, 0] < image[8, -1, 0]  # "left" in the caption: never flipped


@pytest.mark.parametrize("spec, message", [
    ("caption_first|resize_crop|blur|value_range", r"unknown op\(s\) \['blur'\]"),
    ("caption_first|value_range", "exactly one size op"),
    ("caption_first|resize|resize_crop|value_range", "exactly one size op"),
    ("resize_crop|caption_first|value_range", "text op must come first"),
    ("caption_first|resize_crop|flip|flip_caption_aware|value_range", "at most one flip"),
])
def test_parse_ops_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        preprocess.parse_ops(spec)
