"""Tiny CLIP on vlm_shapes: the SigLIP tiny recipe with CLIP's softmax loss and temperature.

    python -m vlmjax.train --config configs/clip/tiny.py --workdir /tmp/clip_tiny

Measured (README): ~19% zero-shot top-1 / 81% top-5 on vlm_shapes test after 500 steps.
With `:image=cnn,negatives=7,steps=1300` (CNN tower, hard negatives): 81.9% top-1.
Presets: those of configs/siglip/tiny.py.
"""
import os

from ml_collections.config_dict import placeholder

from vlmjax.config import load_config


def get_config(arg=None):
    here = os.path.dirname(os.path.abspath(__file__))
    c = load_config(os.path.join(here, "..", "siglip", "tiny.py") + (f":{arg}" if arg else ""))
    c.loss = dict(name="clip")
    c.model.temperature_init = 1 / 0.07    # CLIP: t' = log(1 / 0.07)
    c.model.bias_init = placeholder(float)  # no bias
    return c
