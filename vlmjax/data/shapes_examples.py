"""One vlm_shapes example from (seed, split, index); no TensorFlow, so worker processes stay light.

Every example is a pure function of its seed, split and index: builds are reproducible whatever the
number of worker processes, and the noisy config shares images and clean captions with 64px.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vlmjax.data import shapes_noise, shapes_render, shapes_scene, shapes_text

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2, "test_novel": 3}
CAPTIONS_PER_IMAGE = 3
ALL_COMBOS = shapes_scene.SEEN_COMBOS + shapes_scene.NOVEL_COMBOS


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """What a worker needs to make examples of one split (picklable)."""
    split: str
    image_size: int
    seed: int
    noise_fraction: float = 0.0  # only applied to the train split
    split_size: int = 0  # the split's number of examples: swapped captions come from them
    render: bool = True  # False: text only (for tokenizer training and filter studies)


def make_scene(spec: ExampleSpec, index: int) -> tuple[shapes_scene.Scene, np.random.Generator]:
    rng = np.random.default_rng([spec.seed, SPLIT_IDS[spec.split], index])
    if spec.split == "test_novel":  # single objects whose colour-shape pair never occurs in train
        scene = shapes_scene.sample_scene(rng, shapes_scene.NOVEL_COMBOS, num_objects=1)
    else:
        scene = shapes_scene.sample_scene(rng, shapes_scene.SEEN_COMBOS)
    return scene, rng


def make_example(spec: ExampleSpec, index: int) -> dict:
    scene, rng = make_scene(spec, index)
    captions = shapes_text.captions(scene, rng, CAPTIONS_PER_IMAGE)
    qas = shapes_text.questions(scene, rng, ALL_COMBOS)
    noise_kinds = ["clean"] * len(captions)
    if spec.noise_fraction > 0 and spec.split == "train":
        if spec.split_size < 2:
            raise ValueError(f"noise needs ExampleSpec.split_size >= 2 (swapped captions come "
                             f"from the split's other examples), got {spec.split_size}")
        # A separate stream: the clean content stays identical to the noise-free config.
        noise_rng = np.random.default_rng([spec.seed, SPLIT_IDS[spec.split], index, 1])
        captions, noise_kinds = shapes_noise.add_noise(
            captions, spec.noise_fraction, noise_rng,
            swapped_caption=lambda rng: swapped_caption(spec, index, scene, rng))
    example = {
        "id": f"{spec.split}_{index:07d}",
        "captions": captions,
        "caption_noise": noise_kinds,
        "label": scene.label,
        "objects": {
            "shape": [obj.shape for obj in scene.objects],
            "colour": [obj.colour for obj in scene.objects],
            "size": [obj.size for obj in scene.objects],
            "position": [obj.position for obj in scene.objects],
            "bbox_xyxy": np.array([obj.bbox_xyxy() for obj in scene.objects], np.float32),
        },
        "boxes_context": shapes_text.boxes_context(scene),
        "qa": {
            "question": [qa.question for qa in qas],
            "answer": [qa.answer for qa in qas],
            "type": [qa.qa_type for qa in qas],
            "cot_answer": [qa.cot_answer for qa in qas],
        },
    }
    if spec.render:
        example["image"] = shapes_render.encode_png(shapes_render.render(scene, spec.image_size))
    return example


def swapped_caption(spec: ExampleSpec, index: int, scene: shapes_scene.Scene,
                    rng: np.random.Generator) -> str:
    """A clean caption of another example of the split that names an object (colour + shape)
    `scene` lacks: true of that image, false of this one."""
    present = {(obj.colour, obj.shape) for obj in scene.objects}
    for _ in range(100):  # a random scene names an absent object with probability > 0.9
        other = int(rng.integers(spec.split_size - 1))
        other += other >= index  # uniform over the other examples
        other_scene, other_rng = make_scene(spec, other)
        if {(obj.colour, obj.shape) for obj in other_scene.objects} - present:
            # make_example's own first draws after the scene: exactly that image's captions
            other_captions = shapes_text.captions(other_scene, other_rng, CAPTIONS_PER_IMAGE)
            return other_captions[int(rng.integers(len(other_captions)))]
    raise RuntimeError(f"no example of {spec.split} names an object that {spec.split} "
                       f"example {index} lacks")


def make_keyed_example(args: tuple[ExampleSpec, int]) -> tuple[int, dict]:
    """Pool.imap entry point."""
    spec, index = args
    return index, make_example(spec, index)


def tokenizer_training_texts(example: dict) -> list[str]:
    """The clean texts of an example that the vlm_shapes SentencePiece model is trained on."""
    texts = [c for c, kind in zip(example["captions"], example["caption_noise"]) if kind == "clean"]
    texts += example["qa"]["question"] + example["qa"]["answer"] + example["qa"]["cot_answer"]
    return texts
