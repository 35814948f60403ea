"""Renders a vlm_shapes `Scene` to an RGB uint8 image.

Objects are drawn as polygons on a 4x supersampled alpha patch and box-filtered down, which gives
anti-aliased edges at the cost of one small PIL draw per object. Backgrounds are numpy textures
with per-pixel noise, so the model cannot solve the task from a flat background colour.
"""
from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from vlmjax.data import shapes_scene

SUPERSAMPLING = 4


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _background(scene: shapes_scene.Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.background_seed)
    tone = np.array(shapes_scene.BACKGROUND_TONES[scene.background_tone], np.float32)
    tone = tone + rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    y, x = _grid(size)
    if scene.background_kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.2)
        phase = (x * math.cos(angle) + y * math.sin(angle)) / period
        shade = 0.06 * np.sign(np.sin(2 * math.pi * phase))
    elif scene.background_kind == "checker":
        cells = int(rng.integers(4, 9))
        shade = 0.05 * (((x * cells).astype(int) + (y * cells).astype(int)) % 2 * 2 - 1)
    elif scene.background_kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        shade = 0.12 * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
    else:  # "noise": only the per-pixel noise below, a little stronger
        shade = np.zeros((size, size), np.float32)
    noise_scale = 0.07 if scene.background_kind == "noise" else 0.035
    noise = rng.standard_normal(size=(size, size, 1), dtype=np.float32) * noise_scale
    image = tone[None, None, :] + shade[..., None] + noise
    return image.astype(np.float32)


def _alpha_patch(points_px: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """Coverage in [0, 1] of the polygon over the pixel patch [x0, x0+width) x [y0, y0+height)."""
    s = SUPERSAMPLING
    canvas = Image.new("L", (width * s, height * s), 0)
    local = (points_px - np.array([x0, y0])) * s
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in local.tolist()], fill=255)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def render(scene: shapes_scene.Scene, size: int) -> np.ndarray:
    """Returns the scene as uint8 [size, size, 3]."""
    image = _background(scene, size)
    for obj in scene.objects:
        points_px = obj.polygon() * size
        x0, y0 = np.floor(points_px.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(points_px.max(axis=0)).astype(int) + 1
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, size), min(y1, size)
        alpha = _alpha_patch(points_px, x0, y0, x1 - x0, y1 - y0)[..., None]
        patch = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = patch * (1.0 - alpha) + np.array(obj.colour_rgb) * alpha
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: the noisy backgrounds barely compress further, and level 6 costs 3x the time.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
