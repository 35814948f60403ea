"""The BLIP task's ops (ops.py registry).

  image_id    `image_id` int32: which image a row shows, so that ITC targets and ITM hard
              negatives treat two captions of one image as positives of each other. A hash of
              the record's `key` (TFDS id, webdataset key, LLaVA/CSV file name); a record
              without a key gets a per-example number (its rows are then all distinct images).
"""
from __future__ import annotations

from vlmjax.data.ops import Op, register_op
from vlmjax.data.ops_image import op_seed
from vlmjax.data.tf_cpu import tf

IMAGE_ID_SALT = 7  # per-op seed salt (ops_image.py and ops_contrastive.py have the others)
_ID_RANGE = 2 ** 31 - 1


@register_op("image_id")
def image_id() -> Op:
    def op(example):
        key = example["key"]
        hashed = tf.strings.to_hash_bucket_fast(key, _ID_RANGE)
        fallback = tf.math.floormod(op_seed(example, IMAGE_ID_SALT)[0], _ID_RANGE)
        ident = tf.where(tf.strings.length(key) > 0, hashed, tf.cast(fallback, tf.int64))
        return {**example, "image_id": tf.cast(ident, tf.int32)}
    return op
