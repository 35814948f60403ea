"""The `llava` task's input pipeline: LLaVA JSON records -> images + chat-template token rows.

    data = LlavaPipeline(config.data, config.input, training=True, num_image_tokens=T,
                         image_token_id=ID, vocab_size=V)
    batch = next(data)   # tokens, targets int32 [B, L]; loss_mask bool [B, L];
                         # segment_ids int32 [B, L] (1 on real tokens, 0 on padding);
                         # image float32 [B, S, S, 3] (zeros for text-only rows and padding)
    data.get_state(), data.skip_counts, data.close()   # as pipeline.InputPipeline

It is a `pipeline.InputPipeline` over `llava_json` sources (or a mixture of them): the same host
split, shuffling, image decoding (input.preprocess: image ops only), bad-record counting and
exact resume. Per record the tf.data part passes the image and the conversation's JSON; then, in
Python, each chunk of records is encoded in one native tokenizer call by
`conversations.encode_conversations` with the configured chat template: `num_image_tokens`
copies of the image token's id per image (HF convention; T = the vision tower's tokens after
the select strategy, given by the task), next-token targets, and the loss mask on the assistant
answers and their end-of-turn tokens only (never on prompts, images or padding). One sample a
row, padded to input.max_len; rows are filled in the order of the record stream, so a batch ends
after a record and the saved state is the record position: a resumed run makes exactly the
batches the uninterrupted one would have.

Entries without an image (text-only instruction data, as in LLaVA-1.5's mix) are kept: their
rows hold no image tokens and a zero image. (`LlavaJsonSource` alone skips them as
`missing_image`; this pipeline reads such entries itself.)

Counted (skip_counts, the trainer's train/data/skipped/...): per conversation `no_targets` (no
answer token left: only leading assistant turns, or truncation cut every answer) and `bad_json`
(turns with an unknown role, ...), both skipped, never trained; `truncated_conversation` (cut
at max_len, still trained); and bad records as in pipeline.py (missing_text: no assistant turn,
bad_json: an entry that is not a record, missing_image_file, corrupt images, ...).

Evaluation (`training=False`): one pass in order (give process_count=1: evaluators read all
their data in every process), the last batch padded with empty rows; every batch has `_mask`
[B], True for rows holding a sample.

config.input of the `llava` task (`default_llava_input_config()`; every key required except the
optional ones, no other):
  global_batch_size  rows per step over all hosts
  image_size         side S of the images
  preprocess         image ops of pipeline.py's input.preprocess, e.g. "resize|value_range"
                     (a size op and a value op; no caption op, and no flip: answers name
                     left and right)
  max_len            tokens per row (L), image tokens included
  template           chat template of data/conversations.py: plain (stage 1) | vicuna_v1 |
                     llama3 | chatml
  tokenizer          a .model / tokenizer.json path: the LLM's tokenizer
  special_tokens     texts the tokenizer never splits (the image token is always added), e.g.
                     tokenizers.VLM_SHAPES_LM_TOKENS; [] for none
  shuffle_buffer, seed, prefetch_batches   as the image-text pipeline's
  image_token        optional, default "<image>": the image marker of the data and its token
  crop_area_min      optional, default 0.05: for inception_crop
  pack               optional, default False: training rows hold several samples (below)
  images_per_row     optional, with pack: the images a packed row holds (0, the default:
                     max_len // (image tokens + 32))

Packing (input.pack, training only): samples are placed one after another in a row, each its own
segment (segment_ids 1, 2, ... within the row: attention stays inside a sample and positions
restart at 0), until the next sample's tokens or its image would not fit; then the next row
starts, and after the last row of the batch the sample that did not fit opens the next batch (so
a batch still ends after a record, and resume is exact). `image` is then float32
[B, images_per_row, S, S, 3]: a row's images in the order of its samples (zeros after them),
which is the order the model gives image tokens their visual tokens. The loss is the same token
mean as unpacked (every answer token counts once); only fewer pad tokens are computed.
"""
from __future__ import annotations

