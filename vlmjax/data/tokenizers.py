"""Tokenizers: one interface over SentencePiece models and Hugging Face `tokenizer.json` files.

    tokenizer = load_tokenizer("path/to/spiece.model")       # SigLIP / T5 / Llama 2 / vlm_shapes
    tokenizer = load_tokenizer("path/to/tokenizer.json")     # CLIP BPE, Llama 3, ... (`tokenizers`)
    tokenizer = load_model_tokenizer("hf_dir/spiece.model")  # + the special tokens that the HF
                                                              # files beside it declare
    ids_BL, mask_BL = tokenizer.encode_batch(texts, max_len=16, add_bos=False, eos="sticky")

`encode_batch` returns int32 ids padded with `pad_id` and a bool mask (True on real tokens,
BOS/EOS included).

Special tokens (LLaVA's `<image>`, BLIP's `[ENC]` / `[DEC]`, chat-template markers such as
`<|im_start|>`) never split: `add_special_tokens(["<image>"])` registers them (a token the
vocabulary has keeps its id, a new one gets the next free id, so `vocab_size` grows as with
Hugging Face's added tokens), and then `encode_raw("a <image> b")` holds `<image>` as one id on
both backends. Hugging Face files bring their own added tokens (`tokenizer.json`'s
`added_tokens`; for a SentencePiece model, `added_tokens_decoder` of the tokenizer_config.json
or `added_tokens.json` beside it: `load_model_tokenizer`). SentencePiece encodes the text
between special tokens as separate pieces, so the whitespace next to a special token is not a
token (as Llama's tokenizer does); `decode` writes special tokens back as their text, separated
by a space. EOS modes:
  "none"    no EOS;
  "append"  EOS after the text, then truncate to max_len (a long text loses its EOS);
  "sticky"  EOS after the text and kept when truncating (SigLIP/big_vision): the last position of a
            truncated text is EOS.
Both backends tokenize a whole batch in native code, so tokenizing batches (not single examples)
inside tf.data (`tf.numpy_function` in pipeline.py) keeps up with image decoding.

`train_sentencepiece` trains the vlm_shapes model at dataset build time.
"""
from __future__ import annotations

import abc
import io
import os
import re
from typing import Iterable, Sequence

import numpy as np

EOS_MODES = ("none", "append", "sticky")
# Extra pieces for the vlm_shapes model: LLaVA's image placeholder and the LLaVA-CoT stage tags.
VLM_SHAPES_SYMBOLS = ("<image>", "<SUMMARY>", "</SUMMARY>", "<CAPTION>", "</CAPTION>",
                      "<REASONING>", "</REASONING>", "<CONCLUSION>", "</CONCLUSION>")
# The special tokens of the vlm_shapes language models (configs/lm/tiny.py and the LLaVA, BLIP-2
# and fusion demos built on it): the symbols above, ChatML's turn markers and BLIP's [ENC] /
# [DEC]. They are added when the tokenizer is loaded (input.special_tokens), not trained into the
# SentencePiece model, so the vlm_shapes model and the contrastive configs' ids stay as they are:
# the symbols above keep their pieces' ids, the other four get the ids after the vocabulary.
VLM_SHAPES_LM_TOKENS = VLM_SHAPES_SYMBOLS + ("<|im_start|>", "<|im_end|>", "[ENC]", "[DEC]")


def _as_str(text) -> str:
    if isinstance(text, bytes):  # strings coming out of tf.data are bytes
        return text.decode("utf-8", errors="replace")
    return str(text)


