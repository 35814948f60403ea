"""Tokenizers: SentencePiece and Hugging Face tokenizer.json behind one batch interface."""
from __future__ import annotations

import numpy as np
import pytest

from vlmjax.data import tokenizers

CORPUS = [f"a {size} {colour} {shape} on the {side}"
          for size in ("small", "large") for colour in ("red", "green", "blue", "yellow")
          for shape in ("circle", "square", "star") for side in ("left", "right", "top")] * 3


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    return tokenizers.train_sentencepiece(CORPUS, str(path), vocab_size=300)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    """A tiny CLIP-style byte-level BPE tokenizer.json with <|startoftext|>/<|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<|startoftext|>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def test_sentencepiece_special_ids_and_roundtrip(sp_tokenizer):
    assert sp_tokenizer.special_ids == {"pad": 0, "bos": 2, "eos": 3}
    texts = ["a large red star on the left", "a small blue circle on the top"]
    ids, mask = sp_tokenizer.encode_batch(texts, max_len=48)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (2, 48)
    assert sp_tokenizer.decode_batch(ids, mask) == texts
    assert np.all(ids[~mask] == 0)  # padding id where the mask is False
    assert np.all(mask[:, :-1] >= mask[:, 1:])  # real tokens first


def test_bos_and_eos_modes(sp_tokenizer):
    text = ["a large red star on the left"]
    raw = sp_tokenizer.encode_raw(text)[0]
    n = len(raw)
    ids, mask = sp_tokenizer.encode_batch(text, max_len=n + 3, add_bos=True, eos="append")
    assert list(ids[0, : n + 2]) == [2, *raw, 3] and mask[0].sum() == n + 2
    # Truncation: "append" loses the EOS, "sticky" keeps it in the last position.
    ids, mask = sp_tokenizer.encode_batch(text, max_len=3, eos="append")
    assert list(ids[0]) == raw[:3] and mask[0].all()
    ids, mask = sp_tokenizer.encode_batch(text, max_len=3, eos="sticky")
    assert list(ids[0]) == [*raw[:2], 3]
    ids, mask = sp_tokenizer.encode_batch(text, max_len=n + 2, eos="sticky")
    assert list(ids[0, : n + 1]) == [*raw, 3] and not mask[0, n + 1]
    ids, _ = sp_tokenizer.encode_batch(text, max_len=n + 2, eos="none")
    assert 3 not in ids[0]


def test_bytes_input_and_byte_fallback(sp_tokenizer):
    text = "a red star é 漢字"
    ids, mask = sp_tokenizer.encode_batch([text.encode()], max_len=40)
    assert sp_tokenizer.unk_id not in ids[0][mask[0]]  # byte fallback, no <unk>
    assert sp_tokenizer.decode(ids[0], mask[0]) == text


def test_encode_errors(sp_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="eos='maybe'.*none"):
        sp_tokenizer.encode_batch(["a"], max_len=4, eos="maybe")
    with pytest.raises(ValueError, match="max_len=1"):
        sp_tokenizer.encode_batch(["a"], max_len=1, add_bos=True)
    with pytest.raises(ValueError, match="'.model'.*tokenizer.json"):
        tokenizers.load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizers.load_tokenizer(str(tmp_path / "missing.model"))


def test_huggingface_tokenizer_matches_transformers(hf_json):
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizers.load_tokenizer(hf_json)
    assert tokenizer.bos_id is not None and tokenizer.eos_id is not None
    reference = PreTrainedTokenizerFast(tokenizer_file=hf_json)
    texts = ["a large red star on the left", "a small green square on the top"]
    ids, mask = tokenizer.encode_batch(texts, max_len=24, add_bos=True, eos="append")
    for row, text in enumerate(texts):
        expected = [tokenizer.bos_id, *reference.encode(text, add_special_tokens=False),
                    tokenizer.eos_id]
        assert list(ids[row][mask[row]]) == expected
    assert tokenizer.decode_batch(ids, mask) == texts
    assert tokenizer.pad_id == 0  # no pad token in the file: pad with 0, the mask tells


def test_huggingface_explicit_special_tokens(hf_json):
    tokenizer = tokenizers.HuggingFaceTokenizer(hf_json, pad_token="<|endoftext|>")
    ids, mask = tokenizer.encode_batch(["a red star"], max_len=12)
    assert np.all(ids[0][~mask[0]] == tokenizer.eos_id)
    with pytest.raises(ValueError, match="bos_token='<s>' is not in the vocabulary"):
        tokenizers.HuggingFaceTokenizer(hf_json, bos_token="<s>")


SPECIALS = ["<image>", "[ENC]", "[DEC]", "<|im_start|>", "<|im_end|>"]
TEXT = "<|im_start|>user a red <image> star[ENC] on the left<|im_end|>"


@pytest.fixture(scope="module")
def sp_plain_path(tmp_path_factory):
    """A SentencePiece model without user-defined symbols: '<image>' is no piece of it."""
    path = tmp_path_factory.mktemp("sp_plain") / "plain.model"
    tokenizers.train_sentencepiece(CORPUS, str(path), vocab_size=300, user_defined_symbols=())
    return str(path)


def _expected_with_specials(tokenizer, text, specials):
    """Reference: split on the special tokens by hand, encode the pieces between them."""
    import re
    ids = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(tokenizer.special_tokens[part])
        elif part:
            ids += tokenizer.encode_raw([part])[0]
    return ids


def test_sentencepiece_special_tokens_never_split(sp_plain_path):
    tokenizer = tokenizers.load_tokenizer(sp_plain_path)
    before = tokenizer.vocab_size
    assert len(tokenizer.encode_raw(["<image>"])[0]) > 1  # not a piece: it would split
    ids = tokenizer.add_special_tokens(SPECIALS)
    assert ids == list(range(before, before + len(SPECIALS)))  # new ids after the vocabulary
    assert tokenizer.vocab_size == before + len(SPECIALS)
    assert tokenizer.token_id("<image>") == before
    raw = tokenizer.encode_raw([TEXT, "no special token here"])
    assert raw[0] == _expected_with_specials(tokenizer, TEXT, SPECIALS)
    assert raw[0].count(tokenizer.token_id("<image>")) == 1
    assert raw[0][0] == tokenizer.token_id("<|im_start|>")
    assert raw[1] == tokenizers.load_tokenizer(sp_plain_path).encode_raw(
        ["no special token here"])[0]
    ids, mask = tokenizer.encode_batch([TEXT], max_len=40, eos="append")
    assert tokenizer.decode(ids[0], mask[0]) == (
        "<|im_start|> user a red <image> star [ENC] on the left <|im_end|>")
    with pytest.raises(ValueError, match=r"'<video>' is not a special token.*add it"):
        tokenizer.token_id("<video>")


def test_sentencepiece_special_token_that_is_a_piece_keeps_its_id(sp_tokenizer):
    piece = sp_tokenizer.piece_id("<image>")  # a user-defined symbol of the vlm_shapes recipe
    assert piece != sp_tokenizer.unk_id
    assert sp_tokenizer.add_special_tokens(["<image>"]) == [piece]
    assert sp_tokenizer.encode_raw(["a <image> b"])[0].count(piece) == 1


def test_sentencepiece_added_tokens_from_hugging_face_files(sp_plain_path, tmp_path):
    import json
    import shutil
    shutil.copy(sp_plain_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "0": {"content": "<pad>", "special": True},  # a framing token: not an added one
        "320": {"content": "<image>", "special": True}}}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[ENC]": 321}))
    tokenizer = tokenizers.load_model_tokenizer(str(tmp_path / "tokenizer.model"))
    assert tokenizer.special_tokens == {"<image>": 320, "[ENC]": 321}
    assert tokenizer.vocab_size == 322
    assert tokenizer.encode_raw(["a <image> b"])[0] == _expected_with_specials(
        tokenizer, "a <image> b", ["<image>"])


def test_huggingface_special_tokens_never_split_like_transformers(hf_json, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizers.load_tokenizer(hf_json)
    assert len(tokenizer.encode_raw(["<image>"])[0]) > 1
    before = tokenizer.vocab_size
    ids = tokenizer.add_special_tokens(SPECIALS)
    assert len(set(ids)) == len(SPECIALS) and tokenizer.vocab_size == before + len(SPECIALS)
    assert {t: tokenizer.special_tokens[t] for t in SPECIALS} == dict(zip(SPECIALS, ids))
    reference = PreTrainedTokenizerFast(tokenizer_file=hf_json,
                                        additional_special_tokens=SPECIALS)
    raw = tokenizer.encode_raw([TEXT])[0]
    assert raw == reference.encode(TEXT, add_special_tokens=False)
    assert raw.count(tokenizer.token_id("<image>")) == 1
    ids, mask = tokenizer.encode_batch([TEXT], max_len=40, add_bos=True, eos="append")
    assert tokenizer.decode(ids[0], mask[0]) == TEXT
    # A tokenizer.json that holds added tokens brings them along.
    tokenizer._tokenizer.save(str(tmp_path / "tokenizer.json"))
    reloaded = tokenizers.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert reloaded.encode_raw([TEXT])[0] == raw
    assert reloaded.token_id("[DEC]") == tokenizer.token_id("[DEC]")
