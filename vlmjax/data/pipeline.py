"""The per-host input pipeline: config -> tf.data -> numpy batch dicts (-> global jax.Arrays).

    pipeline = make_pipeline(config.data, config.input, training=True,
                             transform=task.example_transform(training=True))
    batch = next(pipeline)           # contrastive: {"image": f32 [B,H,W,3], "text": i32 [B,L],
                                     #  "text_mask": bool [B,L], "label": i32 [B]}
    state = pipeline.get_state()     # JSON-able; make_pipeline(..., state=state) resumes exactly
    pipeline.skip_counts             # {"corrupt_image": 3, ...} bad data skipped so far
    global_batch = to_global_arrays(batch, mesh)
    pipeline.close()                 # or `with make_pipeline(...) as pipeline:`

B is input.global_batch_size / process_count. Training batches drop the remainder and repeat
forever; evaluation (`training=False`) reads the split once, without shuffling, and pads the last
batches with examples whose `_mask` is False so that every host yields `num_batches` batches.
`label` is present when every source has labels.

Per example, the pipeline decodes the record's image, skips and counts bad records, applies the
data.filters, then runs the ops (registry: ops.py) of `input.preprocess` (image ops) followed by
the task's `transform` (its text side: caption choice + tokenisation for contrastive; None: the
contrastive transform, ops_contrastive.example_transform). Ops see the record's fields (`image`
decoded, `texts`, `label`, `key`, `conversation`, ...) and a per-example `_seed`; the batch has
every key the ops produce (and `label`), not the record fields they only read. The transform's
batched ops (`tokenize`, `hard_negatives`) run on whole batches, after eval padding.

config.data (`pipeline_config.default_data_config()`):
  source        "vlm_shapes" | "tfds" | "webdataset" | "llava_json" | "csv" | "text_file" |
                "mixture"
  split         split to read (vlm_shapes/tfds: e.g. "train", "validation", "test_novel",
                "train[:10%]"; ignored by the file sources, which read all they are given)
  filters       per-example ALIGN rules, all off by default: filter_image_size (min_image_side),
                filter_aspect_ratio (max_aspect_ratio), filter_text_length (min_words, max_words)
  vlm_shapes:   config ("32px" | "64px" | "224px" | "noisy"), data_dir (None: TFDS default),
                train_size, eval_size, novel_size, noise_fraction (None: the config's default);
                the dataset is built on first use (hosts sharing one data_dir: build it once
                beforehand with `python -m vlmjax.data.build`, so they do not race)
  tfds:         name, data_dir, image_key ("image"), text_key (None: no captions), label_key
                (a text dataset for the `lm` task: text_key its text feature, e.g. "text")
  webdataset:   paths (paths / globs / {000..099} braces, comma-separated), text_extension
                ("txt"), label_field (integer field of KEY.json, None: no labels)
  llava_json:   json_path (.json list or .jsonl), image_dir, question_types (None: all; a
                list keeps the entries whose `question_types` field is all among them)
  csv:          csv_path (.csv, or .tsv for tabs), image_dir, image_column ("image"),
                text_column ("caption"), label_column (None), delimiter (None: from extension)
  text_file:    paths (as webdataset's), text_field ("text": the JSONL field), format ("auto":
                .jsonl/.json files JSONL, others plain text; "jsonl" | "text"): one document
                per line, no images; text tasks only (data/text_files.py)
  mixture:      sources: {name: {<a source config above, without filters>, weight: float}};
                training only; data.filters applies to all of them

config.input (`pipeline_config.default_input_config()`):
  global_batch_size  examples per step over all hosts (divisible by process_count)
  image_size         output side S
  preprocess         per-example op string, see preprocess.py, e.g.
                     "caption_random|resize_crop|value_range" or "resize(64)|value_range(-1, 1)"
  crop_area_min      smallest crop area fraction for inception_crop
  shuffle_buffer     examples in the shuffle buffer (training)
  seed               shuffling, mixture sampling and random ops; each host and each use
                     derives its own seed from it (random ops: stateless, keyed by position)
  tokenizer          "vlm_shapes" (the model built with the dataset) or a .model / tokenizer.json
  max_text_len, add_bos, eos ("none" | "append" | "sticky")   see tokenizers.py
  prefetch_batches   batches prepared ahead
  hard_negatives     optional {count, vocabulary}: per training caption `count` word-swapped
                     negatives (data/hard_negatives.py), as `neg_text`, `neg_text_mask`
                     [B, count, L] and `neg_valid` [B, count] (read by the contrastive
                     transform: its hard_negatives op)
  special_tokens     optional list of texts the tokenizer never splits (a text the vocabulary
                     has keeps its id, a new one is added after it; tokenizers.py), e.g.
                     tokenizers.VLM_SHAPES_LM_TOKENS

`images=False` (text tasks, e.g. the `lm` task's text_pipeline.py): input.preprocess is not
read, TFDS sources (vlm_shapes included) read no image feature, nothing is decoded, and
text-only sources are allowed.

Bad data is skipped and counted, never fatal: placeholders from the sources carry a reason;
images that fail to decode are dropped (tf.data `ignore_errors`) and recognised by the gap they
leave in the running example index. A `scan` counts both at the one place where examples are
dropped, and every batch carries the counts up to its last example, so `skip_counts` and the
saved position always agree. Resuming re-reads (without decoding) all records before the saved
position, earlier epochs included.
"""
from __future__ import annotations