import collections
import io
import json

import numpy as np
from PIL import Image

from vlmjax.data import conversations, ops, pipeline, pipeline_config, preprocess, skips, sources
from vlmjax.data.pipeline import _plain
from vlmjax.data.tf_cpu import tf

LLAVA_INPUT_DEFAULTS = dict(
    global_batch_size=32, image_size=64, preprocess="resize|value_range", max_len=256,
    template="vicuna_v1", tokenizer="", special_tokens=(), shuffle_buffer=10_000, seed=0,
    prefetch_batches=2)
OPTIONAL_INPUT = {"image_token": "<image>", "crop_area_min": 0.05, "pack": False,
                  "images_per_row": 0}
PACK_TEXT_TOKENS = 32  # images_per_row 0: max_len // (image tokens + this) images a row
CONVERSATION_OP = "llava_conversation"
TEXT_ONLY_LABEL = -2  # the label of a text-only record (LLaVA JSON has no labels: -1)
_REASONS = {conversations.TRUNCATED: "truncated_conversation", "no_targets": "no_targets",
            "bad_json": "bad_json"}
_RECORD_KEYS = ("image", "llava_turns", "llava_has_image", "_index", "_skips", "_keep")


def default_llava_input_config():
    import ml_collections
    return ml_collections.ConfigDict({**LLAVA_INPUT_DEFAULTS, **OPTIONAL_INPUT})


def validate_llava_input(config, where: str = "input") -> None:
    """Raises ValueError naming the key for an unknown, missing or bad key of config.input."""
    valid = set(LLAVA_INPUT_DEFAULTS) | set(OPTIONAL_INPUT)
    unknown = sorted(set(config.keys()) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    missing = sorted(set(LLAVA_INPUT_DEFAULTS) - set(config.keys()))
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} (start from "
                         "llava_pipeline.default_llava_input_config())")
    for key, minimum in (("global_batch_size", 1), ("image_size", 1), ("max_len", 2),
                         ("shuffle_buffer", 1), ("prefetch_batches", 0), ("seed", 0),
                         ("images_per_row", 0)):
        value = config.get(key, OPTIONAL_INPUT.get(key))
        if type(value) is not int or value < minimum:
            raise ValueError(f"{where}.{key}: {value!r} must be an integer >= {minimum}")
    if not isinstance(config.get("pack", False), bool):
        raise ValueError(f"{where}.pack: {config.get('pack')!r} must be True or False")
    if config.template not in conversations.TEMPLATES:
        raise ValueError(f"{where}.template: {config.template!r} is not one of "
                         f"{sorted(conversations.TEMPLATES)}")
    if not isinstance(config.tokenizer, str) or config.tokenizer in ("", "vlm_shapes"):
        raise ValueError(f"{where}.tokenizer: {config.tokenizer!r}; give the LLM's tokenizer "
                         "file (a .model or tokenizer.json path; for vlm_shapes models its "
                         "vlm_shapes_sp.model)")
    names = preprocess.parse_ops(config.preprocess)
    kinds = {name: ops.get_op(name).kind for name in names}
    wrong = [name for name, kind in kinds.items() if kind in ("text", "flip")]
    if wrong:
        raise ValueError(f"{where}.preprocess={config.preprocess!r}: {wrong} do not apply to "
                         "conversations (no caption to choose; a flip contradicts answers that "
                         "name left and right): use image ops only, e.g. 'resize|value_range'")
    special = config.special_tokens
    if isinstance(special, str) or not all(isinstance(t, str) and t.strip()
                                           for t in (special or ())):
        raise ValueError(f"{where}.special_tokens: {special!r} must be a list of non-empty "
                         "strings")
    image_token = config.get("image_token", OPTIONAL_INPUT["image_token"])
    if not isinstance(image_token, str) or not image_token.strip():
        raise ValueError(f"{where}.image_token: {image_token!r} must be a non-empty string")


