"""vlm_shapes text: captions, question-answer pairs, LLaVA-CoT answers and box context for a scene.

Everything is derived from the `Scene`, so the text is always true of the image. Captions vary in
template, word choice and which details they mention, so that exact duplicates across images are
rare (the ALIGN "shared by more than 10 images" filter must keep clean captions), and every clean
caption has 3 to 20 words (the ALIGN length filter must keep them too).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vlmjax.data.shapes_scene import Scene, SceneObject

MIN_CAPTION_WORDS, MAX_CAPTION_WORDS = 3, 20
NUMBER_WORDS = ("zero", "one", "two", "three")
QA_TYPES = ("colour", "shape", "count", "position", "existence", "comparison")
COT_TAGS = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disk"), "cross": ("cross", "plus sign"),
               "diamond": ("diamond", "rhombus")}
POSITION_PHRASES = {  # the first phrase of each is the canonical one used in CoT answers
    "left": ("on the left", "to the left", "on the left side", "at the left edge",
             "in the left half"),
    "right": ("on the right", "to the right", "on the right side", "at the right edge",
              "in the right half"),
    "top": ("at the top", "near the top", "in the upper part", "at the top of the image",
            "in the top half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part",
               "at the bottom of the image", "in the bottom half"),
    "center": ("in the center", "in the middle", "in the centre", "at the center of the image",
               "near the center"),
}
BACKGROUND_WORDS = {"noise": ("noisy", "grainy", "speckled"), "stripes": ("striped", "stripy"),
                    "checker": ("checkered", "checkerboard"), "gradient": ("shaded", "smooth")}
TONE_WORDS = {"gray": ("gray", "grey"), "beige": ("beige", "sandy"), "slate": ("slate", "dark"),
              "taupe": ("taupe", "brownish")}
PHOTO_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of",
                  "a rendering of", "a synthetic image with", "a simple scene with")


@dataclasses.dataclass(frozen=True)
class QuestionAnswer:
    question: str
    answer: str
    qa_type: str
    cot_answer: str


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _shape_word(obj: SceneObject, rng) -> str:
    return _pick(rng, SHAPE_WORDS.get(obj.shape, (obj.shape,)))


def _noun_phrase(obj: SceneObject, rng, determiner: str = "a", size_prob: float = 0.7) -> str:
    words = [obj.colour, _shape_word(obj, rng)]
    if rng.random() < size_prob:
        words.insert(0, _pick(rng, SIZE_WORDS[obj.size]))
    if determiner == "a":
        determiner = "one" if rng.random() < 0.1 else _article(words[0])
    return " ".join([determiner, *words])


def _join(phrases: list[str], rng) -> str:
    if len(phrases) == 1:
        return phrases[0]
    last_joiner = _pick(rng, (" and ", ", and ", " as well as "))
    return ", ".join(phrases[:-1]) + last_joiner + phrases[-1]


def _background_phrase(scene: Scene, rng) -> str:
    words = [_pick(rng, BACKGROUND_WORDS[scene.background_kind])]
    if rng.random() < 0.6:
        words.append(_pick(rng, TONE_WORDS[scene.background_tone]))
    return " ".join(words) + " background"


def _ordered(scene: Scene, rng) -> list[SceneObject]:
    return [scene.objects[i] for i in rng.permutation(len(scene.objects))]


def _with_positions(scene, rng, position_prob=1.0, determiner="a"):
    if len(scene.objects) == 1 and position_prob > 0:
        position_prob = 1.0  # a lone "a red circle" would be shared by hundreds of images
    phrases = []
    for obj in _ordered(scene, rng):
        phrase = _noun_phrase(obj, rng, determiner)
        if rng.random() < position_prob:
            phrase += " " + _pick(rng, POSITION_PHRASES[obj.position])
        phrases.append(phrase)
    return _join(phrases, rng)


def _caption_list(scene, rng):
    return _with_positions(scene, rng)


def _caption_there_is(scene, rng):
    n = len(scene.objects)
    if n > 1 and rng.random() < 0.5:
        return f"there are {NUMBER_WORDS[n]} shapes: " + _with_positions(scene, rng, 0.6)
    return "there is " + _with_positions(scene, rng, 0.8)


def _caption_photo_of(scene, rng):
    return _pick(rng, PHOTO_PREFIXES) + " " + _with_positions(scene, rng, 0.5)


def _caption_background(scene, rng):
    n = len(scene.objects)
    background = _background_phrase(scene, rng)
    if n > 1 and rng.random() < 0.5:
        return (f"{NUMBER_WORDS[n]} shapes on {_article(background)} {background}: "
                + _with_positions(scene, rng, 0.0))
    return _with_positions(scene, rng, 0.4) + f" on {_article(background)} {background}"


def _caption_the_is(scene, rng):
    clauses = []
    for obj in _ordered(scene, rng):
        verb = _pick(rng, ("is", "sits", "appears"))
        clauses.append(f"{_noun_phrase(obj, rng, 'the')} {verb} "
                       f"{_pick(rng, POSITION_PHRASES[obj.position])}")
    return _join(clauses, rng)


def _caption_compact(scene, rng):
    """Fallback that always fits the word limit: at most 3 x 3 words plus joiners."""
    return _with_positions(scene, rng, 0.0)


CAPTION_TEMPLATES = (_caption_list, _caption_there_is, _caption_photo_of, _caption_background,
                     _caption_the_is)


def word_count(text: str) -> int:
    return len(text.split())


def captions(scene: Scene, rng: np.random.Generator, count: int = 3) -> list[str]:
    """`count` distinct captions, each from a different template where possible."""
    result: list[str] = []
    templates = [CAPTION_TEMPLATES[i] for i in rng.permutation(len(CAPTION_TEMPLATES))]
    attempts = 0
    while len(result) < count:
        template = templates[attempts % len(templates)]
        attempts += 1
        caption = template(scene, rng)
        if not MIN_CAPTION_WORDS <= word_count(caption) <= MAX_CAPTION_WORDS:
            caption = _caption_compact(scene, rng)
        if caption not in result:
            result.append(caption)
    return result


def scene_description(scene: Scene) -> str:
    """One canonical sentence used as the CAPTION stage of the chain-of-thought answers."""
    objects = [f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position][0]}"
               for obj in scene.objects]
    listed = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    background = f"{BACKGROUND_WORDS[scene.background_kind][0]} {scene.background_tone}"
    return f"The image shows {listed} on a {background} background."


def boxes_context(scene: Scene) -> str:
    """LLaVA 'context type 2': one `name: [x0, y0, x1, y1]` line per object, normalised."""
    lines = []
    for obj in scene.objects:
        box = ", ".join(f"{v:.3f}" for v in obj.bbox_xyxy())
        lines.append(f"{obj.name}: [{box}]")
    return "\n".join(lines)


def _cot(summary: str, caption: str, reasoning: str, answer: str) -> str:
    parts = dict(zip(COT_TAGS, (summary, caption, reasoning, answer)))
    return "".join(f"<{tag}>{text}</{tag}>" for tag, text in parts.items())


def _names(objects) -> str:
    names = [f"the {obj.name}" for obj in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _where(obj: SceneObject) -> str:
    return POSITION_PHRASES[obj.position][0]


def _qa_colour(scene, rng):
    obj = _pick(rng, scene.objects)
    question = _pick(rng, (f"What colour is the {obj.shape} {_where(obj)}?",
                           f"What is the colour of the object {_where(obj)}?",
                           f"Which colour does the {obj.shape} {_where(obj)} have?"))
    reasoning = (f"The question is about the object {_where(obj)}. That object is "
                 f"a {obj.shape} and it is filled with {obj.colour}.")
    return question, obj.colour, "find the object the question refers to and read its colour", \
        reasoning


def _qa_shape(scene, rng):
    obj = _pick(rng, scene.objects)
    question = _pick(rng, (f"What shape is the {obj.colour} object {_where(obj)}?",
                           f"What is the shape of the object {_where(obj)}?",
                           f"Which shape can be seen {_where(obj)}?"))
    reasoning = (f"The object {_where(obj)} is {obj.colour}. Its outline is that of "
                 f"{_article(obj.shape)} {obj.shape}.")
    return question, obj.shape, "find the object the question refers to and name its shape", \
        reasoning


def _qa_count(scene, rng):
    if rng.random() < 0.5:
        question = _pick(rng, ("How many shapes are in the image?", "How many objects are there?",
                               "How many objects can you see?"))
        counted = list(scene.objects)
        reasoning = f"The objects in the image are {_names(counted)}."
    else:
        # sorted: set order follows str hashing, which differs between processes
        colour = _pick(rng, tuple(sorted({o.colour for o in scene.objects} | {"red", "blue"})))
        question = f"How many {colour} objects are there?"
        counted = [o for o in scene.objects if o.colour == colour]
        reasoning = (f"The {colour} objects are {_names(counted)}." if counted
                     else f"The objects are {_names(scene.objects)}; none of them is {colour}.")
    answer = NUMBER_WORDS[len(counted)]
    return question, answer, "count the objects that match the question", \
        f"{reasoning} That makes {answer}."


def _qa_position(scene, rng):
    obj = _pick(rng, scene.objects)
    question = _pick(rng, (f"Where is the {obj.name}?",
                           f"In which part of the image is the {obj.name}?",
                           f"Where can the {obj.name} be found?"))
    reasoning = f"The {obj.name} is located {_where(obj)} of the image."
    return question, obj.position, "locate the object the question refers to", reasoning


def _qa_existence(scene, rng, all_combos):
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = _pick(rng, sorted(present))
    else:
        absent = [combo for combo in all_combos if combo not in present]
        colour, shape = _pick(rng, absent)
    named = f"{_article(colour)} {colour} {shape}"
    question = _pick(rng, (f"Is there {named} in the image?", f"Does the image contain {named}?"))
    answer = "yes" if (colour, shape) in present else "no"
    listed = _names(scene.objects)
    reasoning = f"The objects are {listed}. " + (
        f"One of them is the {colour} {shape}." if answer == "yes" else f"None of them is {named}.")
    return question, answer, "check whether the named object appears in the image", reasoning


def _qa_comparison(scene, rng):
    first, second = (scene.objects[i] for i in rng.choice(len(scene.objects), 2, replace=False))
    sizes = f"The {first.name} is {first.size} and the {second.name} is {second.size}."
    if first.size == second.size:
        question = f"Are the {first.name} and the {second.name} the same size?"
        answer = "yes"
    elif rng.random() < 0.5:
        question = f"Which is larger, the {first.name} or the {second.name}?"
        answer = first.name if first.size == "large" else second.name
    else:
        question = f"Is the {first.name} larger than the {second.name}?"
        answer = "yes" if first.size == "large" else "no"
    return question, answer, "compare the sizes of the two named objects", sizes


def questions(scene: Scene, rng: np.random.Generator,
              all_combos: tuple[tuple[str, str], ...]) -> list[QuestionAnswer]:
    """One question of each type (comparison only when there are at least two objects)."""
    description = scene_description(scene)
    generators = {"colour": _qa_colour, "shape": _qa_shape, "count": _qa_count,
                  "position": _qa_position,
                  "existence": lambda s, r: _qa_existence(s, r, all_combos),
                  "comparison": _qa_comparison}
    result = []
    for qa_type in QA_TYPES:
        if qa_type == "comparison" and len(scene.objects) < 2:
            continue
        question, answer, plan, reasoning = generators[qa_type](scene, rng)
        summary = f"To answer, I will {plan}, then give a short answer."
        result.append(QuestionAnswer(question, answer, qa_type,
                                     _cot(summary, description, reasoning, answer)))
    return result