import atexit
import gc
import hashlib
import json
import math
import weakref
from typing import Sequence

import numpy as np

from vlmjax.data import filters, ops, ops_contrastive, ops_image, pipeline_config, skips
from vlmjax.data.pipeline_config import default_data_config, default_input_config  # noqa: F401
from vlmjax.data.tf_cpu import tf

_END_OF_DATA = -1  # reason of the sentinel closing a finite stream: trailing gaps get counted
# Our dataset functions use tf.cond/tf.where explicitly: AutoGraph would only add trace time.
_plain = tf.autograph.experimental.do_not_convert
# Keys that do not change which batches come out: a resume may change them.
_NOT_IN_FINGERPRINT = ("data_dir", "prefetch_batches")


_OPEN_PIPELINES: "weakref.WeakSet[InputPipeline]" = weakref.WeakSet()


@atexit.register
def _close_open_pipelines():
    # A tf.data iterator over Python generators that is still alive when the interpreter shuts
    # down can abort the process ("terminate called without an active exception") or hang it.
    for data in list(_OPEN_PIPELINES):
        data.close()


def _process_defaults(process_index, process_count):
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return process_index, process_count


def _hash_word(value) -> int:
    """A stable non-negative int for a str or int (Python's hash() of a str varies per run)."""
    if isinstance(value, int):
        return value
    return int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:4], "little")


def _split_transform(preprocess_spec: str, transform: Sequence[str]):
    """input.preprocess + the transform's per-example ops, and the transform's batched ops
    (which must come after every per-example op). input.preprocess is validated already."""
    try:
        parsed = ops.parse(transform)
    except ValueError as error:
        raise ValueError(f"example transform {list(transform)}: {error}") from None
    first_batched = next((i for i, op in enumerate(parsed) if op.info.batched), len(parsed))
    late = [op.text for op in parsed[first_batched:] if not op.info.batched]
    if late:
        raise ValueError(f"example transform {list(transform)}: per-example op(s) {late} come "
                         f"after the batched op {parsed[first_batched].text!r}; batched ops "
                         "run on whole batches, after every per-example op")
    return ops.parse(preprocess_spec) + parsed[:first_batched], parsed[first_batched:]


def _without(config: dict, keys) -> dict:
    return {k: (_without(v, keys) if isinstance(v, dict) else v) for k, v in config.items()
            if k not in keys}


