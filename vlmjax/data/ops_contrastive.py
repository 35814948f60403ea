"""The contrastive task's ops (ops.py registry) and its example transform.

  caption_random          `text` = one of the record's captions (`texts`), at random
  caption_first           `text` = the first caption
  hard_negatives(count, vocabulary="vlm_shapes", key="text")   `neg_<key>` string [count] of
                          word-swapped negatives of `key` and `neg_valid` bool [count] (False:
                          the caption has no vocabulary word; data/hard_negatives.py). Batched
                          (one Python call per batch); reads `_index`, so a resumed run gets
                          the same negatives.

`example_transform(input_config, training)` is the contrastive task's part of the pipeline:
after input.preprocess (image ops, and the caption choice in the configs' strings) it chooses a
caption if input.preprocess did not, adds the hard negatives (training, input.hard_negatives)
and tokenizes: exactly the batches the pipeline made before tasks owned their transforms.
"""
from __future__ import annotations

import numpy as np

from vlmjax.data import hard_negatives as hard_negatives_lib
from vlmjax.data import ops
from vlmjax.data.ops import Op, OpContext, register_op
from vlmjax.data.ops_image import op_seed
from vlmjax.data.tf_cpu import tf

CAPTION_SALT = 1  # per-op seed salt (ops_image.py has the others)


@register_op("caption_random", kind="text")
def caption_random() -> Op:
    def op(example):
        texts = example["texts"]
        choice = tf.random.stateless_uniform([], op_seed(example, CAPTION_SALT), 0,
                                             tf.shape(texts)[0], dtype=tf.int32)
        return {**example, "text": texts[choice]}
    return op


@register_op("caption_first", kind="text")
def caption_first() -> Op:
    return lambda example: {**example, "text": example["texts"][0]}


@register_op("hard_negatives", batched=True)
def hard_negatives(count: int, vocabulary="vlm_shapes", key: str = "text", *,
                   context: OpContext | None = None) -> Op:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count {count!r} must be an integer >= 1")
    swapper = hard_negatives_lib.make_swapper({"count": count, "vocabulary": vocabulary})
    seed = (context or OpContext()).seed("negatives")

    def make(texts, indices):
        negatives, valid = hard_negatives_lib.batch_negatives(
            swapper, [t.decode() for t in texts], indices, seed)
        return np.array(negatives, dtype=object).reshape(len(texts), count), valid

    def op(batch):
        negatives, valid = tf.numpy_function(make, [batch[key], batch["_index"]],
                                             [tf.string, tf.bool], stateful=False)
        negatives.set_shape([None, count])
        valid.set_shape([None, count])
        return {**batch, f"neg_{key}": negatives, "neg_valid": valid}
    return op


def example_transform(input_config, training: bool) -> list[str]:
    """The contrastive ops after input.preprocess (see the module docstring)."""
    preprocess = ops.parse(input_config.preprocess)
    transform = []
    if not any(op.info.kind == "text" for op in preprocess):
        transform.append("caption_random" if training else "caption_first")
    negatives = hard_negatives_lib.make_swapper(input_config.get("hard_negatives"))
    tokenize = (f"tokenize(max_len={input_config.max_text_len}, "
                f"add_bos={bool(input_config.add_bos)}, eos={input_config.eos!r}")
    if training and negatives is not None:
        vocabulary = input_config.hard_negatives.get("vocabulary", "vlm_shapes")
        if hasattr(vocabulary, "to_dict"):
            vocabulary = vocabulary.to_dict()
        transform.append(f"hard_negatives(count={negatives.count}, vocabulary={vocabulary!r})")
        transform += [tokenize + ")", tokenize + ", key='neg_text')"]
    else:
        transform.append(tokenize + ")")
    return transform
