"""Tiny CLIP on vlm_shapes with a CBOW text tower: configs/clip/tiny.py with its text tower (token
+ position embeddings pooled by a MAP head) replaced by the mean of the caption's token
embeddings (models/cbow.py, CLIP's "CBOW" text encoder), then the text projection.

    python -m vlmjax.train --config configs/clip/cbow_tiny.py --workdir /tmp/clip_cbow_tiny
    python -m vlmjax.train --config configs/clip/cbow_tiny.py:runlocal --workdir /tmp/t  # seconds

A bag of words cannot tell "red circle above blue star" from "blue circle above red star"; the
zero-shot prompts name one object, so the single-object evaluations do not need word order.
Measured (docs/experiments.md "ResNet and CBOW towers", 2-core CPU, vlm_shapes 1.1.0): at
`:steps=300` 57.0% zero-shot top-1 on validation, 54.9% on test, where configs/clip/tiny.py's
MAP-pooled text tower reaches 28.9% on test at the same 300 steps; lr 3e-3 (the default here)
was chosen over 2e-3 (53.3% validation) on validation. The full 2000 steps were not run.
Presets: those of configs/clip/tiny.py (runlocal, steps, batch, lr, image, negatives; text_depth
means nothing to a CBOW tower).
"""
import os

from vlmjax.config import load_config


def get_config(arg=None):
    here = os.path.dirname(os.path.abspath(__file__))
    presets = "lr=3e-3" + (f",{arg}" if arg else "")  # a later lr= in `arg` wins
    c = load_config(os.path.join(here, "tiny.py") + f":{presets}")
    text = c.model.text
    c.model.text_arch = "cbow"
    c.model.text = dict(vocab_size=text.vocab_size, max_len=text.max_len, width=text.width)
    return c
