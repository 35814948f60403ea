"""The text LM's input pipeline: records -> documents -> tokenised, packed (or padded) rows.

    data = TextPipeline(config.data, config.input, training=True)
    batch = next(data)   # tokens, targets int32 [B, L]; loss_mask bool [B, L];
                         # segment_ids int32 [B, L] (0 = padding, 1.. = documents of the row)
    data.get_state(), data.skip_counts, data.close()   # as pipeline.InputPipeline

It is a `pipeline.InputPipeline` that reads no images (`images=False`): the same sources
(vlm_shapes, tfds, text_file, mixtures of them), host split, shuffling, skip counting and exact
resume. Per record, the ops of `input.documents` (ops_lm.py) make the record's `documents`; then,
in Python, the documents of each chunk of records are tokenised in one native batch call and
laid into rows by lm_rows.RowBatch: BOS/EOS per document, packed first-fit (input.pack) or one
document a row, targets within each document only. Each batch is filled in the order of the
record stream, and a batch ends where the next document does not fit, so the position of a
batch's end is (record, document within it): the saved state holds both and a resumed run makes
exactly the batches the uninterrupted one would have.

Counted per document (skip_counts, the trainer's train/data/skipped/...): `no_targets` (fewer
than 2 tokens: skipped, never trained) and `truncated_document` (longer than max_len: its tail
is dropped); bad records as in pipeline.py.

Evaluation (`training=False`): one pass in order, on one host (evaluators read all their data
in every process), the last batch padded with empty rows; every batch has `_mask` [B], True for
rows holding a document.

config.input of the `lm` task (`default_lm_input_config()`; every key required, no other):
  global_batch_size  rows per step over all hosts
  max_len            tokens per row (L)
  pack               True: several documents a row (first fit); False: one, padded
  add_bos, add_eos   a BOS / EOS token around every document
  documents          op string of ops_lm.py, e.g. "texts_as_documents|qa_documents"
  tokenizer          "vlm_shapes" or a .model / tokenizer.json path (pipeline_config)
  special_tokens     texts the tokenizer never splits (added if new), e.g.
                     tokenizers.VLM_SHAPES_LM_TOKENS; [] for none
  shuffle_buffer, seed, prefetch_batches   as the image-text pipeline's
"""
from __future__ import annotations

import collections

import ml_collections
import numpy as np

from vlmjax.data import lm_rows, ops, pipeline, pipeline_config, skips
from vlmjax.data.pipeline import _plain

LM_INPUT_DEFAULTS = dict(
    global_batch_size=32, max_len=128, pack=True, add_bos=True, add_eos=True,
    documents="texts_as_documents", tokenizer="vlm_shapes", special_tokens=(),
    shuffle_buffer=10_000, seed=0, prefetch_batches=2)
DOCUMENT_OPS = ("texts_as_documents", "qa_documents", "cot_documents", "scene_documents")
NO_TARGETS, TRUNCATED = skips.reason_id("no_targets"), skips.reason_id("truncated_document")
_RECORD_KEYS = ("documents", "_index", "_skips", "_keep")


def default_lm_input_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(LM_INPUT_DEFAULTS)


def validate_lm_input(config, where: str = "input") -> None:
    """Raises ValueError naming the key for an unknown, missing or bad key of config.input."""
    unknown = sorted(set(config.keys()) - set(LM_INPUT_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: "
                         f"{sorted(LM_INPUT_DEFAULTS)}")
    missing = sorted(set(LM_INPUT_DEFAULTS) - set(config.keys()))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} (start from "
                         "text_pipeline.default_lm_input_config())")
    for key, minimum in (("global_batch_size", 1), ("max_len", 2), ("shuffle_buffer", 1),
                         ("prefetch_batches", 0), ("seed", 0)):
        value = config[key]
        if type(value) is not int or value < minimum:
            raise ValueError(f"{where}.{key}: {value!r} must be an integer >= {minimum}")
    for key in ("pack", "add_bos", "add_eos"):
        if not isinstance(config[key], bool):
            raise ValueError(f"{where}.{key}: {config[key]!r} must be True or False")
    try:
        parsed = ops.parse(config.documents)
    except ValueError as error:
        raise ValueError(f"{where}.documents: {error}") from None
    if not any(op.name in DOCUMENT_OPS for op in parsed) or any(op.info.batched for op in parsed):
        raise ValueError(f"{where}.documents={config.documents!r} must name per-record ops, "
                         f"at least one of {list(DOCUMENT_OPS)} (ops_lm.py)")
    special = config.special_tokens
    if isinstance(special, str) or not all(isinstance(t, str) and t.strip()
                                           for t in (special or ())):
        raise ValueError(f"{where}.special_tokens: {special!r} must be a list of non-empty "
                         "strings")


def record_input_config(config) -> ml_collections.ConfigDict:
    """The image-text pipeline's config.input that reads this LM input's records."""
    record = pipeline_config.default_input_config()
    record.update(dict(global_batch_size=config.global_batch_size, max_text_len=config.max_len,
                       add_bos=config.add_bos, eos="append" if config.add_eos else "none",
                       tokenizer=config.tokenizer, shuffle_buffer=config.shuffle_buffer,
                       seed=config.seed, prefetch_batches=config.prefetch_batches,
                       preprocess=""))
    if config.special_tokens:
        record.special_tokens = list(config.special_tokens)
    return record


