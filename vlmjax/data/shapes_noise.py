"""Web noise for vlm_shapes: replaces a fraction of train captions by junk or by another image's
caption.

Each kind of text junk is aimed at one ALIGN rule, so the filter's precision and recall can be
measured on `vlm_shapes/noisy`: size strings and generic alt-texts ("1920x1080", "alt_img") and
too-short texts fail the length rule, boilerplate shared by many images fails the sharing rule,
run-on texts fail the length rule from above, and gibberish fails the rare-token rule.

The `swapped` kind is a clean caption of another image of the split that is false of this one (it
names an object this image lacks): well-formed, in-vocabulary and shared by two images at most,
so no ALIGN text rule can catch it; only a model that looks at the image can (BLIP's CapFilt).
"""
from __future__ import annotations

import string
from typing import Callable

import numpy as np

TEXT_JUNK_KINDS = ("size_string", "generic", "shared", "too_short", "too_long", "gibberish")
SWAPPED = "swapped"
# The order is the ClassLabel order of the `caption_noise` feature: append, never reorder.
NOISE_KINDS = ("clean", *TEXT_JUNK_KINDS, SWAPPED)

_RESOLUTIONS = ((1920, 1080), (1280, 720), (800, 600), (640, 480), (1024, 768), (3840, 2160),
                (2048, 1536), (500, 375))
_GENERIC = ("alt_img", "image", "photo", "img", "untitled", "picture", "thumbnail", "alt_text",
            "default image", "no image")
SHARED_BOILERPLATE = (  # each 3-20 words with common words: only the sharing rule removes them
    "click here to see the full product gallery",
    "stock photo available for free download in high resolution",
    "this image is not available in your country",
    "all rights reserved do not copy without permission",
    "view more items from this seller on our store",
)
_SHORT_WORDS = ("red", "circle", "star", "blue", "shape", "square", "green", "triangle")


def _gibberish(rng: np.random.Generator) -> str:
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, size=int(rng.integers(4, 10))))
             for _ in range(int(rng.integers(4, 11)))]
    return " ".join(words)


def junk_caption(kind: str, rng: np.random.Generator, clean_captions: list[str]) -> str:
    if kind == "size_string":
        width, height = _RESOLUTIONS[int(rng.integers(len(_RESOLUTIONS)))]
        return f"{width}x{height}"
    if kind == "generic":
        return _GENERIC[int(rng.integers(len(_GENERIC)))]
    if kind == "shared":
        return SHARED_BOILERPLATE[int(rng.integers(len(SHARED_BOILERPLATE)))]
    if kind == "too_short":
        return " ".join(rng.choice(_SHORT_WORDS, size=int(rng.integers(1, 3)), replace=False))
    if kind == "too_long":  # true but run-on: several captions glued together, > 20 words
        text = ""
        while len(text.split()) <= 20:
            text += (", " if text else "") + clean_captions[int(rng.integers(len(clean_captions)))]
        return text
    if kind == "gibberish":
        return _gibberish(rng)
    raise ValueError(f"unknown text junk kind {kind!r}; valid: {TEXT_JUNK_KINDS}")


def add_noise(captions: list[str], fraction: float, rng: np.random.Generator,
              swapped_caption: Callable[[np.random.Generator], str]
              ) -> tuple[list[str], list[str]]:
    """Replaces each caption with probability `fraction` by noise of a kind drawn uniformly from
    NOISE_KINDS[1:]; `swapped_caption(rng)` gives another image's caption that is false of this
    one. Returns (texts, kinds)."""
    texts, kinds = [], []
    for caption in captions:
        if rng.random() < fraction:
            kind = NOISE_KINDS[1 + int(rng.integers(len(NOISE_KINDS) - 1))]
            texts.append(swapped_caption(rng) if kind == SWAPPED
                         else junk_caption(kind, rng, captions))
        else:
            kind = "clean"
            texts.append(caption)
        kinds.append(kind)
    return texts, kinds
