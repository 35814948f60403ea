"""Interleaved image-text sequences (Flamingo, OpenFlamingo, Idefics): MMC4-style documents ->
rows of tokens with image and end-of-chunk markers, their images, loss mask and media mask.

    data = InterleavedPipeline(config.data, config.input, image_token_id=I, end_of_chunk_id=E)
    batch = next(data)  # tokens, targets int32 [B, L]; loss_mask bool [B, L];
                        # images float32 [B, N, S, S, 3]; image_mask bool [B, L, N]
    data.get_state(), data.skip_counts                 # exact resume; counted skips

A document (one JSON object per line of a .jsonl file, or a JSON list of them), MMC4's layout:
    {"text_list": [sentence, ...],
     "image_info": [{"image_name": "a.png", "matched_text_index": 2, "matched_sim": 0.31}, ...]}
Each image goes before the sentence it is matched to (OpenFlamingo's MMC4 preprocessing); an
image starts a chunk, and a chunk ends with the end-of-chunk token before the next image and at
the end of the document, then EOS. Images whose `matched_sim` is below data.sim_threshold are
dropped (MMC4 filters at about 0.24; default: keep all).

Ids are built segment by segment: each run of sentences is tokenised on its own and the marker
ids (the model's `image_token_id` / `end_of_chunk_id`, usually added tokens beyond the LM's
vocabulary) are put between, so no tokenizer needs to know the markers.

Loss (`loss_mask`, over the targets): a target token counts when it is in a chunk, i.e. it sees
an image under the media mask (data-independent of only_attend_immediate_media) - so never the
text before the first image or between an end of chunk and the next image (OpenFlamingo masks
both), never an image token, never padding. The end-of-chunk token itself is a target: the model
learns to end its answers.

Rows: one document a row, cut at input.max_len tokens (+1 for the last target) and before its
(max_images + 1)-th image; `images` holds the row's images in order, zeros after them.
`image_mask` [B, L, N] is media_mask_from_tokens' (which images each token sees).

Counted (skip_counts, the trainer's train/data/skipped/...): `bad_json` (not a document),
`no_image` (no image left), `missing_image_file`, `corrupt_image`, `no_targets` (no target left
after cutting): skipped; `truncated` (cut at max_len or max_images): still trained.

Images are read with PIL, resized to input.image_size (bilinear) and mapped to
input.value_range (default [-1, 1], the vlmjax towers' input), each decoded once and cached.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.models.fusion import media_mask_from_tokens

IMAGE, END_OF_CHUNK = "<image>", "<|endofchunk|>"
SKIP_REASONS = ("bad_json", "no_image", "missing_image_file", "corrupt_image", "no_targets")
INPUT_KEYS = ("global_batch_size", "image_size", "max_len", "max_images", "tokenizer", "seed",
              "value_range", "special_tokens")
DATA_KEYS = ("source", "json_path", "image_dir", "sim_threshold")


class Marker(str):
    """A segment that is a marker (image or end of chunk), not text; an image's file `name`."""
    name = ""


def vqa_text(question: str, answer: str | None = None) -> str:
    """One chunk's text of an interleaved VQA sequence; the answer is left out to prompt for
    it. The tiny LM's own question-answer format (configs/lm/tiny.py), so that the frozen LM
    already knows where an answer goes (OpenFlamingo asks "Question: .. Short answer:")."""
    prompt = f"Q: {question} A:"
    return prompt if answer is None else f"{prompt} {answer}"


def read_documents(path: str) -> list[Any]:
    """The documents of a .jsonl file (one per line) or a JSON list; a line that does not parse
    is kept as None (counted as bad_json where it is read)."""
    with open(path) as file:
        if path.endswith(".jsonl"):
            docs = []
            for line in file:
                if line.strip():
                    try:
                        docs.append(json.loads(line))
                    except json.JSONDecodeError:
                        docs.append(None)
            return docs
        docs = json.load(file)
    if not isinstance(docs, list):
        raise ValueError(f"{path}: expected a JSON list of MMC4 documents (or a .jsonl file)")
    return docs


