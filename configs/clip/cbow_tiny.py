"""Tiny CLIP on vlm_shapes with a CBOW text tower: configs/clip/tiny.py with its text tower (token
+ position embeddings pooled by a MAP head) replaced by the mean of the caption's token
embeddings (models/cbow.py, CLIP's "CBOW" text encoder), then the text projection.

    python -m vlmjax.train --config configs/clip/cbow_tiny.py --workdir /tmp/clip_cbow_tiny
    python -m vlmjax.train --config configs/clip/cbow_tiny.py:runlocal --workdir /tmp/t  # seconds

A bag of words cannot tell "red circle above blue star" from "blue circle above red star"; the
zero-shot prompts name one object, so the single-object evaluations do not need word order.
Measured (README configs table, docs/experiments.md "ResNet and CBOW towers"): see there.
Presets: those of configs/clip/tiny.py (runlocal, steps, batch, lr, image, negatives; text_depth
means nothing to a CBOW tower).
"""
import os

from vlmjax.config import load_config


def get_config(arg=None):
    here = os.path.dirname(os.path.abspath(__file__))
    c = load_config(os.path.join(here, "tiny.py") + (f":{arg}" if arg else ""))
    text = c.model.text
    c.model.text_arch = "cbow"
    c.model.text = dict(vocab_size=text.vocab_size, max_len=text.max_len, width=text.width)
    return c