def validate_llava_data(config, where: str = "data") -> None:
    """Every source must be llava_json: the task trains on conversations."""
    subs = config.sources.values() if config.get("source") == "mixture" else [config]
    wrong = sorted({sub.get("source") for sub in subs} - {"llava_json"})
    if wrong:
        raise ValueError(f"{where}.source: {wrong} hold no conversations; the llava task reads "
                         "'llava_json' sources (or a mixture of them), e.g. the output of "
                         "`python -m vlmjax.data.export llava`")


def record_input_config(config):
    """The image-text pipeline's config.input that reads this LLaVA input's records."""
    record = pipeline_config.default_input_config()
    image_token = config.get("image_token", OPTIONAL_INPUT["image_token"])
    special = list(config.special_tokens or ())
    record.update(dict(
        global_batch_size=config.global_batch_size, image_size=config.image_size,
        preprocess=config.preprocess,
        crop_area_min=config.get("crop_area_min", OPTIONAL_INPUT["crop_area_min"]),
        max_text_len=config.max_len, add_bos=False, eos="none", tokenizer=config.tokenizer,
        shuffle_buffer=config.shuffle_buffer, seed=config.seed,
        prefetch_batches=config.prefetch_batches))
    record.special_tokens = special + ([image_token] if image_token not in special else [])
    return record


@ops.register_op(CONVERSATION_OP)
def llava_conversation() -> ops.Op:
    """Passes the record's conversation JSON and whether it has an image to the batch."""
    def op(example):
        return {**example, "llava_turns": tf.identity(example["conversation"]),
                "llava_has_image": tf.not_equal(example["label"], TEXT_ONLY_LABEL)}
    return op


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


_BLANK_PNG = _blank_png()


class _LlavaJsonWithTextOnly(sources.LlavaJsonSource):
    """LlavaJsonSource that also yields entries without an image: a 1x1 stand-in image (the
    pipeline decodes every record) and TEXT_ONLY_LABEL, so the rows get no image tokens and a
    zero image."""

    def _example(self, entry, index: int) -> dict:
        if not isinstance(entry, dict) or entry.get("image"):
            return super()._example(entry, index)
        key = str(entry.get("id", f"{self.json_path}#{index}"))
        turns = entry.get("conversations")
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            return sources.placeholder("bad_json", key)
        answers = [t["value"] for t in turns if t.get("from") in ("gpt", "assistant")]
        if not any(a.strip() for a in answers):
            return sources.placeholder("missing_text", key)
        return sources.make_example(_BLANK_PNG, [a for a in answers if a.strip()],
                                    TEXT_ONLY_LABEL, key, json.dumps(turns))