def document_segments(doc, sim_threshold: float | None = None) -> list[str] | None:
    """A document -> its segments in order: text runs, and Marker(IMAGE) / Marker(END_OF_CHUNK)
    with each image's name in `Marker.name`. None for a malformed document."""
    if not isinstance(doc, dict) or not isinstance(doc.get("text_list"), list):
        return None
    sentences = doc["text_list"]
    by_sentence = collections.defaultdict(list)
    for info in doc.get("image_info") or []:
        try:
            index, name = int(info["matched_text_index"]), str(info["image_name"])
        except (KeyError, TypeError, ValueError):
            return None
        if not 0 <= index < len(sentences):
            return None
        if sim_threshold is not None and float(info.get("matched_sim", 1.0)) < sim_threshold:
            continue
        by_sentence[index].append(name)
    segments, text, images = [], [], 0
    for index, sentence in enumerate(sentences):
        for name in by_sentence.get(index, []):
            if text:
                segments.append(" ".join(text))
                text = []
            if images:
                segments.append(Marker(END_OF_CHUNK))
            image = Marker(IMAGE)
            image.name = name
            segments.append(image)
            images += 1
        if str(sentence).strip():
            text.append(str(sentence).strip())
    if text:
        segments.append(" ".join(text))
    if images:
        segments.append(Marker(END_OF_CHUNK))
    return segments


def encode_segments(segments: Sequence[str], tokenizer, image_token_id: int,
                    end_of_chunk_id: int, add_eos: bool = True) -> tuple[list[int], list[str]]:
    """(ids, image names in order) of a document's segments: text runs tokenised one by one,
    markers as their ids, the tokenizer's BOS first and EOS last (where it has them)."""
    texts = [s for s in segments if not isinstance(s, Marker)]
    encoded = iter(tokenizer.encode_raw(texts) if texts else [])
    ids = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    names = []
    for segment in segments:
        if isinstance(segment, Marker):
            ids.append(image_token_id if segment == IMAGE else end_of_chunk_id)
            if segment == IMAGE:
                names.append(segment.name)
        else:
            ids += [int(i) for i in next(encoded)]
    if add_eos and tokenizer.eos_id is not None:
        ids.append(int(tokenizer.eos_id))
    return ids, names


def chunk_loss_mask(ids: np.ndarray, image_token_id: int, end_of_chunk_id: int) -> np.ndarray:
    """bool [n]: token i is a training target (in a chunk, not an image token); see the module
    docstring."""
    num_images = max(int((ids == image_token_id).sum()), 1)
    in_chunk = media_mask_from_tokens(ids[None], image_token_id, num_images, end_of_chunk_id,
                                      only_immediate=True, xp=np)[0].any(-1)
    return in_chunk & (ids != image_token_id)


def make_row(ids: Sequence[int], max_len: int, max_images: int, image_token_id: int,
             end_of_chunk_id: int, pad_id: int = 0) -> dict | None:
    """One row (tokens, targets, loss_mask [max_len], num_images, truncated) of a document's
    ids, or None when no target is left."""
    ids = np.asarray(ids, np.int64)
    truncated = False
    image_positions = np.flatnonzero(ids == image_token_id)
    if len(image_positions) > max_images:
        ids, truncated = ids[:image_positions[max_images]], True
    if len(ids) > max_len + 1:
        ids, truncated = ids[:max_len + 1], True
    loss = chunk_loss_mask(ids, image_token_id, end_of_chunk_id)
    tokens, targets, loss = ids[:-1], ids[1:], loss[1:]
    if not loss.any():
        return None
    pad = max_len - len(tokens)
    return dict(tokens=np.pad(tokens, (0, pad), constant_values=pad_id).astype(np.int32),
                targets=np.pad(targets, (0, pad), constant_values=pad_id).astype(np.int32),
                loss_mask=np.pad(loss, (0, pad)),
                num_images=int((tokens == image_token_id).sum()), truncated=truncated)


def load_image(path: str, size: int, value_range=(-1.0, 1.0)) -> np.ndarray:
    """float32 [size, size, 3] in `value_range`; OSError / ValueError for a bad file."""
    from PIL import Image
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        pixels = np.asarray(image, np.float32)
    low, high = value_range
    return pixels / 255.0 * (high - low) + low


