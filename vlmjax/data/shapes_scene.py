"""vlm_shapes scenes: the vocabulary and the random layout of 1 to 3 objects per image.

A scene is pure data (no pixels): which objects, where, how big, on which background. The renderer
(`shapes_render`) turns it into pixels and the text module (`shapes_text`) into captions and QA, so
both always agree on what the image shows.

Layout: each object sits in its own region (left, right, top, bottom, center). Region centres and
object sizes are chosen so that two objects can never overlap, whatever the jitter.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
COLOURS = {  # name -> RGB in [0, 1]; all saturated or extreme so they stand out on the background
    "red": (0.86, 0.14, 0.14),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.87, 0.15),
    "green": (0.15, 0.66, 0.24),
    "cyan": (0.15, 0.80, 0.86),
    "blue": (0.15, 0.30, 0.88),
    "purple": (0.56, 0.24, 0.80),
    "pink": (0.97, 0.48, 0.72),
    "white": (0.97, 0.97, 0.97),
    "black": (0.06, 0.06, 0.06),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUND_KINDS = ("noise", "stripes", "checker", "gradient")
BACKGROUND_TONES = {  # muted mid tones: white and black objects stay visible on all of them
    "gray": (0.50, 0.50, 0.50),
    "beige": (0.62, 0.57, 0.47),
    "slate": (0.42, 0.47, 0.54),
    "taupe": (0.53, 0.47, 0.44),
}

REGION_CENTRES = {"left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.18),
                  "bottom": (0.5, 0.82), "center": (0.5, 0.5)}
# Half-extent of an object as a fraction of the image side. Largest half-extent + jitter stays
# below half the 0.32 spacing between neighbouring region centres, so objects never overlap.
HALF_EXTENT_RANGE = {"small": (0.075, 0.09), "large": (0.115, 0.135)}
CENTRE_JITTER = 0.02
MAX_ROTATION_DEGREES = 12.0
OBJECT_COUNT_PROBS = (0.4, 0.3, 0.3)  # 1, 2 or 3 objects; 40% single-object images carry a label

NUM_CLASSES = len(COLOUR_NAMES) * len(SHAPES)


def class_index(colour: str, shape: str) -> int:
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES)


def _is_novel(colour_id: int, shape_id: int) -> bool:
    # One held-out shape per colour, spread so every shape is held out with some colour.
    return shape_id == (3 * colour_id + 1) % len(SHAPES)


NOVEL_COMBOS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES
                     if _is_novel(COLOUR_NAMES.index(c), SHAPES.index(s)))
SEEN_COMBOS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in NOVEL_COMBOS)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]  # normalised (x, y), y grows downwards
    half_extent: float
    rotation: float  # radians
    colour_rgb: tuple[float, float, float]  # the class colour with a little per-image jitter

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def polygon(self) -> np.ndarray:
        """Outline as [N, 2] normalised (x, y) points."""
        unit = _UNIT_OUTLINES[self.shape]
        cos, sin = math.cos(self.rotation), math.sin(self.rotation)
        rotated = unit @ np.array([[cos, sin], [-sin, cos]])
        return rotated * self.half_extent + np.array(self.centre)

    def bbox_xyxy(self) -> tuple[float, float, float, float]:
        points = self.polygon()
        x0, y0 = np.clip(points.min(axis=0), 0.0, 1.0)
        x1, y1 = np.clip(points.max(axis=0), 0.0, 1.0)
        return float(x0), float(y0), float(x1), float(y1)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background_kind: str
    background_tone: str
    background_seed: int  # seeds the pixel noise, so the renderer needs no other randomness

    @property
    def label(self) -> int:
        """Colour x shape class of a single-object image; -1 when there are several objects."""
        if len(self.objects) != 1:
            return -1
        return class_index(self.objects[0].colour, self.objects[0].shape)


def _regular_polygon(n: int, phase: float = -math.pi / 2, radius: float = 1.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer = _regular_polygon(5)
    inner = _regular_polygon(5, phase=-math.pi / 2 + math.pi / 5, radius=0.45)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.33) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1),
                     (-a, a), (-1, a), (-1, -a), (-a, -a)], dtype=np.float64)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(axis=0) + points.min(axis=0)) / 2
    return points / np.abs(points).max()


_UNIT_OUTLINES = {  # each spans about [-1, 1] in both axes
    "circle": _regular_polygon(48),
    "square": np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
    "triangle": _regular_polygon(3) + np.array([0.0, 0.25]),  # centred: apex -0.75, base 0.75
    "star": _star(),
    "hexagon": _regular_polygon(6, phase=0.0),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]),
    "heart": _heart(),
}


_COUNT_CDF = np.cumsum(OBJECT_COUNT_PROBS)[:-1]


def _distinct_integers(rng: np.random.Generator, high: int, count: int) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        value = int(rng.integers(high))
        if value not in chosen:
            chosen.append(value)
    return chosen


def sample_scene(rng: np.random.Generator, combos: tuple[tuple[str, str], ...],
                 num_objects: int | None = None) -> Scene:
    """Draws a scene whose objects have distinct positions and distinct (colour, shape) pairs.

    `combos` lists the allowed (colour, shape) pairs: SEEN_COMBOS for train/validation/test,
    NOVEL_COMBOS for test_novel.
    """
    # Plain draws rather than rng.choice(p=...): this runs 50,000 times per build.
    if num_objects is None:
        num_objects = 1 + int(np.searchsorted(_COUNT_CDF, rng.random(), side="right"))
    positions = rng.permutation(len(POSITIONS))[:num_objects]
    combo_ids = _distinct_integers(rng, len(combos), num_objects)
    objects = []
    for position_id, combo_id in zip(positions, combo_ids):
        colour, shape = combos[combo_id]
        size = SIZES[int(rng.integers(len(SIZES)))]
        cx, cy = REGION_CENTRES[POSITIONS[position_id]]
        jitter_x, jitter_y, *rgb_jitter = rng.uniform(-1.0, 1.0, size=5).tolist()
        rgb = tuple(min(max(c + 0.03 * j, 0.0), 1.0) for c, j in zip(COLOURS[colour], rgb_jitter))
        rotation = 0.0 if shape == "circle" else math.radians(
            rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES))
        objects.append(SceneObject(
            shape=shape, colour=colour, size=size, position=POSITIONS[position_id],
            centre=(cx + CENTRE_JITTER * jitter_x, cy + CENTRE_JITTER * jitter_y),
            half_extent=float(rng.uniform(*HALF_EXTENT_RANGE[size])),
            rotation=rotation, colour_rgb=rgb))
    return Scene(
        objects=tuple(objects),
        background_kind=BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))],
        background_tone=tuple(BACKGROUND_TONES)[int(rng.integers(len(BACKGROUND_TONES)))],
        background_seed=int(rng.integers(2**31)))
