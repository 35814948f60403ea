"""Data sources. Each yields the same example dict as a tf.data.Dataset, for one host's part:

    image          string   encoded image bytes (decoded later, in parallel, by the pipeline)
    texts          string [N]  captions (LLaVA: the assistant turns)
    label          int32    class id, -1 when the source has none
    key            string   where the example came from (file/key/id)
    conversation   string   LLaVA conversations as JSON, "" for other sources
    _skip_reason   int32    0, or a `skips` reason for a placeholder standing in for bad data

and, when the pipeline's ops read them (`reads` of ops.register_op), a source's own fields:
TFDS sources any feature by path ("objects/bbox_xyxy"), vlm_shapes also by the names of
`VLM_SHAPES_FIELDS` (boxes, questions, answers, ...). The pipeline decodes the image, and only
what the ops produce reaches the batch.

Sources: `TfdsSource` (any TFDS dataset, vlm_shapes included), `WebdatasetSource` (tar shards),
`LlavaJsonSource` (LLaVA JSON / JSONL + image folder), `CsvSource` (CSV/TSV with image path and
caption columns); `text_files.TextFileSource` (plain-text / JSONL documents, no images, for
text tasks). Hosts split TFDS data with `tfds.even_splits`, shards by file, and single
annotation files by record index.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vlmjax.data import skips, webdataset
from vlmjax.data.tf_cpu import tf

EXAMPLE_SIGNATURE = {
    "image": tf.TensorSpec([], tf.string),
    "texts": tf.TensorSpec([None], tf.string),
    "label": tf.TensorSpec([], tf.int32),
    "key": tf.TensorSpec([], tf.string),
    "conversation": tf.TensorSpec([], tf.string),
    "_skip_reason": tf.TensorSpec([], tf.int32),
}
BASE_FIELDS = tuple(k for k in EXAMPLE_SIGNATURE if not k.startswith("_"))
# vlm_shapes record fields beyond the base ones: name -> TFDS feature path.
VLM_SHAPES_FIELDS = {
    "id": "id", "caption_noise": "caption_noise", "boxes_context": "boxes_context",
    "boxes": "objects/bbox_xyxy", "box_shapes": "objects/shape", "box_colours": "objects/colour",
    "box_sizes": "objects/size", "box_positions": "objects/position",
    "questions": "qa/question", "answers": "qa/answer", "cot_answers": "qa/cot_answer",
    "qa_types": "qa/type",
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
_TF_DECODABLE = {"JPEG", "PNG", "GIF", "BMP", "WEBP"}


def make_example(image: bytes, texts: list[str], label: int = -1, key: str = "",
                 conversation: str = "", reason: str = "ok") -> dict:
    return {"image": image, "texts": np.array(texts, dtype=object).reshape(-1),
            "label": np.int32(label), "key": key, "conversation": conversation,
            "_skip_reason": np.int32(skips.reason_id(reason))}


def placeholder(reason: str, key: str = "") -> dict:
    """Stands in for a bad example so that it is counted where the pipeline drops it."""
    return make_example(b"", [], key=key, reason=reason)


def check_image(data: bytes) -> tuple[bytes, str]:
    """(bytes TensorFlow can decode, "ok") or (b"", reason). Reads only the header, except for
    rare formats TensorFlow cannot decode (TIFF, ...), which are re-encoded as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in _TF_DECODABLE:
                return data, "ok"
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue(), "ok"
    except Exception:  # noqa: BLE001  (PIL raises many types for bad data)
        return b"", "undecodable_image"


def decode_text(data: bytes) -> tuple[str, str]:
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "bad_text_encoding"
    return text, ("ok" if text else "empty_text")


def _read_file(path: str) -> bytes | None:
    try:
        return tf.io.gfile.GFile(path, "rb").read()
    except (tf.errors.OpError, OSError):
        return None


def _image_file_example(image_path: str, texts: list[str], key: str, label: int = -1,
                        conversation: str = "") -> dict:
    if not any(t.strip() for t in texts):
        return placeholder("empty_text", key)
    data = _read_file(image_path)
    if data is None:
        return placeholder("missing_image_file", key)
    data, reason = check_image(data)
    if reason != "ok":
        return placeholder(reason, key)
    return make_example(data, [t.strip() for t in texts if t.strip()], label, key, conversation)