class Tokenizer(abc.ABC):
    """Common batch encoding (BOS/EOS/truncation/padding) over a backend's raw ids."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    @abc.abstractmethod
    def encode_raw(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids, without BOS/EOS; registered special tokens are single ids."""

    @abc.abstractmethod
    def decode_raw(self, ids: Sequence[int]) -> str:
        """Text of ids (added special tokens written as their text)."""

    @abc.abstractmethod
    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Registers tokens that never split (see the module docstring); returns their ids."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """The added special tokens: text -> id."""

    def token_id(self, token: str) -> int:
        """The id of a special token (e.g. model_config['image_token_id'] for '<image>')."""
        if token not in self.special_tokens:
            raise ValueError(f"{token!r} is not a special token of this tokenizer; it has "
                             f"{sorted(self.special_tokens)} (add it with add_special_tokens)")
        return self.special_tokens[token]

    @property
    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "bos": self.bos_id, "eos": self.eos_id}

    @property
    def adds_prefix_space(self) -> bool:
        """Whether every encoded text starts a new word (SentencePiece's dummy prefix, a
        Metaspace pre-tokenizer): a text encoded after other ids then needs no leading space of
        its own (vlmjax.data.conversations tokenises segment by segment)."""
        return False

    def encode_batch(self, texts: Iterable, max_len: int, add_bos: bool = False,
                     eos: str = "none") -> tuple[np.ndarray, np.ndarray]:
        if eos not in EOS_MODES:
            raise ValueError(f"eos={eos!r} is not valid; use one of {EOS_MODES}")
        if max_len < 1 + int(add_bos) + int(eos == "sticky"):
            raise ValueError(f"max_len={max_len} leaves no room for text (add_bos={add_bos}, "
                             f"eos={eos!r})")
        if add_bos and self.bos_id is None:
            raise ValueError(f"{type(self).__name__} has no BOS token; set add_bos=False")
        if eos != "none" and self.eos_id is None:
            raise ValueError(f"{type(self).__name__} has no EOS token; set eos='none'")
        raw = self.encode_raw([_as_str(t) for t in texts])
        ids = np.full((len(raw), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(raw), max_len), bool)
        for row, pieces in enumerate(raw):
            tokens = ([self.bos_id] if add_bos else []) + list(pieces)
            if eos == "sticky":
                tokens = tokens[:max_len - 1] + [self.eos_id]
            else:
                tokens = (tokens + ([self.eos_id] if eos == "append" else []))[:max_len]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = True
        return ids, mask

    def decode(self, ids: Sequence[int], mask: Sequence[bool] | None = None) -> str:
        ids = np.asarray(ids)
        if mask is not None:
            ids = ids[np.asarray(mask, bool)]
        specials = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        return self.decode_raw([int(i) for i in ids if int(i) not in specials])

    def decode_batch(self, ids_BL, mask_BL=None) -> list[str]:
        masks = [None] * len(ids_BL) if mask_BL is None else mask_BL
        return [self.decode(ids, mask) for ids, mask in zip(ids_BL, masks)]


class SentencePieceTokenizer(Tokenizer):
    """Any SentencePiece `.model` (SigLIP, T5, Gemma, Llama 2, the vlm_shapes model)."""

    def __init__(self, model_path: str, pad_id: int | None = None):
        import sentencepiece

        self.path = os.fspath(model_path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        own_pad = self._sp.pad_id()
        # Models without a pad piece (pad_id() == -1) pad with 0; the mask marks the padding.
        self.pad_id = pad_id if pad_id is not None else (own_pad if own_pad >= 0 else 0)
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.unk_id = self._sp.unk_id()
        self._special: dict[str, int] = {}
        self._special_pattern = None

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def add_special_tokens(self, tokens, ids: Sequence[int] | None = None) -> list[int]:
        """`ids` (from Hugging Face files) pins the ids; by default a piece of the model keeps
        its id and a new token gets vocab_size."""
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"special token {token!r} must be a non-empty string")
            if token in self._special:
                continue
            if ids is not None:
                token_id = int(ids[i])
            elif self._sp.id_to_piece(self._sp.piece_to_id(token)) == token:
                token_id = self._sp.piece_to_id(token)
            else:
                token_id = self.vocab_size
            self._special[token] = token_id
            self.vocab_size = max(self.vocab_size, token_id + 1)
        # Longest first, so "<image_end>" is not read as "<image>" + "_end>".
        alternatives = sorted(self._special, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._special_by_id = {i: t for t, i in self._special.items()}
        return [self._special[token] for token in tokens]

    def encode_raw(self, texts):
        texts = list(texts)
        if self._special_pattern is None:
            return self._sp.encode(texts, out_type=int)
        # Split on special tokens, encode all text segments in one batch, then reassemble.
        split = [self._special_pattern.split(text) for text in texts]
        segments = [part for parts in split for part in parts[0::2]]
        encoded = iter(self._sp.encode(segments, out_type=int))
        out = []
        for parts in split:
            ids = []
            for i, part in enumerate(parts):
                ids += next(encoded) if i % 2 == 0 else [self._special[part]]
            out.append(ids)
        return out

    def decode_raw(self, ids):
        ids = list(ids)
        if not self._special:
            return self._sp.decode(ids)
        parts, run = [], []
        for token_id in ids + [None]:
            if token_id is None or token_id in self._special_by_id:
                parts.append(self._sp.decode(run))
                run = []
                if token_id is not None:
                    parts.append(self._special_by_id[token_id])
            else:
                run.append(token_id)
        return " ".join(part for part in parts if part)

    def piece_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    @property
    def adds_prefix_space(self) -> bool:
        pieces = self._sp.encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith("\u2581")


_BOS_CANDIDATES = ("<|startoftext|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HuggingFaceTokenizer(Tokenizer):
    """Any Hugging Face `tokenizer.json` (CLIP's BPE, Llama 3, ...) through `tokenizers`.

    Special tokens are found by their usual names unless given; the file's own post-processor is
    bypassed (`add_special_tokens=False`) so BOS/EOS follow this interface's options.
    """

    def __init__(self, tokenizer_json: str, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        import tokenizers

        self.path = os.fspath(tokenizer_json)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"tokenizer.json not found: {self.path}")
        self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.bos_id = self._find(bos_token, _BOS_CANDIDATES, "bos_token")
        self.eos_id = self._find(eos_token, _EOS_CANDIDATES, "eos_token")
        pad_id = self._find(pad_token, _PAD_CANDIDATES, "pad_token")
        self.pad_id = pad_id if pad_id is not None else 0

    def _find(self, given: str | None, candidates: Sequence[str], what: str) -> int | None:
        if given is not None:
            token_id = self._tokenizer.token_to_id(given)
            if token_id is None:
                raise ValueError(f"{what}={given!r} is not in the vocabulary of {self.path}")
            return token_id
        for candidate in candidates:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The file's added tokens (and those added since), without BOS/EOS/pad."""
        framing = {self.bos_id, self.eos_id, self.pad_id}
        return {token.content: token_id
                for token_id, token in self._tokenizer.get_added_tokens_decoder().items()
                if token_id not in framing}

    def add_special_tokens(self, tokens) -> list[int]:
        import tokenizers

        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"special token {token!r} must be a non-empty string")
        self._tokenizer.add_special_tokens([
            tokenizers.AddedToken(token, special=True, normalized=False) for token in tokens])
        return [self._tokenizer.token_to_id(token) for token in tokens]

    def encode_raw(self, texts):
        # add_special_tokens=False leaves out the file's BOS/EOS template; added tokens are
        # still matched whole.
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode_raw(self, ids):
        # BOS/EOS/pad are removed by `decode`; added tokens are written back as their text.
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def adds_prefix_space(self) -> bool:
        pieces = self._tokenizer.encode("a", add_special_tokens=False).tokens
        return bool(pieces) and pieces[0][:1] in ("\u2581", "\u0120")  # Metaspace / ByteLevel


