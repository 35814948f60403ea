"""The tokenizer that goes with a pretrained model, through `vlmjax.data.tokenizers`.

Settings (stored in a converted directory's config.json under "tokenizer"):
  file       the tokenizer file, relative to the directory (tokenizer.json or spiece.model)
  max_len    text length the reference pads/truncates to (CLIP 77, SigLIP 64)
  add_bos    CLIP starts with <|startoftext|>; SigLIP has no BOS
  eos        "sticky": EOS is appended and survives truncation (HF's truncation keeps special
             tokens; big_vision's eos="sticky")
  pad_id / bos_id / eos_id   the special ids, resolved from the files
  text_mask  whether the reference model sees a padding mask. SigLIP does not: it reads the
             padded sequence and pools the last position, so pass `text_mask=None` for parity.
Encode with `tokenizer.encode_batch(texts, max_len, add_bos=..., eos=...)`.
"""
from __future__ import annotations

import os
import shutil

from vlmjax.convert import hf_io
from vlmjax.data.tokenizers import Tokenizer, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")  # in order of preference
# Copied along so that an export is a complete HF directory again.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "preprocessor_config.json")
FAMILY_DEFAULTS = {"clip": dict(add_bos=True, eos="sticky", text_mask=True),
                   "siglip": dict(add_bos=False, eos="sticky", text_mask=False)}
BIG_VISION_PAD_ID = 1  # big_vision's SigLIP text preprocessing: tokenize(eos="sticky", pad_value=1)


def _token_name(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_tokens(directory: str) -> dict:
    names = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = os.path.join(directory, name)
        if os.path.exists(path):
            data = hf_io.read_json(path)
            for key in ("bos_token", "eos_token", "pad_token"):
                if data.get(key) is not None:
                    names[key] = _token_name(data[key])
            if "model_max_length" in data:
                names["model_max_length"] = data["model_max_length"]
    return names


def open_tokenizer(directory: str, settings: dict) -> Tokenizer:
    path = os.path.join(directory, settings["file"])
    if path.endswith(".json"):
        return load_tokenizer(path, bos_token=settings.get("bos_token"),
                              eos_token=settings.get("eos_token"),
                              pad_token=settings.get("pad_token"))
    return load_tokenizer(path, pad_id=settings.get("pad_id"))


def hf_tokenizer_settings(directory: str, family: str, text_max_len: int) -> dict | None:
    """Settings for the tokenizer in an HF model directory; None when it has no tokenizer file."""
    file = next((f for f in TOKENIZER_FILES if os.path.exists(os.path.join(directory, f))), None)
    if file is None:
        return None
    names = _special_tokens(directory)
    max_len = text_max_len
    if isinstance(names.get("model_max_length"), int) and names["model_max_length"] > 0:
        max_len = min(max_len, names["model_max_length"])  # HF uses a huge sentinel for "none"
    settings = dict(file=file, max_len=max_len, **FAMILY_DEFAULTS[family])
    if file.endswith(".json"):
        settings.update({k: names[k] for k in ("bos_token", "eos_token", "pad_token")
                         if k in names})
        tokenizer = open_tokenizer(directory, settings)
    else:
        tokenizer = load_tokenizer(os.path.join(directory, file))
        pad = names.get("pad_token")
        pad_id = tokenizer.piece_id(pad) if pad is not None else tokenizer.pad_id
        tokenizer = load_tokenizer(os.path.join(directory, file), pad_id=pad_id)
    settings.update(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    if settings["add_bos"] and tokenizer.bos_id is None:
        settings["add_bos"] = False
    settings["files"] = [file] + [f for f in COMPANION_FILES
                                  if os.path.exists(os.path.join(directory, f))]
    return settings


def spm_tokenizer_settings(path: str, text_max_len: int) -> dict:
    """Settings for a SentencePiece model given next to a big_vision SigLIP checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if not path.endswith(".model"):
        raise ValueError(f"tokenizer {path}: a big_vision checkpoint takes a SentencePiece "
                         "'.model' file")
    tokenizer = load_tokenizer(path, pad_id=BIG_VISION_PAD_ID)
    return dict(file=os.path.basename(path), max_len=text_max_len, **FAMILY_DEFAULTS["siglip"],
                pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                files=[os.path.basename(path)])


def copy_tokenizer_files(src_dir: str, settings: dict | None, out_dir: str) -> None:
    for name in (settings or {}).get("files", []):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
