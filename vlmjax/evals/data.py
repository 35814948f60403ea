"""One evaluator's data: its data config (resolved and checked without touching disk) and, on
first use, its examples streamed in padded batches, with the training input's tokenizer and
image size but without its random ops.

An entry's `data` is a full data config (keys of vlmjax/data/pipeline.py). Without a `source`
of its own, it is the training data config with these keys replaced, which must name a held-out
`split`. The file sources (webdataset, csv, llava_json) have no splits: they read the files they
are given, so an evaluation of one names its own files, and a `split` for it is an error (it
would silently score the training shards).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from vlmjax.config import ConfigError, plain_dict
from vlmjax.data import pipeline_config, preprocess, sources
from vlmjax.data.tf_cpu import tf
from vlmjax.evals import embed

# The key naming the files each file source reads.
FILE_SOURCES = {"webdataset": "paths", "csv": "csv_path", "llava_json": "json_path",
                "text_file": "paths"}
DETERMINISTIC_SIZE_OP = {"inception_crop": "resize_crop", "random_resized_crop": "resize_crop"}


def eval_preprocess(train_spec: str) -> str:
    """The training op string without randomness: first caption, no flip, centre crop."""
    names = preprocess.parse_ops(train_spec)
    size = next(n for n in names if n in preprocess.SIZE_OPS)
    return "|".join(["caption_first", DETERMINISTIC_SIZE_OP.get(size, size), names[-1]])


def resolve_data_config(entry_data, train_data, where: str) -> ml_collections.ConfigDict:
    """The data config an evaluator reads (see the module docstring); raises ConfigError naming
    `where` (e.g. 'evals.test.data') for a config it cannot honour. Pure: reads nothing."""
    entry_data = plain_dict(entry_data)
    if entry_data.get("source") not in (None, train_data.get("source")):
        config = dict(entry_data)
    else:
        if train_data.get("source") == "mixture":
            raise ConfigError(f"{where}: training reads a mixture and an evaluation reads one "
                              f"source; give {where}.source and the rest of its data config")
        if "split" not in entry_data and train_data.get("source") not in FILE_SOURCES:
            raise ConfigError(f"{where}.split is needed: without a data config of its own an "
                              f"evaluation reads the training source "
                              f"({train_data.get('source')!r}) at a held-out split, e.g. "
                              f"{where}.split='test'")
        config = plain_dict(train_data)
        config.pop("filters", None)  # training filters; an evaluation reads every record
        config.update(entry_data)
    source = config.get("source")
    if source == "mixture":
        raise ConfigError(f"{where}.source: an evaluation reads one source, not a mixture")
    if "filters" in config:
        raise ConfigError(f"{where}.filters: evaluations read every record; the ALIGN filters "
                          "are for training data")
    if source in FILE_SOURCES:
        file_key = FILE_SOURCES[source]
        if "split" in entry_data:
            raise ConfigError(
                f"{where}.split={entry_data['split']!r}: source {source!r} has no splits (it "
                f"reads the files of {file_key}); name held-out files with {where}.{file_key} "
                "and no split")
        if config.get(file_key) == train_data.get(file_key) and source == train_data.source:
            raise ConfigError(
                f"{where}.{file_key}: this evaluation would read the training files "
                f"({config.get(file_key)!r}); give held-out files in {where}.{file_key}")
        config.pop("split", None)
    config.pop("weight", None)
    config = ml_collections.ConfigDict(config)
    try:
        pipeline_config.validate_data_config(config, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return config


@dataclasses.dataclass
class EvalData:
    """Examples of one data config, read on first use; `skipped` counts the bad records of the
    last pass (placeholders of the source and undecodable images)."""
    data_config: ml_collections.ConfigDict
    input_config: ml_collections.ConfigDict
    train_data_config: ml_collections.ConfigDict  # its source holds the tokenizer (vlm_shapes)

    def __post_init__(self):
        self.image_size = int(self.input_config.image_size)
        self.text_length = int(self.input_config.max_text_len)
        self.skipped = 0
        self._source = self._tokenizer = None

    def source(self) -> sources.Source:
        if self._source is None:
            self._source = make_source(self.data_config)
        return self._source

    def describe(self) -> str:
        config = self.data_config
        return f"{config.source} {config.get('name') or ''} {config.get('split') or ''}".strip()

    # ------------------------------------------------------------------------------------ text
    def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids [N, L] and bool mask [N, L] of `texts`, tokenised as in training."""
        if self._tokenizer is None:
            built = (self._training_sources() + [self.source()]
                     if self.input_config.tokenizer == "vlm_shapes" else [])
            self._tokenizer = pipeline_config.resolve_tokenizer(self.input_config, built)
        return self._tokenizer.encode_batch(list(texts), self.text_length,
                                            add_bos=self.input_config.add_bos,
                                            eos=self.input_config.eos)

    def _training_sources(self) -> list[sources.Source]:
        """The sources a 'vlm_shapes' tokenizer comes from: the training data's (a model reads
        text as it was trained), when they exist."""
        train = self.train_data_config
        configs = (list(train.sources.values()) if train.source == "mixture" else [train])
        out = []
        for config in configs:
            if config.source == "vlm_shapes":
                config = plain_dict(config)
                config.pop("weight", None)
                out.append(make_source(ml_collections.ConfigDict(config)))
        return out

    # ---------------------------------------------------------------------------------- images
    def class_names(self) -> list[str]:
        """The names of the source's label feature (TFDS ClassLabel), [] without one."""
        source = self.source()
        if isinstance(source, sources.TfdsSource) and source.label_key:
            feature = source.builder.info.features[source.label_key]
            return list(getattr(feature, "names", []) or [])
        return []

    def batches(self, batch_size: int, limit: int = 0) -> Iterator[tuple[dict, list]]:
        """(batch, captions) pairs: batch = {'image': f32 [B,S,S,3], 'label': i32 [B], '_mask'}
        zero-padded to `batch_size` rows; captions = the real rows' caption lists. Reads the
        first `limit` usable examples (0 = all) once, in a fixed order."""
        source = self.source()
        records = source.records(0, 1, training=False, seed=0)
        prepare_fn = preprocess.make_preprocess_fn(
            eval_preprocess(self.input_config.preprocess), self.image_size)

        def prepare(index, record):
            example = prepare_fn({"image": preprocess.decode(record["image"]),
                                  "texts": record["texts"], "_seed": tf.zeros([2], tf.int64)})
            return {"image": example["image"], "label": record["label"],
                    "texts": record["texts"], "index": index}

        dataset = (records.enumerate().filter(lambda _, r: r["_skip_reason"] == 0)
                   .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                   .ignore_errors())  # undecodable images: skipped, counted below
        if limit:
            dataset = dataset.take(limit)
        dataset = dataset.batch(batch_size).prefetch(2)
        seen, last_index = 0, -1
        for chunk in dataset.as_numpy_iterator():
            seen += len(chunk["label"])
            last_index = int(chunk["index"][-1])
            captions = [[t.decode("utf-8", "replace") for t in texts] for texts in chunk["texts"]]
            yield embed.pad_batch({"image": chunk["image"].astype(np.float32),
                                   "label": chunk["label"].astype(np.int32)}, batch_size), captions
        if not seen:
            raise ValueError(f"evaluation data ({self.describe()}) has no usable examples")
        # Records read: all of them, or (stopped at `limit`) up to the last one used.
        read = last_index + 1 if limit and seen == limit else _num_records(source)
        self.skipped = max(read, last_index + 1) - seen


def _num_records(source) -> int:
    try:
        return source.num_records(0, 1)
    except (KeyError, ValueError, NotImplementedError):  # e.g. mocked TFDS without split sizes
        return 0


@dataclasses.dataclass
class TfdsSequenceTextSource(sources.TfdsSource):
    """A TFDS source whose captions are one field of a sequence feature: text_key='captions'
    with text_field='text' reads COCO's `captions/text`."""
    text_field: str = ""

    def _to_example(self, features):
        features = {**features, self.text_key: features[self.text_key][self.text_field]}
        return super()._to_example(features)


def make_source(config) -> sources.Source:
    """The source of a resolved eval data config; a TFDS text_key 'a/b' is field b of sequence
    feature a (COCO captions: 'captions/text')."""
    text_key = config.get("text_key") or ""
    if config.source == "tfds" and "/" in text_key:
        feature, _, field = text_key.partition("/")
        return TfdsSequenceTextSource(
            name=config.name, data_dir=config.get("data_dir"), split=config.get("split") or "test",
            image_key=config.get("image_key") or "image", text_key=feature,
            label_key=config.get("label_key"), text_field=field)
    return pipeline_config.make_source(config, training=False)