class Source:
    """Records for one host; `num_records` counts them (placeholders included) for eval padding."""

    name = "source"
    has_images = True  # False: text-only records (image b""), for text tasks

    def records(self, process_index: int, process_count: int, training: bool,
                seed: int) -> tf.data.Dataset:
        raise NotImplementedError

    def num_records(self, process_index: int, process_count: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        """What the source reads, for error messages."""
        return repr(self)

    def available_fields(self) -> list[str]:
        """Record fields this source can yield besides the base ones."""
        return []

    def check_fields(self, fields) -> None:
        missing = sorted(set(fields) - set(BASE_FIELDS) - set(self.available_fields()))
        if missing:
            raise ValueError(f"the ops read record field(s) {missing}, which {self.describe()} "
                             f"does not have; it has {list(BASE_FIELDS)} + "
                             f"{self.available_fields()}")

    def _from_generator(self, generate) -> tf.data.Dataset:
        return tf.data.Dataset.from_generator(generate, output_signature=EXAMPLE_SIGNATURE)


@dataclasses.dataclass
class TfdsSource(Source):
    """Any prepared TFDS dataset; `builder` may be given (vlm_shapes) instead of a name.
    `image_key=None` reads no image (text tasks: records carry image b"")."""
    name: str
    data_dir: str | None = None
    split: str = "train"
    image_key: str | None = "image"
    text_key: str | None = None
    label_key: str | None = None
    builder: tfds.core.DatasetBuilder | None = None
    # Extra record fields (ops' `reads`): feature paths, or names of `aliases`.
    fields: tuple[str, ...] = ()
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.builder is None:
            try:
                self.builder = tfds.builder(self.name, data_dir=self.data_dir)
            except Exception as error:  # noqa: BLE001  (tfds raises several types)
                raise ValueError(f"data.name={self.name!r} (data_dir={self.data_dir!r}): "
                                 f"{error}") from None
        if not self.builder.is_prepared():
            raise ValueError(f"TFDS dataset {self.name!r} is not prepared in "
                             f"{self.builder.data_dir_root}; build it first (tfds build)")
        features = self.builder.info.features
        for what, key in (("image_key", self.image_key), ("text_key", self.text_key),
                          ("label_key", self.label_key)):
            if key is not None and key not in features:
                raise ValueError(f"data.{what}={key!r} is not a feature of {self.name}; features: "
                                 f"{sorted(features.keys())}")
        if self.split not in self.builder.info.splits:
            raise ValueError(f"data.split={self.split!r} is not a split of {self.name}; splits: "
                             f"{sorted(self.builder.info.splits.keys())}")
        self.check_fields(self.fields)
        self.has_images = self.image_key is not None

    def _feature_paths(self) -> list[str]:
        paths = []

        def walk(features, prefix):
            for key, feature in features.items():
                path = f"{prefix}{key}"
                inner = getattr(feature, "feature", feature)  # Sequence({...}) wraps a dict
                if isinstance(inner, tfds.features.FeaturesDict):
                    walk(inner, f"{path}/")
                else:
                    paths.append(path)
        walk(self.builder.info.features, "")
        return paths

    def available_fields(self) -> list[str]:
        used = {self.image_key, self.text_key, self.label_key}
        return sorted(self.aliases) + [p for p in self._feature_paths() if p not in used]

    def _path(self, field: str) -> str:
        return self.aliases.get(field, field)

    def _host_split(self, process_index, process_count):
        return tfds.even_splits(self.split, n=process_count, drop_remainder=False)[process_index]

    def num_records(self, process_index, process_count):
        return self.builder.info.splits[self._host_split(process_index,
                                                         process_count)].num_examples

    def records(self, process_index, process_count, training, seed):
        read_config = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True,
                                      shuffle_reshuffle_each_iteration=True)
        # Parse only the features used (vlm_shapes' QA and boxes would cost as much as the rest)
        # and leave the image encoded: the pipeline decodes it and counts failures.
        wanted = {key: True for key in (self.text_key, self.label_key) if key is not None}
        for field in self.fields:  # nested paths: {"objects": {"bbox_xyxy": True}}
            *parents, leaf = self._path(field).split("/")
            node = wanted
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = True
        if self.image_key is None:
            decoders = tfds.decode.PartialDecoding(wanted)
        else:
            decoders = tfds.decode.PartialDecoding(
                {**wanted, self.image_key: True},
                decoders={self.image_key: tfds.decode.SkipDecoding()})
        dataset = self.builder.as_dataset(
            split=self._host_split(process_index, process_count), shuffle_files=training,
            read_config=read_config, decoders=decoders)
        return dataset.map(tf.autograph.experimental.do_not_convert(self._to_example),
                           num_parallel_calls=tf.data.AUTOTUNE)

    def _to_example(self, features):
        texts = (tf.reshape(features[self.text_key], [-1]) if self.text_key
                 else tf.constant([""]))
        label = (tf.cast(features[self.label_key], tf.int32) if self.label_key
                 else tf.constant(-1, tf.int32))
        extra = {}
        for field in self.fields:
            value = features
            for part in self._path(field).split("/"):
                value = value[part]
            extra[field] = value
        image = (features[self.image_key] if self.image_key is not None
                 else tf.constant(b""))
        return {"image": image, "texts": texts, "label": label,
                "key": features["tfds_id"], "conversation": tf.constant(""),
                "_skip_reason": tf.constant(0, tf.int32), **extra}


