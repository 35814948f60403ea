"""The op registry: parsing specs, errors, ops that tasks register, and the pipeline batching
every key the ops produce."""
from __future__ import annotations

import numpy as np
import pytest

from tests.data.conftest import TINY_SIZES
from vlmjax.data import ops, ops_contrastive, pipeline, shapes, tokenizers
from vlmjax.data.tf_cpu import tf


def test_parse_names_literal_args_and_separators_inside_args():
    parsed = ops.parse(["resize(48)|value_range(0, 1)",
                        "hard_negatives(count=2, vocabulary={'a': ['x|y'], 'b': ['z']})",
                        "tokenize(max_len=8, key='neg_text')"])
    assert [op.name for op in parsed] == ["resize", "value_range", "hard_negatives", "tokenize"]
    assert parsed[0].args == (48,) and parsed[1].args == (0, 1)
    assert parsed[2].kwargs == {"count": 2, "vocabulary": {"a": ["x|y"], "b": ["z"]}}
    assert parsed[3].kwargs == {"max_len": 8, "key": "neg_text"}
    assert parsed[3].info.batched and not parsed[0].info.batched


@pytest.mark.parametrize("spec, message", [
    ("resize(48)|blur(3)", r"unknown op 'blur'; registered ops: \[.*'resize'"),
    ("resize(48, 3, 4)", r"op 'resize\(48, 3, 4\)'.*it takes resize\(size"),
    ("value_range(lo=0)", r"unexpected keyword argument 'lo'.*value_range\(vmin"),
    ("resize(size=open)", "Python literals"),
    ("resize(", "is not `name` or `name\\(args\\)`"),
    ("resize(context=1)", "given by the pipeline"),
])
def test_bad_specs_name_the_op_and_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=message):
        ops.parse(spec)


def test_bad_argument_values_fail_at_build_with_the_op():
    with pytest.raises(ValueError, match=r"op 'value_range\(1, 0\)': vmin=1 must be below"):
        ops.build(ops.parse("value_range(1, 0)")[0])
    with pytest.raises(ValueError, match=r"op 'resize': size None must be a positive integer"):
        ops.build(ops.parse("resize")[0])  # no argument and no input.image_size to default to


def test_value_ops_against_closed_forms():
    image = {"image": tf.constant([[[0.0, 127.5, 255.0]]])}
    for spec, expected in (("value_range(0, 1)", [0.0, 0.5, 1.0]),
                           ("value_range(-1, 1)", [-1.0, 0.0, 1.0]),
                           ("normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))", [-2.0, 0.0, 0.5])):
        out = ops.compose(ops.parse(spec))(image)["image"].numpy()[0, 0]
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_an_op_reading_a_missing_key_names_it():
    apply = ops.compose(ops.parse("flip_caption_aware"))
    example = {"image": tf.zeros([4, 4, 3]), "texts": tf.constant(["a"]),
               "_seed": tf.constant([0, 1], tf.int64)}
    with pytest.raises(ValueError, match=r"op 'flip_caption_aware' reads the key 'text'"):
        apply(example)


def test_registering_a_second_op_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="'resize' is already registered"):
        ops.register_op("resize")(lambda: None)


@ops.register_op("test_caption_words")
def _caption_words():
    """A task's own op: the number of words of the chosen caption."""
    def op(example):
        words = tf.strings.split(example["text"])
        return {**example, "caption_words": tf.cast(tf.size(words), tf.int32)}
    return op


@pytest.fixture
def shapes_config(shapes_builder, tfds_dir):
    data = pipeline.default_data_config()
    data.data_dir, data.split = tfds_dir, "validation"
    data.update(TINY_SIZES)
    config = pipeline.default_input_config()
    config.update(dict(global_batch_size=6, image_size=16, max_text_len=48,
                       preprocess="caption_first|resize|value_range"))
    return data, config


def test_the_batch_has_the_keys_a_tasks_ops_produce(shapes_config):
    data, config = shapes_config
    transform = ["test_caption_words", "tokenize"]  # max_len 48: no caption truncated
    batches = list(pipeline.make_pipeline(data, config, training=False, process_index=0,
                                          process_count=1, transform=transform))
    assert len(batches) == 3  # 16 validation examples in batches of 6: the last one padded
    assert set(batches[0]) == {"image", "text", "text_mask", "label", "caption_words", "_mask"}
    last = batches[-1]
    assert last["_mask"].sum() == 4 and np.all(last["caption_words"][~last["_mask"]] == 0)
    tokenizer = pipeline.make_pipeline(data, config, training=False, process_index=0,
                                       process_count=1).tokenizer
    for batch in batches:
        captions = tokenizer.decode_batch(batch["text"][batch["_mask"]],
                                          batch["text_mask"][batch["_mask"]])
        np.testing.assert_array_equal(batch["caption_words"][batch["_mask"]],
                                      [len(c.split()) for c in captions])


