"""Detailed captioning on vlm_shapes: the model describes each image, and the text is checked
against the scene's facts (the objects' colours and shapes, their number).

The text is lower-cased and split into words (letters or digits; punctuation is a separator).
A colour is named by its word (shapes_scene.COLOUR_NAMES); a shape by its name or a synonym of
the captions (shapes_text.SHAPE_WORDS: disk, plus sign, rhombus), also in the plural (+s/+es).
Per image (facts from shapes_instruct.scene_facts):
  colour named      an object's colour word occurs anywhere in the text
  shape named       an object's shape word occurs anywhere in the text
  object named      its colour word followed by its shape word, at most one word between
                    ("red circle", "red large circle"; not "a circle that is red")
  stated count      the first number (word or digits, or "no") right before "shape(s)" or
                    "object(s)": "three shapes", "2 objects"; "two red shapes" states none
  named pairs       every colour word followed by any shape word (as above): the objects the
                    text claims
Metrics for the entry `name` of config.evals (fractions in [0, 1]):
  captioning/{name}/colour_acc         colours named / objects (over all images)
  captioning/{name}/shape_acc          shapes named / objects
  captioning/{name}/all_objects_named  images whose every object is named (colour + shape)
  captioning/{name}/count_acc          images whose stated count is the number of objects /
                                       images that state one (0 when none does)
  captioning/{name}/count_stated       images that state a count
  captioning/{name}/object_precision   named pairs that are objects of the scene / named
                                       pairs (0 when none is named): guards against a text
                                       that lists every colour and shape
  captioning/{name}/images             how many images were described
  captioning/{name}/cider_d            CIDEr-D of the texts against each image's captions
                                       (0 to 10, not a fraction: the corpus mean of
                                       evals/caption_metrics.py, as coco-caption computes it)
  captioning/{name}/bleu4              corpus BLEU-4 of the same
                                       (both over the images that have a caption)
Entry keys beside the common ones and vqa's data / max_examples (evals/vqa.py):
  prompt           the instruction (default "Describe the image in detail.", one of the
                   detailed-description instructions of vlmjax/data/shapes_instruct.py); ""
                   for a model that captions after the image alone (BLIP-2's stage 2)
  max_new_tokens   the longest description in tokens (default 128)
  num_beams        1 (greedy, the default) or N: beam search with N beams (BLIP's captioning
                   evaluation uses 3); needs a model whose `answer` takes strategy="beam"
After a run `last_samples` holds its first few {prompt, prediction, objects}.
"""
from __future__ import annotations

import re

import numpy as np

from vlmjax.config import ConfigError
from vlmjax.data import shapes_scene, shapes_text
from vlmjax.evals import caption_metrics as scores_lib
from vlmjax.evals import vqa

DEFAULT_PROMPT = "Describe the image in detail."
_COUNT_NOUNS = frozenset({"shape", "shapes", "object", "objects"})
_COUNTS = {"no": 0, **{word: i for i, word in enumerate(shapes_text.NUMBER_WORDS)}}
_COUNTS.update({w: i for i, w in enumerate("four five six seven eight nine ten".split(), 4)})


def _shape_names() -> dict[str, list[tuple[str, ...]]]:
    """shape -> the word sequences that name it, singular and plural."""
    names = {}
    for shape in shapes_scene.SHAPES:
        variants = []
        for name in dict.fromkeys((shape, *shapes_text.SHAPE_WORDS.get(shape, ()))):
            *head, last = name.split()
            variants += [(*head, last + ending) for ending in ("", "s", "es")]
        names[shape] = variants
    return names


SHAPE_NAMES = _shape_names()


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", str(text).lower())


def _shape_at(words: list[str], i: int) -> str | None:
    """The shape whose name starts at word i, if any."""
    for shape, variants in SHAPE_NAMES.items():
        if any(tuple(words[i:i + len(v)]) == v for v in variants):
            return shape
    return None


def _mentions(words: list[str], shape: str) -> bool:
    return any(_shape_at(words, i) == shape for i in range(len(words)))


def named_pairs(words: list[str]) -> list[tuple[str, str]]:
    """(colour, shape) for each colour word followed by a shape name, <= 1 word between."""
    pairs = []
    for i, word in enumerate(words):
        if word in shapes_scene.COLOURS:
            for j in (i + 1, i + 2):
                shape = _shape_at(words, j)
                if shape is not None:
                    pairs.append((word, shape))
                    break
    return pairs