def load_tokenizer(path: str, **kwargs) -> Tokenizer:
    """A tokenizer from a `.model` (SentencePiece) or `.json` (Hugging Face) file."""
    path = os.fspath(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, **kwargs)
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path, **kwargs)
    raise ValueError(f"tokenizer {path!r}: expected a SentencePiece '.model' file or a Hugging "
                     "Face 'tokenizer.json' file")


HF_SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # the latter wins


def hf_special_tokens(directory: str) -> dict:
    """`bos_token` / `eos_token` / `pad_token` names (and `model_max_length`) that the Hugging
    Face files in `directory` declare; {} when there are none."""
    import json

    names = {}
    for name in HF_SPECIAL_TOKEN_FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None:
                names[key] = value
        if "model_max_length" in data:
            names["model_max_length"] = data["model_max_length"]
    return names


def load_model_tokenizer(path: str) -> Tokenizer:
    """`load_tokenizer(path)` with the special tokens that the Hugging Face tokenizer files beside
    it declare (`tokenizer_config.json`, `special_tokens_map.json`), as the model it came with
    uses them: SigLIP pads with `</s>` (id 1), not SentencePiece's pad piece (0), and its text
    tower reads the padding; CLIP pads with `<|endoftext|>`. Without such files this is
    `load_tokenizer(path)`."""
    path = os.fspath(path)
    names = hf_special_tokens(os.path.dirname(os.path.abspath(path)))
    if path.endswith(".json"):
        return load_tokenizer(path, **{k: names[k] for k in ("bos_token", "eos_token",
                                                             "pad_token") if k in names})
    tokenizer = load_tokenizer(path)
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer
    pad = names.get("pad_token")
    if pad is not None:
        pad_id = tokenizer.piece_id(pad)
        if tokenizer._sp.id_to_piece(pad_id) != pad:
            raise ValueError(f"pad_token={pad!r} (from the tokenizer files beside {path}) is "
                             "not a piece of that SentencePiece model")
        tokenizer = SentencePieceTokenizer(path, pad_id=pad_id)
    added = hf_added_tokens(os.path.dirname(os.path.abspath(path)))
    framing = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id}
    added = {token: i for token, i in added.items() if i not in framing}
    if added:
        tokenizer.add_special_tokens(list(added), ids=list(added.values()))
    return tokenizer