def _fingerprint(data_config, input_config, training, process_index, process_count,
                 transform=None) -> str:
    configs = [_without(c.to_dict(), _NOT_IN_FINGERPRINT) for c in (data_config, input_config)]
    # The default transform is not written: states saved before tasks owned it still resume.
    extra = [] if transform is None else [transform]
    text = json.dumps([*configs, training, process_index, process_count, *extra],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _padding_value(key: str, like: tf.Tensor) -> tf.Tensor:
    """Padding examples: zeros (empty strings, False), except label and _index, -1."""
    if key in ("label", "_index"):
        return tf.fill(tf.shape(like), tf.constant(-1, like.dtype))
    return tf.zeros_like(like)


class InputPipeline:
    """Iterator of numpy batch dicts for this host; see the module docstring."""

    def __init__(self, data_config, input_config, *, training: bool, process_index=None,
                 process_count=None, state: dict | None = None,
                 transform: str | Sequence[str] | None = None, images: bool = True,
                 fingerprint_extra=None):
        pipeline_config.validate_data_config(data_config)
        pipeline_config.validate_input_config(input_config, images=images)
        self.images = images
        if not images and any(data_config.get("filters", {}).get(k) for k in (
                "filter_image_size", "filter_aspect_ratio")):
            raise ValueError("data.filters: the image rules need images, and this pipeline "
                             "reads none (a text task); turn them off")
        if data_config.source == "mixture" and not training:
            raise ValueError("data.source='mixture' is for training; evaluate one source at a "
                             "time")
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        if input_config.global_batch_size % self.process_count:
            raise ValueError(f"input.global_batch_size={input_config.global_batch_size} is not "
                             f"divisible by process_count={self.process_count}")
        self.local_batch_size = input_config.global_batch_size // self.process_count
        self.training = training
        self.data_config, self.input_config = data_config, input_config
        self.has_labels = pipeline_config.has_labels(data_config)
        default = ops_contrastive.example_transform(input_config, training)
        self.transform = default if transform is None else (
            [transform] if isinstance(transform, str) else list(transform))
        self._example_ops, self._batch_ops = _split_transform(
            input_config.preprocess if images else "", self.transform)
        extra = None if self.transform == default else self.transform
        if not images or fingerprint_extra is not None:
            extra = [extra, {"images": images, "extra": fingerprint_extra}]
        self.fingerprint = _fingerprint(data_config, input_config, training, self.process_index,
                                        self.process_count, extra)
        self.position, skip_offset = 0, np.zeros(skips.NUM_REASONS, np.int64)
        if state is not None:
            if state.get("fingerprint") != self.fingerprint:
                raise ValueError("the saved input pipeline state belongs to another data/input "
                                 "config or process layout; cannot resume from it")
            self.position = int(state["position"])
            skip_offset += [state["skips"].get(name, 0) for name in skips.SKIP_REASONS]
        self._skip_offset = skip_offset
        self._skips = skip_offset.copy()
        self.record_fields = sorted({f for op in self._example_ops + self._batch_ops
                                     for f in op.info.reads})
        self._build_sources()
        self.op_context = ops.OpContext(
            image_size=input_config.image_size, crop_area_min=input_config.crop_area_min,
            max_text_len=input_config.max_text_len, add_bos=input_config.add_bos,
            eos=input_config.eos, seed_fn=self._seed,
            tokenizer_fn=lambda: pipeline_config.resolve_tokenizer(input_config, self._sources))
        self.num_batches = None if training else self._eval_num_batches()
        self.dataset = self._build_dataset(start=self.position)
        self._iterator = None
        self._closed = False
        _OPEN_PIPELINES.add(self)

    # ---- sources -------------------------------------------------------------------------
    def _build_sources(self):
        config = self.data_config
        if config.source == "mixture":
            names = sorted(config.sources.keys())
            subs = [config.sources[name] for name in names]
            self._sources = [pipeline_config.make_source(sub, self.training, self.record_fields,
                                                         images=self.images)
                             for sub in subs]
            self._weights = [float(sub.weight) for sub in subs]
        else:
            self._sources = [pipeline_config.make_source(config, self.training,
                                                         self.record_fields, images=self.images)]
            self._weights = [1.0]

    def _eval_num_batches(self) -> int:
        """The same on every host: enough batches for the host with the most records."""
        source = self._sources[0]
        most = max(source.num_records(i, self.process_count) for i in range(self.process_count))
        if most == 0:
            raise ValueError(f"no evaluation records in {self._describe_sources()}")
        return math.ceil(most / self.local_batch_size)

    def _seed(self, *purpose) -> int:
        """Independent seeds per purpose and per host: hosts must not share crops or orders."""
        words = [self.input_config.seed, self.process_index,
                 *(_hash_word(p) for p in purpose)]
        return int(np.random.SeedSequence(words).generate_state(1)[0])

    def _sentinel(self, element_spec) -> tf.data.Dataset:
        """An end-of-data marker: never kept or counted; it closes index gaps and epochs."""
        empty = {key: tf.zeros([0 if d is None else d for d in spec.shape.as_list()], spec.dtype)
                 for key, spec in element_spec.items()}
        return tf.data.Dataset.from_tensors(
            {**empty, "_skip_reason": tf.constant(_END_OF_DATA, tf.int32)})

    def _records(self) -> tf.data.Dataset:
        datasets = []
        for i, source in enumerate(self._sources):
            seed = self._seed("source", i)
            dataset = source.records(self.process_index, self.process_count, self.training, seed)
            if self.training:  # shuffle within an epoch, so each epoch ends with its sentinel
                dataset = dataset.shuffle(self.input_config.shuffle_buffer, seed=seed,
                                          reshuffle_each_iteration=True)
            dataset = dataset.concatenate(self._sentinel(dataset.element_spec))
            datasets.append(dataset.repeat() if self.training else dataset)
        if len(datasets) == 1:
            return datasets[0]
        total = sum(self._weights)
        return tf.data.Dataset.sample_from_datasets(
            datasets, weights=[w / total for w in self._weights], seed=self._seed("mixture"))

    # ---- per-example work ------------------------------------------------------------------
    def _example_fn(self):
        apply_ops = ops.compose(self._example_ops, self.op_context)
        filter_config = self.data_config.get("filters")  # one for all sources of a mixture
        active_filters = filter_config is not None and any(
            filter_config.get(k) for k in filters.ONLINE_KEYS if k.startswith("filter_"))
        op_seed_base = tf.constant([self._seed("ops"), 0], tf.int64)

        def example_fn(example):
            reason = example["_skip_reason"]
            texts = tf.strings.strip(example["texts"])
            valid_utf8 = tf.reduce_all(tf.equal(tf.strings.unicode_transcode(
                texts, "UTF-8", "UTF-8", errors="replace"), texts))
            texts = tf.boolean_mask(texts, tf.strings.length(texts) > 0)
            reason = tf.where((reason == 0) & ~valid_utf8, skips.reason_id("bad_text_encoding"),
                              reason)
            reason = tf.where((reason == 0) & (tf.size(texts) == 0),
                              skips.reason_id("empty_text"), reason)
            texts = tf.cond(tf.size(texts) > 0, lambda: texts, lambda: tf.constant([""]))
            if self.images:
                image = tf.cond(reason == 0, lambda: ops_image.decode_image(example["image"]),
                                lambda: tf.zeros([1, 1, 3], tf.uint8))
            else:  # a text pipeline: the bytes (b"") pass untouched and leave no batch key
                image = example["image"]
            if active_filters:
                filter_reason, kept_texts = filters.online_skip_reason(tf.shape(image), texts,
                                                                       filter_config)
                reason = tf.where(reason == 0, filter_reason, reason)
                texts = tf.cond(tf.size(kept_texts) > 0, lambda: kept_texts, lambda: texts)
            op_seed = tf.random.experimental.stateless_fold_in(op_seed_base, example["_index"])
            record = {**{k: v for k, v in example.items() if not k.startswith("_")},
                      "image": image, "texts": texts}
            out = apply_ops({**record, "_seed": op_seed})
            # The batch gets what the ops produce (and the label); record fields the ops only
            # read (texts, key, conversation, ...) stay behind.
            out = {k: v for k, v in out.items() if not k.startswith("_")
                   and (k == "label" or k not in record or v is not record[k])}
            if "image" in out:
                image = out["image"]
                if not image.shape.is_fully_defined():
                    image = tf.ensure_shape(image, [self.input_config.image_size] * 2 + [3])
                out["image"] = tf.cast(image, tf.float32)
            return {**out, "_index": example["_index"], "_reason": reason}
        return example_fn

    def _count_skips_fn(self):
        # Each source's epoch ends with a sentinel: 2 sentinels per source without a usable
        # example in between means a whole epoch of every source was bad. Stop instead of stalling.
        limit = 2 * len(self._sources)
        message = (f"no usable example in a whole pass over {self._describe_sources()}; "
                   "see the skip counts")

        def count_skips(state, example):
            last_index, counts, sentinels_since_kept = state
            reason = tf.cast(example["_reason"], tf.int64)
            corrupt = example["_index"] - last_index - 1  # dropped by ignore_errors in between
            counts += corrupt * tf.one_hot(skips.reason_id("corrupt_image"), skips.NUM_REASONS,
                                           dtype=tf.int64)
            counts += tf.cast(reason > 0, tf.int64) * tf.one_hot(
                tf.maximum(reason, 0), skips.NUM_REASONS, dtype=tf.int64)
            keep, end = tf.equal(reason, 0), tf.equal(reason, _END_OF_DATA)
            sentinels_since_kept = tf.where(keep, tf.constant(0, tf.int64),
                                            sentinels_since_kept + tf.cast(end, tf.int64))
            check = tf.debugging.Assert(sentinels_since_kept < limit, [message])
            with tf.control_dependencies([check]):
                counts = tf.identity(counts)
            output = {**{k: v for k, v in example.items() if k != "_reason"}, "_skips": counts,
                      "_keep": keep, "_end": end}
            return (example["_index"], counts, sentinels_since_kept), output
        return count_skips

    def _describe_sources(self) -> str:
        return "; ".join(source.describe() for source in self._sources)

    # ---- the dataset -----------------------------------------------------------------------
    def _build_dataset(self, start: int) -> tf.data.Dataset:
        dataset = self._records().enumerate().map(_plain(lambda i, ex: {**ex, "_index": i}))
        if start:
            dataset = dataset.skip(start)  # resuming: records are re-read, not re-decoded
        dataset = dataset.map(_plain(self._example_fn()), num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
        dataset = dataset.ignore_errors()
        initial = (tf.constant(start - 1, tf.int64), tf.zeros([skips.NUM_REASONS], tf.int64),
                   tf.constant(0, tf.int64))
        dataset = self._batch_examples(dataset.scan(initial, _plain(self._count_skips_fn())))
        if self._batch_ops:
            dataset = dataset.map(_plain(ops.compose(self._batch_ops, self.op_context)),
                                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        return dataset.with_options(options).prefetch(self.input_config.prefetch_batches)

    def _batch_examples(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Counted examples -> batches (a subclass may batch otherwise: text_pipeline.py)."""
        if not self.training:
            return self._pad_for_eval(dataset)
        dataset = dataset.filter(_plain(lambda ex: ex["_keep"]))
        dataset = dataset.map(_plain(lambda ex: {k: v for k, v in ex.items()
                                                 if k not in ("_keep", "_end")}))
        return dataset.batch(self.local_batch_size, drop_remainder=True)

    def _pad_for_eval(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        # Real examples pass with _mask True. The end-of-data sentinel becomes the first padding
        # example: it carries the final skip counts (trailing bad examples included).
        def mark(ex):
            out = {k: v for k, v in ex.items() if k not in ("_keep", "_end")}
            keep = ex["_keep"]  # False only for the sentinel: make it look like padding
            for key, value in out.items():
                if key != "_skips":
                    out[key] = tf.where(keep, value, _padding_value(key, value))
            return {**out, "_mask": keep}
        dataset = dataset.filter(_plain(lambda ex: ex["_keep"] | ex["_end"])).map(_plain(mark))
        spec = {k: v for k, v in dataset.element_spec.items() if k not in ("_skips", "_mask")}
        padding = tf.data.Dataset.from_tensors({
            **{k: _padding_value(k, tf.zeros(v.shape, v.dtype)) for k, v in spec.items()},
            "_skips": tf.zeros([skips.NUM_REASONS], tf.int64), "_mask": tf.constant(False)})
        total = self.num_batches * self.local_batch_size
        return dataset.concatenate(padding.repeat()).take(total).batch(self.local_batch_size)

    # ---- iteration and state -----------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._next_raw()
        # Counts are cumulative; all-padding batches carry zeros, hence the running maximum.
        self._skips = np.maximum(self._skips, self._skip_offset + batch["_skips"].max(axis=0))
        real_index = batch["_index"][batch["_index"] >= 0]
        if real_index.size:
            self.position = int(real_index.max()) + 1
        output = {k: v for k, v in batch.items() if not k.startswith("_")}
        if self.has_labels:
            output["label"] = batch["label"].astype(np.int32)
        else:
            output.pop("label", None)
        if not self.training:
            output["_mask"] = batch["_mask"]
        return output

    def _next_raw(self) -> dict[str, np.ndarray]:
        """The dataset's next batch as it comes (with `_index`, `_skips`, ...)."""
        if self._closed:
            raise RuntimeError("this input pipeline is closed; make a new one with "
                               "state=get_state() to continue")
        if self._iterator is None:
            self._iterator = self.dataset.as_numpy_iterator()
        try:
            batch = next(self._iterator)
        except tf.errors.InvalidArgumentError as error:
            message = error.message
            if "assertion failed: [" in message:  # ours: keep the text, drop TF's node names
                message = message.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]
                message = message.split("]\n", 1)[0]
            raise ValueError(f"input pipeline stopped: {message}") from None
        return batch

    def close(self) -> None:
        """Releases the tf.data iterator (done for every open pipeline at exit too). To go on
        later, make a new pipeline with `state=get_state()`."""
        self._closed = True
        if self._iterator is not None:
            self._iterator = None
            gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def tokenizer(self):
        """The tokenizer of `input.tokenizer` (resolved when an op first needs it)."""
        return self.op_context.tokenizer

    @property
    def skip_counts(self) -> dict[str, int]:
        return skips.counts_dict(self._skips)

    def get_state(self) -> dict:
        """JSON-able position of this host's stream (save one per process)."""
        return {"position": self.position, "skips": self.skip_counts,
                "fingerprint": self.fingerprint}


def make_pipeline(data_config, input_config, *, training: bool, process_index: int | None = None,
                  process_count: int | None = None, state: dict | None = None,
                  transform: str | Sequence[str] | None = None) -> InputPipeline:
    """The trainer's entry point; process_index/count default to jax's. `transform`: the task's
    op specs after input.preprocess (task.example_transform(training)); None: the contrastive
    one (ops_contrastive.example_transform)."""
    return InputPipeline(data_config, input_config, training=training,
                         process_index=process_index, process_count=process_count, state=state,
                         transform=transform)


def to_global_arrays(batch: dict[str, np.ndarray], mesh, batch_axes=None) -> dict:
    """Host-local batch -> global jax.Arrays split over the mesh's batch axes (leading dim;
    default sharding.BATCH_AXES)."""
    from vlmjax.sharding import BATCH_AXES, host_batch_to_global
    return host_batch_to_global(batch, mesh, BATCH_AXES if batch_axes is None else batch_axes)