def test_without_tokenize_the_chosen_caption_is_a_string_key(shapes_config):
    data, config = shapes_config
    batch = next(pipeline.make_pipeline(data, config, training=False, process_index=0,
                                        process_count=1, transform=[]))
    assert set(batch) == {"image", "text", "label", "_mask"}  # texts/key: read, not produced
    assert batch["text"].dtype == object and batch["text"][0].decode().split()


def test_per_example_ops_after_batched_ones_are_an_error(shapes_config):
    data, config = shapes_config
    with pytest.raises(ValueError, match=r"per-example op\(s\) \['test_caption_words'\] come "
                                         r"after the batched op 'tokenize'"):
        pipeline.make_pipeline(data, config, training=True, process_index=0, process_count=1,
                               transform=["tokenize", "test_caption_words"])


def test_tokenize_keeps_leading_shape_and_matches_the_tokenizer(shapes_builder):
    tokenizer = tokenizers.load_tokenizer(shapes.tokenizer_path(shapes_builder))
    context = ops.OpContext(max_text_len=7, eos="sticky", tokenizer_fn=lambda: tokenizer)
    apply = ops.compose(ops.parse("tokenize(key='neg')"), context)
    texts = [["a red circle", "a big blue square on the left"], ["x", ""]]
    out = apply({"neg": tf.constant(texts)})
    ids, mask = tokenizer.encode_batch(sum(texts, []), 7, eos="sticky")
    assert out["neg"].shape == (2, 2, 7) and out["neg_mask"].dtype == tf.bool
    np.testing.assert_array_equal(out["neg"].numpy().reshape(4, 7), ids)
    np.testing.assert_array_equal(out["neg_mask"].numpy().reshape(4, 7), mask)


def test_contrastive_transform_follows_the_input_config():
    config = pipeline.default_input_config()
    config.update(dict(max_text_len=24, preprocess="resize_crop|value_range"))
    assert ops_contrastive.example_transform(config, training=True) == [
        "caption_random", "tokenize(max_len=24, add_bos=False, eos='sticky')"]
    config.preprocess = "caption_first|resize_crop|value_range"
    config.hard_negatives = dict(count=3, vocabulary="vlm_shapes")
    assert ops_contrastive.example_transform(config, training=True) == [
        "hard_negatives(count=3, vocabulary='vlm_shapes')",
        "tokenize(max_len=24, add_bos=False, eos='sticky')",
        "tokenize(max_len=24, add_bos=False, eos='sticky', key='neg_text')"]
    assert ops_contrastive.example_transform(config, training=False) == [
        "tokenize(max_len=24, add_bos=False, eos='sticky')"]  # no negatives in evaluation
    ops.parse(ops_contrastive.example_transform(config, training=True))  # all registered


@ops.register_op("test_box_count", reads=("boxes",))
def _box_count():
    """A task's op on a record field beyond the base ones: vlm_shapes' object boxes."""
    return lambda example: {**example, "num_boxes": tf.shape(example["boxes"])[0]}


def test_ops_read_the_record_fields_they_declare(shapes_config, shapes_builder):
    data, config = shapes_config
    batches = list(pipeline.make_pipeline(data, config, training=False, process_index=0,
                                          process_count=1, transform=["test_box_count"]))
    assert "boxes" not in batches[0]  # read, not produced
    got = np.concatenate([b["num_boxes"][b["_mask"]] for b in batches])
    reference = [len(example["objects"]["bbox_xyxy"])
                 for example in shapes_builder.as_dataset(split="validation").as_numpy_iterator()]
    np.testing.assert_array_equal(got, reference)  # the same order: eval reads unshuffled
    assert set(got) >= {1, 2}


def test_a_field_the_source_lacks_names_what_it_has(good_shards, shapes_builder):
    import ml_collections
    data = ml_collections.ConfigDict(dict(source="webdataset", paths=f"{good_shards}/*.tar"))
    config = pipeline.default_input_config()
    config.tokenizer = shapes.tokenizer_path(shapes_builder)
    with pytest.raises(ValueError, match=r"read record field\(s\) \['boxes'\], which webdataset "
                                         r"shards .* does not have; it has \['image', 'texts'"):
        pipeline.make_pipeline(data, config, training=True, process_index=0, process_count=1,
                               transform=["test_box_count"])


def test_op_arguments_in_input_preprocess_override_the_input_config(shapes_config):
    data, config = shapes_config  # input.image_size 16
    config.preprocess = "caption_first|resize(8)|value_range(0, 1)"
    batch = next(pipeline.make_pipeline(data, config, training=False, process_index=0,
                                        process_count=1))
    assert batch["image"].shape == (6, 8, 8, 3)
    assert batch["image"].min() >= 0.0 and 0.5 < batch["image"].max() <= 1.0