def stated_count(words: list[str]) -> int | None:
    """The first count stated as '<number> shape(s)/object(s)', None without one."""
    for word, after in zip(words, words[1:]):
        if after in _COUNT_NOUNS and (word in _COUNTS or word.isdigit()):
            return _COUNTS[word] if word in _COUNTS else int(word)
    return None


def check_description(text: str, objects) -> dict[str, int]:
    """What one text gets right of a scene's objects (ObjectFacts: .colour, .shape), as counts
    (see the module docstring)."""
    words = words_of(text)
    pairs = named_pairs(words)
    count = stated_count(words)
    scene_pairs = {(obj.colour, obj.shape) for obj in objects}
    named_objects = sum((obj.colour, obj.shape) in pairs for obj in objects)
    return {"objects": len(objects),
            "colours_named": sum(obj.colour in words for obj in objects),
            "shapes_named": sum(_mentions(words, obj.shape) for obj in objects),
            "all_named": int(named_objects == len(objects)),
            "count_stated": int(count is not None),
            "count_right": int(count == len(objects)),
            "pairs": len(pairs), "pairs_in_scene": sum(p in scene_pairs for p in pairs)}


def caption_metrics(checks: list[dict[str, int]]) -> dict[str, float]:
    """The metrics of the module docstring from per-image `check_description` counts."""
    if not checks:
        raise ValueError("no image was described")
    total = {key: float(sum(c[key] for c in checks)) for key in checks[0]}

    def ratio(num, den):
        return total[num] / total[den] if total[den] else 0.0

    return {"colour_acc": ratio("colours_named", "objects"),
            "shape_acc": ratio("shapes_named", "objects"),
            "all_objects_named": total["all_named"] / len(checks),
            "count_acc": ratio("count_right", "count_stated"),
            "count_stated": total["count_stated"] / len(checks),
            "object_precision": ratio("pairs_in_scene", "pairs"),
            "images": float(len(checks))}


class CaptioningEvaluator(vqa.GenerativeEvaluator):
    KEYS = {**vqa.GenerativeEvaluator.KEYS,
            "prompt": f"the instruction (default {DEFAULT_PROMPT!r})",
            "num_beams": "1 = greedy (the default), N > 1 = beam search with N beams"}
    DEFAULT_MAX_NEW_TOKENS = 128

    @classmethod
    def check(cls, entry, where):
        super().check(entry, where)
        prompt = entry.get("prompt", DEFAULT_PROMPT)
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}.prompt must be a string (\"\": none), got {prompt!r}")
        beams = entry.get("num_beams", 1)
        if type(beams) is not int or beams < 1:
            raise ConfigError(f"{where}.num_beams must be an integer >= 1 (1 = greedy), "
                              f"got {beams!r}")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.prompt = entry.get("prompt", DEFAULT_PROMPT)
        self.num_beams = int(entry.get("num_beams", 1))
        self.last_samples: list[dict] = []

    def generate(self, params, pending: list[tuple[np.ndarray, str]]) -> list[str]:
        beams = {} if self.num_beams == 1 else dict(strategy="beam", num_beams=self.num_beams)
        return super().generate(params, pending, **beams)

    def __call__(self, params) -> dict:
        scenes, predictions, references = [], [], []
        pending: list[tuple[np.ndarray, str]] = []
        for example in self.examples():
            scenes.append(self.scene(example))
            references.append([text for text in map(vqa._text, example["captions"]) if text])
            pending.append((example["image"], self.prompt))
            if len(pending) == self.batch_size:
                predictions += self.generate(params, pending)
                pending.clear()
        if pending:
            predictions += self.generate(params, pending)
        self.last_samples = [dict(prompt=self.prompt, prediction=text,
                                  objects=[f"{o.size} {o.colour} {o.shape} {o.where}"
                                           for o in scene.objects])
                             for scene, text in zip(scenes, predictions)][:vqa.NUM_SAMPLES]
        checks = [check_description(text, scene.objects)
                  for scene, text in zip(scenes, predictions, strict=True)]
        metrics = caption_metrics(checks)
        scored = [(text, refs) for text, refs in zip(predictions, references) if refs]
        if scored:
            metrics.update(scores_lib.caption_scores(*map(list, zip(*scored))))
        return self.metric_names(metrics)