def hf_added_tokens(directory: str) -> dict[str, int]:
    """Added tokens (text -> id) that the Hugging Face files in `directory` declare for a
    SentencePiece model: `added_tokens_decoder` of tokenizer_config.json, `added_tokens.json`."""
    import json

    tokens = {}
    path = os.path.join(directory, "added_tokens.json")
    if os.path.exists(path):
        with open(path) as f:
            tokens.update({str(k): int(v) for k, v in json.load(f).items()})
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        with open(path) as f:
            decoder = json.load(f).get("added_tokens_decoder") or {}
        tokens.update({entry["content"]: int(i) for i, entry in decoder.items()
                       if isinstance(entry, dict) and "content" in entry})
    return tokens


def train_sentencepiece(texts: Iterable[str], output_path: str, vocab_size: int = 1000,
                        user_defined_symbols: Sequence[str] = VLM_SHAPES_SYMBOLS,
                        max_sentences: int = 300_000) -> SentencePieceTokenizer:
    """Trains a unigram SentencePiece model with pad=0, unk=1, bos=2, eos=3 and byte fallback.

    Byte fallback lets it encode any UTF-8 text (web noise, other datasets) without <unk>; the
    vocabulary may come out smaller than `vocab_size` on a small corpus.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, byte_fallback=True,
        hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(user_defined_symbols), input_sentence_size=max_sentences,
        # One thread: the unigram EM sums per-thread partial counts, so the model's bytes
        # depend on the thread count; one thread makes them the same on every machine.
        shuffle_input_sentence=True, num_threads=1,
        minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "wb") as f:
        f.write(model.getvalue())
    return SentencePieceTokenizer(output_path)