def validate_input(config, where: str = "input") -> None:
    unknown = sorted(set(config) - set(INPUT_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; valid: {list(INPUT_KEYS)}")
    for key in ("global_batch_size", "image_size", "max_len", "max_images"):
        value = config.get(key)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{where}.{key} must be an integer >= 1, got {value!r}")
    if not config.get("tokenizer"):
        raise ConfigError(f"{where}.tokenizer: the LM's tokenizer (.model / tokenizer.json path)")


def validate_data(config, where: str = "data") -> None:
    unknown = sorted(set(config) - set(DATA_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; valid: {list(DATA_KEYS)}")
    if config.get("source") != "mmc4":
        raise ConfigError(f"{where}.source={config.get('source')!r}: interleaved training reads "
                          "'mmc4' documents (json_path, image_dir)")
    for key in ("json_path", "image_dir"):
        if not config.get(key):
            raise ConfigError(f"{where}.{key} is required for source 'mmc4'")


class InterleavedPipeline:
    """Training batches of MMC4-style documents (module docstring): this stream's documents
    (index % process_count == process_index), reshuffled every epoch from input.seed; the
    state is (epoch, position), so a resumed run makes the batches the uninterrupted one would.
    """

    def __init__(self, data_config, input_config, *, image_token_id: int, end_of_chunk_id: int,
                 process_index: int | None = 0, process_count: int | None = 1,
                 state: dict | None = None, tokenizer=None, only_immediate: bool = True):
        from vlmjax.data import pipeline_config
        validate_data(data_config)
        validate_input(input_config)
        process_index, process_count = process_index or 0, process_count or 1
        batch = int(input_config.global_batch_size)
        if batch % process_count:
            raise ConfigError(f"input.global_batch_size={batch} is not divisible by the "
                              f"{process_count} data shards")
        self.batch_size = batch // process_count
        self.max_len, self.max_images = int(input_config.max_len), int(input_config.max_images)
        self.image_size = int(input_config.image_size)
        self.value_range = tuple(input_config.get("value_range", (-1.0, 1.0)))
        self.image_token_id, self.end_of_chunk_id = int(image_token_id), int(end_of_chunk_id)
        self.only_immediate = bool(only_immediate)  # the model's only_attend_immediate_media
        self.tokenizer = tokenizer or pipeline_config.resolve_tokenizer(input_config, [])
        self.pad_id = 0 if self.tokenizer.pad_id is None else int(self.tokenizer.pad_id)
        self.image_dir = data_config.image_dir
        self.sim_threshold = data_config.get("sim_threshold")
        docs = read_documents(data_config.json_path)
        self.docs = docs[process_index::process_count]
        if not self.docs:
            raise ValueError(f"{data_config.json_path}: no document for data shard "
                             f"{process_index} of {process_count}")
        self.seed = int(input_config.get("seed", 0))
        self.state = dict(state or {"epoch": 0, "position": 0})
        self.skip_counts = {reason: 0 for reason in (*SKIP_REASONS, "truncated")}
        self._images: dict[str, np.ndarray] = {}

    def get_state(self) -> dict:
        return dict(self.state)

    def close(self) -> None:
        self._images.clear()

    def __iter__(self):
        return self

    def _order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_epoch = epoch
            self._epoch_order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.docs))
        return self._epoch_order

    def _image(self, name: str) -> np.ndarray:
        """Decoded once; FileNotFoundError for a missing file, OSError / ValueError for a bad
        one."""
        if name not in self._images:
            image = load_image(os.path.join(self.image_dir, name), self.image_size,
                               self.value_range)
            self._images[name] = image
        return self._images[name]

    def example(self, doc) -> dict | str:
        """One row with its images, or the skip reason."""
        segments = document_segments(doc, self.sim_threshold)
        if segments is None:
            return "bad_json"
        ids, names = encode_segments(segments, self.tokenizer, self.image_token_id,
                                     self.end_of_chunk_id)
        if not names:
            return "no_image"
        row = make_row(ids, self.max_len, self.max_images, self.image_token_id,
                       self.end_of_chunk_id, self.pad_id)
        if row is None:
            return "no_targets"
        images = np.zeros((self.max_images, self.image_size, self.image_size, 3), np.float32)
        for index, name in enumerate(names[:row["num_images"]]):
            try:
                images[index] = self._image(name)
            except FileNotFoundError:
                return "missing_image_file"
            except (OSError, ValueError):
                return "corrupt_image"
        row["images"] = images
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        rows, failures = [], 0
        while len(rows) < self.batch_size:
            epoch, position = self.state["epoch"], self.state["position"]
            doc = self.docs[self._order(epoch)[position]]
            self.state = ({"epoch": epoch + 1, "position": 0} if position + 1 == len(self.docs)
                          else {"epoch": epoch, "position": position + 1})
            row = self.example(doc)
            if isinstance(row, str):
                self.skip_counts[row] += 1
                failures += 1
                if failures > 10 * len(self.docs):  # a whole pass without a usable row
                    raise ValueError(f"no usable document in {len(self.docs)} (skipped: "
                                     f"{self.skip_counts})")
                continue
            self.skip_counts["truncated"] += row.pop("truncated")
            rows.append(row)
        batch = {key: np.stack([r[key] for r in rows])
                 for key in ("tokens", "targets", "loss_mask", "images")}
        batch["image_mask"] = media_mask_from_tokens(
            batch["tokens"], self.image_token_id, self.max_images, self.end_of_chunk_id,
            only_immediate=self.only_immediate, xp=np)
        return batch