class TextPipeline(pipeline.InputPipeline):
    """Iterator of LM row batches for this host; see the module docstring. `vocab_size` (the
    model's) must hold every token id; `tokenizer` replaces input.tokenizer's (evaluators pass
    the training data's)."""

    def __init__(self, data_config, input_config, *, training: bool, process_index=None,
                 process_count=None, state: dict | None = None, vocab_size: int | None = None,
                 tokenizer=None):
        validate_lm_input(input_config)
        self.lm_input = input_config
        self.max_len, self.pack = int(input_config.max_len), bool(input_config.pack)
        rows = dict(max_len=self.max_len, pack=self.pack, add_bos=bool(input_config.add_bos),
                    add_eos=bool(input_config.add_eos))
        super().__init__(data_config, record_input_config(input_config), training=training,
                         process_index=process_index, process_count=process_count, state=state,
                         transform=[input_config.documents], images=False,
                         fingerprint_extra={"lm_rows": rows})
        if tokenizer is not None:
            self.op_context._tokenizer = tokenizer
        tokenizer = self.tokenizer
        self.bos_id = tokenizer.bos_id if input_config.add_bos else None
        self.eos_id = tokenizer.eos_id if input_config.add_eos else None
        for flag, token_id in (("add_bos", self.bos_id), ("add_eos", self.eos_id)):
            if input_config[flag] and token_id is None:
                raise ValueError(f"input.{flag}: the tokenizer {input_config.tokenizer!r} has "
                                 f"no {flag[4:].upper()} token; set input.{flag}=False")
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer ({input_config.tokenizer!r} with "
                             f"{len(tokenizer.special_tokens)} special tokens) has "
                             f"{tokenizer.vocab_size} ids, more than model.vocab_size="
                             f"{vocab_size}; raise model.vocab_size")
        self.document = int(state.get("document", 0)) if state else 0  # of record `position`
        self._skip_documents = self.document
        self._batch = self._new_batch()
        self._batch_counts = np.zeros(skips.NUM_REASONS, np.int64)  # of the batch being filled
        self._row_counts = np.zeros(skips.NUM_REASONS, np.int64)    # of the batches made
        self._last_skips = np.zeros(skips.NUM_REASONS, np.int64)
        self._ready: collections.deque = collections.deque()
        self._ended = False

    # ---- tf.data part: records with their documents, in chunks -----------------------------
    def _eval_num_batches(self):
        return None  # one host reads all; the number of rows is known at the end only

    def _batch_examples(self, dataset):
        keep = (lambda ex: ex["_keep"]) if self.training else (lambda ex: ex["_keep"] | ex["_end"])
        dataset = dataset.filter(_plain(keep))
        dataset = dataset.map(_plain(lambda ex: {k: ex[k] for k in _RECORD_KEYS}))
        return dataset.padded_batch(self.local_batch_size)

    # ---- Python part: tokenise and lay out rows --------------------------------------------
    def _new_batch(self) -> lm_rows.RowBatch:
        return lm_rows.RowBatch(self.local_batch_size, self.max_len, self.pack,
                                self.tokenizer.pad_id)

    def _read_chunk(self) -> None:
        try:
            chunk = self._next_raw()
        except StopIteration:
            self._ended = True
            if not self._batch.empty:
                self._finish_batch(None, 0, self._last_skips)
            return
        texts, owners = [], []
        for row, documents in enumerate(chunk["documents"]):
            if chunk["_keep"][row]:
                for document in documents:
                    text = document.decode("utf-8", errors="replace").strip()
                    if text:
                        texts.append(text)
                        owners.append(row)
        encoded = self.tokenizer.encode_raw(texts) if texts else []
        per_record = collections.defaultdict(list)
        for row, ids in zip(owners, encoded):
            per_record[row].append(ids)
        for row in range(len(chunk["_index"])):
            record_skips = chunk["_skips"][row].astype(np.int64)
            self._last_skips = record_skips
            if chunk["_keep"][row]:
                self._place(int(chunk["_index"][row]), record_skips, per_record[row])

    def _place(self, index: int, record_skips: np.ndarray, documents: list) -> None:
        first = 0
        if self._skip_documents:  # resuming inside this record: its first ones are trained
            if index != self.position:
                raise ValueError(f"cannot resume: the saved position is document "
                                 f"{self._skip_documents} of record {self.position}, but the "
                                 f"stream resumed at record {index}")
            first, self._skip_documents = self._skip_documents, 0
        for number in range(first, len(documents)):
            sequence, truncated = lm_rows.document_tokens(documents[number], self.bos_id,
                                                          self.eos_id, self.max_len)
            if len(sequence) < 2:
                self._batch_counts[NO_TARGETS] += 1
                continue
            if not self._batch.add(sequence):
                self._finish_batch(index, number, record_skips)
                self._batch.add(sequence)
            self._batch_counts[TRUNCATED] += truncated

    def _finish_batch(self, index: int | None, document: int, record_skips: np.ndarray):
        """The batch being filled is complete; the next one starts at document `document` of
        record `index`, whose cumulative skip counts (of the records before it) are given."""
        self._row_counts = self._row_counts + self._batch_counts
        self._batch_counts = np.zeros_like(self._batch_counts)
        arrays = self._batch.arrays()
        if not self.training:
            arrays["_mask"] = self._batch.documents > 0
        self._ready.append((arrays, index, document, record_skips + self._row_counts))
        self._batch = self._new_batch()

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._ended:
                raise StopIteration
            self._read_chunk()
        arrays, index, document, counts = self._ready.popleft()
        if index is not None:
            self.position, self.document = index, document
        self._skips = self._skip_offset + counts
        return arrays

    def get_state(self) -> dict:
        """JSON-able position: record `position`, of which `document` documents are used."""
        return {**super().get_state(), "document": self.document}
