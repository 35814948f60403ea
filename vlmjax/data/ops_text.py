"""Text ops of the registry (ops.py) that any task may use.

  tokenize(max_len, add_bos, eos, key="text")   strings `key` (any shape S) -> int32 ids
                         [*S, max_len] in `key` and a bool mask (True on real tokens) in
                         `key + "_mask"`, by the pipeline's tokenizer (`input.tokenizer`);
                         max_len / add_bos / eos default to input.max_text_len / add_bos / eos.
                         Batched: one `tf.numpy_function` call per batch, in the tokenizer's
                         native batch encoder (tokenizers.py).
"""
from __future__ import annotations

from vlmjax.data.ops import Op, OpContext, register_op
from vlmjax.data.tf_cpu import tf


@register_op("tokenize", batched=True)
def tokenize(max_len: int | None = None, add_bos: bool | None = None, eos: str | None = None,
             key: str = "text", *, context: OpContext | None = None) -> Op:
    context = context or OpContext()
    max_len = context.max_text_len if max_len is None else max_len
    add_bos = context.add_bos if add_bos is None else add_bos
    eos = context.eos if eos is None else eos
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len {max_len!r} must be a positive integer "
                         "(default: input.max_text_len)")
    tokenizer = context.tokenizer
    tokenizer.encode_batch([""], max_len, add_bos, eos)  # bad BOS/EOS/length settings fail here

    def encode(texts):
        ids, mask = tokenizer.encode_batch(texts.reshape(-1), max_len, add_bos, eos)
        return ids.reshape(texts.shape + (max_len,)), mask.reshape(texts.shape + (max_len,))

    def op(example):
        texts = example[key]
        ids, mask = tf.numpy_function(encode, [texts], [tf.int32, tf.bool], stateful=False)
        shape = texts.shape.concatenate([max_len])
        ids.set_shape(shape)
        mask.set_shape(shape)
        return {**example, key: ids, f"{key}_mask": mask}
    return op
