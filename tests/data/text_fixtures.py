"""Small text corpora for the LM tests (data, evals, train): plain-text and JSONL files with a
SentencePiece model trained on them. Built once per session and directory factory."""
from __future__ import annotations

import json
import random

import ml_collections

from vlmjax.data import text_pipeline, tokenizers

WORDS = ("a small big red blue green circle square star on the left right top bottom of with "
         "there is are two three shapes").split()
_CACHE: dict = {}


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(count)]


def text_corpus(tmp_path_factory) -> dict:
    """{"train": train.txt (plain text, 60 lines), "train_jsonl": train.jsonl (the same
    documents under "text"), "valid": valid.jsonl (60), "tokenizer": a .model, "documents":
    {name: the documents in file order}}."""
    key = id(tmp_path_factory)
    if key not in _CACHE:
        directory = tmp_path_factory.mktemp("text_corpus")
        train, valid = sentences(60, 0), sentences(60, 1)
        (directory / "train.txt").write_text("".join(f"{t}\n" for t in train))
        (directory / "train.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                                       for i, t in enumerate(train)))
        (directory / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                       for t in valid))
        model = directory / "corpus.model"
        tokenizers.train_sentencepiece(sentences(400, 2), str(model), vocab_size=320,
                                       user_defined_symbols=())
        _CACHE[key] = {"dir": directory, "train": str(directory / "train.txt"),
                       "train_jsonl": str(directory / "train.jsonl"),
                       "valid": str(directory / "valid.jsonl"), "tokenizer": str(model),
                       "documents": {"train": train, "valid": valid}}
    return _CACHE[key]


def text_data(paths: str, **keys) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(source="text_file", paths=paths, **keys))


def lm_input(tokenizer: str, **keys) -> ml_collections.ConfigDict:
    config = text_pipeline.default_lm_input_config()
    config.update({**dict(tokenizer=tokenizer, global_batch_size=4, max_len=24,
                          shuffle_buffer=1, prefetch_batches=1), **keys})
    return config


def lm_config(corpus: dict, *, steps: int = 6, **model) -> ml_collections.ConfigDict:
    """A whole `lm` trainer config on the corpus's text files (no vlm_shapes build): a one-layer
    decoder, perplexity on valid.jsonl at the end."""
    config = ml_collections.ConfigDict()
    config.task = "lm"
    config.seed = 0
    config.total_steps = steps
    config.model = dict(dict(vocab_size=320, width=32, depth=1, num_heads=2, num_kv_heads=1,
                             mlp_dim=64, tie_embeddings=False, dtype="float32"), **model)
    config.model_init = ""
    config.loss = dict(chunk_size=16, z_loss=0.0, label_smoothing=0.0)
    config.data = text_data(corpus["train"])
    config.input = lm_input(corpus["tokenizer"], global_batch_size=8, max_len=32,
                            shuffle_buffer=16)
    config.optim = dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=1,
                        weight_decay=0.0, b2=0.95, clip_norm=1.0)
    config.evals = dict(valid=dict(type="perplexity", data=dict(paths=corpus["valid"]),
                                   batch_size=8))
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.log_every = 2
    config.checkpoint = dict(every=1000, keep=1)
    config.peak_flops = 1e11
    return config
