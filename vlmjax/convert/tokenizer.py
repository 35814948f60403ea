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
from vlmjax.data.tokenizers import (Tokenizer, hf_special_tokens, load_model_tokenizer,
                                     load_tokenizer)

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")  # in order of preference
# Copied along so that an export is a complete HF directory again.
COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "preprocessor_config.json")
FAMILY_DEFAULTS = {"clip": dict(add_bos=True, eos="sticky", text_mask=True),
                   "siglip": dict(add_bos=False, eos="sticky", text_mask=False)}
BIG_VISION_PAD_ID = 1  # big_vision's SigLIP text preprocessing: tokenize(eos="sticky", pad_value=1)


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
    names = hf_special_tokens(directory)
    max_len = text_max_len
    if isinstance(names.get("model_max_length"), int) and names["model_max_length"] > 0:
        max_len = min(max_len, names["model_max_length"])  # HF uses a huge sentinel for "none"
    settings = dict(file=file, max_len=max_len, **FAMILY_DEFAULTS[family])
    if file.endswith(".json"):
        settings.update({k: names[k] for k in ("bos_token", "eos_token", "pad_token")
                         if k in names})
    # The same loader as the data pipeline's (input.tokenizer = this file), so the ids agree.
    tokenizer = load_model_tokenizer(os.path.join(directory, file))
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


def with_tokenizer_config(settings: dict | None, directory: str, out_dir: str) -> dict | None:
    """A SentencePiece model that came without Hugging Face tokenizer files (big_vision's, padded
    with `pad_id`, not the model's pad piece) gets a `tokenizer_config.json` in `out_dir` that
    declares its pad/EOS pieces and length: then the data pipeline (`input.tokenizer =
    OUT/spiece.model`) and transformers' SiglipTokenizer pad as the reference does. Returns the
    settings with that file listed (unchanged settings when there is nothing to add)."""
    if (settings is None or not settings["file"].endswith(".model")
            or "tokenizer_config.json" in settings.get("files", [])):
        return settings
    tokenizer = load_tokenizer(os.path.join(directory, settings["file"]))
    piece = tokenizer._sp.id_to_piece
    config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": settings["max_len"],
              "pad_token": piece(settings["pad_id"]), "unk_token": piece(tokenizer.unk_id)}
    if settings.get("eos_id") is not None:
        config["eos_token"] = piece(settings["eos_id"])
    hf_io.write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    return dict(settings, files=list(settings.get("files", [])) + ["tokenizer_config.json"])


def copy_tokenizer_files(src_dir: str, settings: dict | None, out_dir: str) -> None:
    for name in (settings or {}).get("files", []):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