def image_and_text(files: dict, text_extension: str) -> tuple[tuple[str, str] | None, str]:
    """A webdataset sample's (image file extension, decoded caption) and "ok", or None and the
    skip reason (missing_image, missing_text or decode_text's)."""
    image_extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_extension is None:
        return None, "missing_image"
    if text_extension not in files:
        return None, "missing_text"
    text, reason = decode_text(files[text_extension])
    return ((image_extension, text) if reason == "ok" else None), reason


def _sample_example(sample: webdataset.TarSample, text_extension: str,
                    label_field: str | None) -> dict:
    found, reason = image_and_text(sample.files, text_extension)
    if found is None:
        return placeholder(reason, sample.key)
    image_extension, text = found
    label = -1
    if "json" in sample.files:
        try:
            metadata = json.loads(sample.files["json"])
        except (ValueError, UnicodeDecodeError):
            return placeholder("bad_json", sample.key)
        if label_field is not None:
            label = int(metadata.get(label_field, -1)) if isinstance(metadata, dict) else -1
    image, reason = check_image(sample.files[image_extension])
    if reason != "ok":
        return placeholder(reason, sample.key)
    return make_example(image, [text], label, sample.key)


@dataclasses.dataclass
class WebdatasetSource(Source):
    """webdataset / img2dataset shards: KEY.jpg|png|webp + KEY.txt [+ KEY.json]."""
    paths: str
    text_extension: str = "txt"
    label_field: str | None = None  # a KEY.json field holding an integer class

    def __post_init__(self):
        self.files = webdataset.expand_paths(self.paths)
        if not self.files:
            raise ValueError(f"data.paths={self.paths!r} matched no files")

    def describe(self) -> str:
        shown = ", ".join(self.files[:5]) + (f" (+{len(self.files) - 5} more)"
                                             if len(self.files) > 5 else "")
        return f"webdataset shards {shown}"

    def host_files(self, process_index, process_count) -> list[str]:
        if len(self.files) < process_count:
            raise ValueError(f"{len(self.files)} shard(s) in {self.paths!r} cannot be split over "
                             f"{process_count} processes; write at least one shard per process")
        return self.files[process_index::process_count]

    def iter_examples(self, path: str) -> Iterator[dict]:
        for item in webdataset.iter_tar_samples(path):
            if isinstance(item, webdataset.TarProblem):
                yield placeholder(item.reason, item.path)
            else:
                yield _sample_example(item, self.text_extension, self.label_field)

    def num_records(self, process_index, process_count):
        return sum(1 for path in self.host_files(process_index, process_count)
                   for _ in webdataset.iter_tar_samples(path))

    def records(self, process_index, process_count, training, seed):
        files = self.host_files(process_index, process_count)
        file_dataset = tf.data.Dataset.from_tensor_slices(files)
        if training:
            file_dataset = file_dataset.shuffle(len(files), seed=seed,
                                                reshuffle_each_iteration=True)

        def shard_records(path):
            return tf.data.Dataset.from_generator(lambda p: self.iter_examples(p.decode()),
                                                  args=(path,), output_signature=EXAMPLE_SIGNATURE)
        return file_dataset.interleave(shard_records, cycle_length=min(len(files), 4),
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _load_llava_entries(path: str) -> list:
    """A JSON list, or JSONL where a line that does not parse becomes None (counted later)."""
    data = _read_file(path)
    if data is None:
        raise FileNotFoundError(f"data.json_path={path!r} cannot be read")
    if path.endswith(".jsonl"):
        entries = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    entries.append(None)
        return entries
    try:
        entries = json.loads(data)
    except ValueError as error:
        raise ValueError(f"data.json_path={path!r} is not valid JSON ({error}); use a .jsonl "
                         "file to skip bad records instead") from None
    if not isinstance(entries, list):
        raise ValueError(f"data.json_path={path!r}: expected a JSON list of "
                         "{id, image, conversations} records")
    return entries


@dataclasses.dataclass
class LlavaJsonSource(Source):
    """LLaVA format: [{id, image, conversations: [{from: human|gpt, value}]}] + image folder.
    `question_types` (optional) keeps the entries whose `question_types` (the vlm_shapes
    export's field: which fact each turn asks for) are all among them, so a mixture can weight
    the kinds of question apart (e.g. the ones a model learns last)."""
    json_path: str
    image_dir: str
    question_types: tuple[str, ...] | None = None

    def __post_init__(self):
        self._entries = _load_llava_entries(self.json_path)
        if self.question_types is not None:
            wanted = set(self.question_types)

            def asks_wanted(entry):
                return bool(entry.get("question_types")) and set(entry["question_types"]) <= wanted
            # Records that are not objects stay, so that _example counts them as bad_json.
            self._entries = [e for e in self._entries if not isinstance(e, dict) or asks_wanted(e)]
            if not any(isinstance(e, dict) for e in self._entries):
                raise ValueError(f"data.json_path={self.json_path!r} holds no records whose "
                                 f"question_types are all among {sorted(wanted)}")
        if not self._entries:
            raise ValueError(f"data.json_path={self.json_path!r} holds no records")

    def num_records(self, process_index, process_count):
        return len(range(process_index, len(self._entries), process_count))

    def _example(self, entry, index: int) -> dict:
        key = f"{self.json_path}#{index}"
        if isinstance(entry, dict):
            key = str(entry.get("id", key))
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations", []), list):
            return placeholder("bad_json", key)
        if not entry.get("image"):
            return placeholder("missing_image", key)
        turns = entry.get("conversations") or []
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            return placeholder("bad_json", key)
        answers = [t["value"] for t in turns if t.get("from") in ("gpt", "assistant")]
        if not answers:
            return placeholder("missing_text", key)
        return _image_file_example(os.path.join(self.image_dir, entry["image"]), answers, key,
                                   conversation=json.dumps(turns))

    def records(self, process_index, process_count, training, seed):
        del training, seed  # shuffled by the pipeline

        def generate():
            for index in range(process_index, len(self._entries), process_count):
                yield self._example(self._entries[index], index)
        return self._from_generator(generate)


@dataclasses.dataclass
class CsvSource(Source):
    """CSV/TSV with a header row: an image path column (relative to image_dir) and a caption
    column, optionally a label column. The delimiter defaults to tab for .tsv, else comma."""
    csv_path: str
    image_dir: str = ""
    image_column: str = "image"
    text_column: str = "caption"
    label_column: str | None = None
    delimiter: str | None = None

    def __post_init__(self):
        data = _read_file(self.csv_path)
        if data is None:
            raise FileNotFoundError(f"data.csv_path={self.csv_path!r} cannot be read")
        delimiter = self.delimiter or ("\t" if self.csv_path.endswith(".tsv") else ",")
        reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")),
                            delimiter=delimiter)
        header = next(reader, [])
        columns = (("image_column", self.image_column), ("text_column", self.text_column),
                   ("label_column", self.label_column))
        for what, column in columns:
            if column is not None and column not in header:
                raise ValueError(f"data.{what}={column!r} is not a column of {self.csv_path}; "
                                 f"columns: {header}")
        self._header = header
        self._rows = [row for row in reader if row]
        if not self._rows:
            raise ValueError(f"data.csv_path={self.csv_path!r} holds no rows")

    def num_records(self, process_index, process_count):
        return len(range(process_index, len(self._rows), process_count))

    def _example(self, row: list[str], index: int) -> dict:
        key = f"{self.csv_path}:{index + 2}"  # the line number, header included
        if len(row) != len(self._header):
            return placeholder("bad_row", key)
        fields = dict(zip(self._header, row))
        label = -1
        if self.label_column is not None:
            try:
                label = int(fields[self.label_column])
            except ValueError:
                return placeholder("bad_row", key)
        return _image_file_example(os.path.join(self.image_dir, fields[self.image_column]),
                                   [fields[self.text_column]], key, label)

    def records(self, process_index, process_count, training, seed):
        del training, seed

        def generate():
            for index in range(process_index, len(self._rows), process_count):
                yield self._example(self._rows[index], index)
        return self._from_generator(generate)