class LlavaPipeline(pipeline.InputPipeline):
    """Iterator of LLaVA row batches for this host; see the module docstring.
    `num_image_tokens`: visual tokens per image (the model's). `image_token_id` (the model's,
    optional) must be the tokenizer's id of input.image_token; `vocab_size` (the model's) must
    hold every token id; `tokenizer` replaces input.tokenizer's."""

    def __init__(self, data_config, input_config, *, training: bool, num_image_tokens: int,
                 image_token_id: int | None = None, process_index=None, process_count=None,
                 state: dict | None = None, vocab_size: int | None = None, tokenizer=None):
        validate_llava_input(input_config)
        validate_llava_data(data_config)
        self.llava_input = input_config
        self.max_len, self.num_image_tokens = int(input_config.max_len), int(num_image_tokens)
        self.template = conversations.get_template(input_config.template)
        self.image_token = input_config.get("image_token", OPTIONAL_INPUT["image_token"])
        if not 1 <= self.num_image_tokens < self.max_len:
            raise ValueError(f"input.max_len={self.max_len} leaves no room for text after the "
                             f"{self.num_image_tokens} image tokens of an image; raise it")
        settings = dict(max_len=self.max_len, template=self.template.name,
                        image_token=self.image_token, num_image_tokens=self.num_image_tokens)
        super().__init__(data_config, record_input_config(input_config), training=training,
                         process_index=process_index, process_count=process_count, state=state,
                         transform=[CONVERSATION_OP], images=True,
                         fingerprint_extra={"llava": settings})
        if tokenizer is not None:
            self.op_context._tokenizer = tokenizer
        self._check_tokenizer(image_token_id, vocab_size)
        self.image_shape = (int(input_config.image_size),) * 2 + (3,)
        self.pack = bool(input_config.get("pack", False)) and training
        self.images_per_row = int(input_config.get("images_per_row", 0)) or max(
            1, self.max_len // (self.num_image_tokens + PACK_TEXT_TOKENS))
        self._offset = self._row_images = self._row_samples = 0  # of the row being packed
        self._batch, self._filled = self._new_batch(), 0
        self._batch_counts = np.zeros(skips.NUM_REASONS, np.int64)  # of the batch being filled
        self._row_counts = np.zeros(skips.NUM_REASONS, np.int64)    # of the batches made
        self._last_skips = np.zeros(skips.NUM_REASONS, np.int64)
        self._ready: collections.deque = collections.deque()
        self._ended = False
        self._skipped_in_a_row = 0

    def _build_sources(self):
        super()._build_sources()
        for source in self._sources:  # same fields, one more kind of record: no re-read
            if type(source) is sources.LlavaJsonSource:
                source.__class__ = _LlavaJsonWithTextOnly

    def _check_tokenizer(self, image_token_id, vocab_size) -> None:
        tokenizer = self.tokenizer
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer ({self.llava_input.tokenizer!r} with "
                             f"{len(tokenizer.special_tokens)} special tokens) has "
                             f"{tokenizer.vocab_size} ids, more than the LLM's vocab_size="
                             f"{vocab_size}")
        own_id = tokenizer.token_id(self.image_token)
        if image_token_id is not None and own_id != image_token_id:
            raise ValueError(f"the tokenizer's id of {self.image_token!r} is {own_id}, and "
                             f"model.image_token_id is {image_token_id}: set model.image_token_id"
                             f"={own_id} (or input.image_token to the model's image token)")
        # The template's markers and EOS: an error now, not after the first records are read.
        conversations.encode_conversation(
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], tokenizer,
            self.template, max_len=8, image_token=self.image_token)

    # ---- tf.data part: records with their image and conversation, in chunks --------------
    def _eval_num_batches(self):
        return None  # one pass; the number of rows is known at the end only

    def _batch_examples(self, dataset):
        keep = (lambda ex: ex["_keep"]) if self.training else (lambda ex: ex["_keep"] | ex["_end"])
        dataset = dataset.filter(_plain(keep))
        dataset = dataset.map(_plain(lambda ex: {k: ex[k] for k in _RECORD_KEYS}))
        return dataset.padded_batch(self.local_batch_size)

    # ---- Python part: encode conversations and fill rows ---------------------------------
    def _new_batch(self) -> dict[str, np.ndarray]:
        rows, length, pad = self.local_batch_size, self.max_len, self.tokenizer.pad_id
        return {"tokens": np.full((rows, length), pad, np.int32),
                "targets": np.full((rows, length), pad, np.int32),
                "loss_mask": np.zeros((rows, length), bool),
                "segment_ids": np.zeros((rows, length), np.int32),
                "image": np.zeros((rows, *((self.images_per_row,) if self.pack else ()),
                                   *self.image_shape), np.float32)}

    def _read_chunk(self) -> None:
        try:
            chunk = self._next_raw()
        except StopIteration:
            self._ended = True
            if self._row_samples:  # packing: the row being filled holds samples
                self._filled += 1
                self._offset = self._row_images = self._row_samples = 0
            if self._filled:
                self._finish_batch(None, self._last_skips)
            return
        kept = [row for row in range(len(chunk["_index"])) if chunk["_keep"][row]]
        encoded = conversations.encode_conversations(
            [chunk["llava_turns"][row] for row in kept], self.tokenizer, self.template,
            max_len=self.max_len, image_token=self.image_token,
            num_image_tokens=self.num_image_tokens,
            num_images=[int(chunk["llava_has_image"][row]) for row in kept])
        samples = dict(zip(kept, encoded))
        for row in range(len(chunk["_index"])):
            record_skips = chunk["_skips"][row].astype(np.int64)
            self._last_skips = record_skips
            if row in samples:
                self._place(int(chunk["_index"][row]), record_skips, samples[row],
                            chunk["image"][row])

    def _place(self, index: int, record_skips: np.ndarray, sample, image: np.ndarray) -> None:
        if self.pack and not sample.skipped:
            self._make_room(index, record_skips, sample)
        for reason in sample.reasons:
            self._batch_counts[skips.reason_id(_REASONS[reason])] += 1
        if sample.skipped:
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > self._records_per_pass():
                raise ValueError(f"no trainable conversation in a whole pass over "
                                 f"{self._describe_sources()}; skip counts: {self._counts_now()}")
            return
        self._skipped_in_a_row = 0
        if self.pack:
            self._pack(sample, image)
            return
        row = self._filled
        self._batch["tokens"][row] = sample.tokens
        self._batch["targets"][row] = sample.targets
        self._batch["loss_mask"][row] = sample.loss_mask
        self._batch["segment_ids"][row] = sample.mask
        if sample.num_images:
            self._batch["image"][row] = image
        self._filled += 1
        if self._filled == self.local_batch_size:
            self._finish_batch(index + 1, record_skips)

    def _make_room(self, index: int, record_skips: np.ndarray, sample) -> None:
        """Packing: start a new row when `sample` does not fit the current one, and a new
        batch, at this record, after the last row (`record_skips`, the counts up to this kept
        record, are those before it: a kept record adds none)."""
        fits = (self._offset + sample.length <= self.max_len
                and self._row_images + sample.num_images <= self.images_per_row)
        if fits or not self._row_samples:
            return
        self._filled += 1
        self._offset = self._row_images = self._row_samples = 0
        if self._filled == self.local_batch_size:  # this record opens the next batch
            self._finish_batch(index, record_skips)

    def _pack(self, sample, image: np.ndarray) -> None:
        row, start, length = self._filled, self._offset, sample.length
        span = slice(start, start + length)
        self._row_samples += 1
        self._batch["tokens"][row, span] = sample.tokens[:length]
        self._batch["targets"][row, span] = sample.targets[:length]
        self._batch["loss_mask"][row, span] = sample.loss_mask[:length]
        self._batch["segment_ids"][row, span] = self._row_samples
        if sample.num_images:
            self._batch["image"][row, self._row_images] = image
            self._row_images += 1
        self._offset += length

    def _records_per_pass(self) -> int:
        if not hasattr(self, "_pass_records"):
            self._pass_records = max(1, sum(s.num_records(self.process_index, self.process_count)
                                            for s in self._sources))
        return self._pass_records

    def _counts_now(self) -> dict[str, int]:
        return skips.counts_dict(self._skip_offset + self._last_skips + self._row_counts
                                 + self._batch_counts)

    def _finish_batch(self, next_index: int | None, record_skips: np.ndarray) -> None:
        """The batch being filled is complete; the next one starts at record `next_index`
        (None: the data ended), and `record_skips` counts the records before it."""
        self._row_counts = self._row_counts + self._batch_counts
        self._batch_counts = np.zeros_like(self._batch_counts)
        arrays = self._batch
        if not self.training:
            arrays["_mask"] = np.arange(self.local_batch_size) < self._filled
        self._ready.append((arrays, next_index, record_skips + self._row_counts))
        self._batch, self._filled = self._new_batch(), 0

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._ended:  # counts of the records after the last batch too
                self._skips = self._skip_offset + self._last_skips + self._row_counts + (
                    self._batch_counts)
                raise StopIteration
            self._read_chunk()
        arrays, next_index, counts = self._ready.popleft()
        if next_index is not None:
            self.position = next_index
        self._skips = self._skip_offset + counts
        return arrays
