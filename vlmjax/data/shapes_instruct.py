"""LLaVA-style instruction data made from vlm_shapes examples, true to each scene.

LLaVA trains in two stages on two kinds of data: stage 1 on image-caption pairs turned into a
one-turn chat ("describe the image briefly" -> caption), stage 2 on GPT-written instructions of
three response types (conversation, detailed description, complex reasoning). Here the same four
kinds are written from what a vlm_shapes example records, so every answer is true of its image:

    caption               a brief-description instruction -> one clean caption of the image
    conversation          2 to 4 question-answer turns on colours, shapes, counts, positions,
                          existence and sizes
    detailed_description  one "describe in detail" question -> a paragraph naming every object's
                          size, colour, shape and position, and the background
    complex_reasoning     one question that combines facts (sizes, relative positions, counts of
                          a colour, ...) -> a few reasoned sentences ending in the fact
    vqa                   one of the dataset's own questions, followed by LLaVA-1.5's
                          SHORT_ANSWER_INSTRUCTION, answered with the short answer (LLaVA-1.5
                          mixes VQAv2/GQA in this form so that the model answers VQA tersely)
    cot, cot_judge        LLaVA-CoT (shapes_cot, not in the default KINDS): a question that needs
                          several steps -> its <SUMMARY><CAPTION><REASONING><CONCLUSION> answer;
                          a judge prompt for one stage -> "Since ..., I choose response N."

    facts = scene_facts(example)                  # a decoded vlm_shapes TFDS example
    entries = make_entries(example, KINDS, seed=0)

An entry is LLaVA JSON (`id`, `image`, `conversations`, `<image>` in the first human turn) plus
keys for evaluators: `type` (the kind), `objects` ([{colour, shape, size, position}]) and
`background` (e.g. "striped taupe") of the scene; `captions` (the clean reference captions) for
captions; `answers` (the short fact of each assistant turn: "red", "three", "yes", "left", ...)
and `question_types` (which fact each turn asks for) for conversation, complex_reasoning and
vqa.
Entries are a pure function of (example id, kind, seed).
"""
from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from vlmjax.data import shapes_cot, shapes_noise, shapes_scene, shapes_text
from vlmjax.data.shapes_text import BACKGROUND_WORDS, NUMBER_WORDS, POSITION_PHRASES

KINDS = ("caption", "conversation", "detailed_description", "complex_reasoning", "vqa")
# LLaVA-CoT's kinds (shapes_cot): exported when asked for (`--kinds cot,cot_judge`).
COT_KINDS = ("cot", "cot_judge")
ALL_KINDS = KINDS + COT_KINDS
# LLaVA-1.5's prompt for short-answer VQA data (VQAv2, GQA); the vqa evaluator appends the same.
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
IMAGE_TOKEN = "<image>"
ALL_COMBOS = tuple((c, s) for c in shapes_scene.COLOUR_NAMES for s in shapes_scene.SHAPES)

BRIEF_INSTRUCTIONS = (
    "Describe the image briefly.", "Give a short description of the image.",
    "Write a one-line caption for this picture.", "Summarize what the image shows.",
    "What does this image show, in a few words?", "Provide a concise caption of the image.",
)
DETAIL_INSTRUCTIONS = (
    "Describe the image in detail.", "Give a detailed description of this image.",
    "What is in this picture? Describe every object you see.",
    "Describe the contents of the image thoroughly.",
    "Explain the visual content of the image in detail.",
    "Write a detailed account of everything shown in the image.",
)
# The CAPTION stage of vlm_shapes' CoT answers ends "... on a <pattern> <tone> background.": the
# only feature that records the background (shapes_text.scene_description writes it).
_BACKGROUND_PATTERN = re.compile(r"on an? (\w+) (\w+) background\.</CAPTION>")


@dataclasses.dataclass(frozen=True)
class ObjectFacts:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def where(self) -> str:
        """The canonical position phrase ("on the left", "in the center", ...)."""
        return POSITION_PHRASES[self.position][0]


@dataclasses.dataclass(frozen=True)
class SceneFacts:
    image_id: str
    objects: tuple[ObjectFacts, ...]
    background: str | None  # "<pattern> <tone>", None when the example does not record it
    captions: tuple[str, ...]  # the clean captions (noisy configs replace some with junk)
    qa: tuple[tuple[str, str, str], ...] = ()  # the dataset's (question, short answer, type)

    def to_json(self) -> dict:
        return {"objects": [dataclasses.asdict(obj) for obj in self.objects],
                "background": self.background}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _name(value, names: tuple[str, ...]) -> str:
    """A ClassLabel feature as its name: TFDS decodes to ints, raw examples hold the name."""
    if isinstance(value, (str, bytes)):
        return _text(value)
    return names[int(value)]


def _background(cot_answers) -> str | None:
    known_patterns = {words[0] for words in BACKGROUND_WORDS.values()}
    for cot in cot_answers:
        match = _BACKGROUND_PATTERN.search(_text(cot))
        if match and match[1] in known_patterns and match[2] in shapes_scene.BACKGROUND_TONES:
            return f"{match[1]} {match[2]}"
    return None


def scene_facts(example: dict) -> SceneFacts:
    """The facts of one vlm_shapes example (decoded TFDS features, or shapes_examples' dict)."""
    objects = example["objects"]
    facts = tuple(
        ObjectFacts(colour=_name(colour, shapes_scene.COLOUR_NAMES),
                    shape=_name(shape, shapes_scene.SHAPES),
                    size=_name(size, shapes_scene.SIZES),
                    position=_name(position, shapes_scene.POSITIONS))
        for colour, shape, size, position in zip(objects["colour"], objects["shape"],
                                                 objects["size"], objects["position"],
                                                 strict=True))
    noise = example.get("caption_noise", ["clean"] * len(example["captions"]))
    captions = tuple(_text(c) for c, kind in zip(example["captions"], noise, strict=True)
                     if _name(kind, shapes_noise.NOISE_KINDS) == "clean")
    pairs = example["qa"]  # an evaluator may read only some of its fields
    qa = tuple((_text(q), _text(a), _name(t, shapes_text.QA_TYPES)) for q, a, t in zip(
        pairs.get("question", ()), pairs.get("answer", ()), pairs.get("type", ()), strict=True))
    return SceneFacts(image_id=_text(example["id"]), objects=facts,
                      background=_background(example["qa"]["cot_answer"]), captions=captions,
                      qa=qa)


# --- small text helpers ----------------------------------------------------------------------

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def _counted(count: int, noun: str) -> str:
    """A count and its noun: "no shapes", "one shape", "three shapes"."""
    if count == 0:
        return f"no {noun}s"
    return f"{NUMBER_WORDS[count]} {noun}" + ("s" if count > 1 else "")


def _a(word: str) -> str:
    """The indefinite article and the word: "a red circle", "an orange star"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _listed(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _the_names(objects) -> str:
    return _listed([f"the {obj.name} {obj.where}" for obj in objects])


def _two_objects(facts: SceneFacts, rng) -> tuple[ObjectFacts, ObjectFacts]:
    first, second = rng.choice(len(facts.objects), 2, replace=False)
    return facts.objects[first], facts.objects[second]


def _some_colour(facts: SceneFacts, rng) -> str:
    """A colour of the scene, or (one time in three) one it lacks, so zero counts occur too."""
    present = sorted({obj.colour for obj in facts.objects})
    absent = [c for c in shapes_scene.COLOUR_NAMES if c not in present]
    return _pick(rng, absent if rng.random() < 1 / 3 else present)


def _some_combo(facts: SceneFacts, rng) -> tuple[str, str]:
    """A (colour, shape) of the scene, or half the time one it lacks."""
    present = sorted({(obj.colour, obj.shape) for obj in facts.objects})
    if rng.random() < 0.5:
        return _pick(rng, present)
    return _pick(rng, [combo for combo in ALL_COMBOS if combo not in present])


# --- conversation: one question a turn -------------------------------------------------------
# Each returns (question, answer sentence, short answer, question type). Objects are named by
# position or by colour + shape: both are unique within a scene.

def _ask_colour(facts, rng):
    obj = _pick(rng, facts.objects)
    question = _pick(rng, (f"What colour is the {obj.shape} {obj.where}?",
                           f"What is the colour of the shape {obj.where}?"))
    return question, f"The {obj.shape} {obj.where} is {obj.colour}.", obj.colour, "colour"


def _ask_shape(facts, rng):
    obj = _pick(rng, facts.objects)
    question = _pick(rng, (f"What shape is {obj.where}?",
                           f"Which shape is the {obj.colour} object {obj.where}?"))
    return question, f"It is {_a(obj.size)} {obj.colour} {obj.shape}.", obj.shape, "shape"


def _ask_count(facts, rng):
    count = len(facts.objects)
    question = _pick(rng, ("How many shapes are there in the image?",
                           "How many objects can you see?"))
    verb = "is" if count == 1 else "are"
    return question, f"There {verb} {_counted(count, 'shape')} in the image.", \
        NUMBER_WORDS[count], "count"


def _ask_colour_count(facts, rng):
    colour = _some_colour(facts, rng)
    count = sum(obj.colour == colour for obj in facts.objects)
    verb = "is" if count == 1 else "are"
    return f"How many {colour} shapes are there?", \
        f"There {verb} {_counted(count, colour + ' shape')} in the image.", \
        NUMBER_WORDS[count], "colour_count"


def _ask_position(facts, rng):
    obj = _pick(rng, facts.objects)
    question = _pick(rng, (f"Where is the {obj.name}?",
                           f"In which part of the image is the {obj.name}?"))
    return question, f"The {obj.name} is {obj.where}.", obj.position, "position"


def _ask_existence(facts, rng):
    colour, shape = _some_combo(facts, rng)
    question = _pick(rng, (f"Is there {_a(colour)} {shape} in the image?",
                           f"Can you see {_a(colour)} {shape}?"))
    found = [obj for obj in facts.objects if (obj.colour, obj.shape) == (colour, shape)]
    if found:
        return question, f"Yes, there is a {found[0].size} {colour} {shape} {found[0].where}.", \
            "yes", "existence"
    return question, f"No, there is no {colour} {shape} in the image.", "no", "existence"


def _ask_size(facts, rng):
    obj = _pick(rng, facts.objects)
    question = _pick(rng, (f"Is the {obj.name} large or small?",
                           f"How big is the {obj.name}?"))
    return question, f"The {obj.name} is {obj.size}.", obj.size, "size"


CONVERSATION_QUESTIONS = (_ask_colour, _ask_shape, _ask_count, _ask_colour_count, _ask_position,
                          _ask_existence, _ask_size)


# --- complex reasoning: one question that combines facts -------------------------------------
# Each returns (question, reasoned answer ending in the fact, short answer, question type), or
# None when the scene cannot pose it (e.g. comparisons need two objects).

def _reason_larger(facts, rng):
    if len(facts.objects) < 2:
        return None
    first, second = _two_objects(facts, rng)
    question = f"Which is larger, the {first.name} or the {second.name}?"
    reasons = (f"The {first.name} {first.where} is {first.size}, and the {second.name} "
               f"{second.where} is {second.size}.")
    if first.size == second.size:
        return question, f"{reasons} So the two are the same size.", "same size", "larger"
    larger = first if first.size == "large" else second
    return question, f"{reasons} So the {larger.name} is larger.", larger.name, "larger"


def _relation(first: ObjectFacts, second: ObjectFacts, axis: int) -> str:
    """Where `first` lies from `second` along x (0) or y (1), by their regions' centres (the
    jitter of an object's centre is far smaller than the spacing of regions)."""
    a = shapes_scene.REGION_CENTRES[first.position][axis]
    b = shapes_scene.REGION_CENTRES[second.position][axis]
    return ("left" if a < b else "right") if axis == 0 else ("above" if a < b else "below")


def _reason_relative_position(facts, rng):
    if len(facts.objects) < 2:
        return None
    first, second = _two_objects(facts, rng)
    axes = [axis for axis in (0, 1) if shapes_scene.REGION_CENTRES[first.position][axis]
            != shapes_scene.REGION_CENTRES[second.position][axis]]  # distinct regions: >= 1
    axis = _pick(rng, axes)
    relation = _relation(first, second, axis)
    if axis == 0:
        question = f"Is the {first.name} to the left or to the right of the {second.name}?"
        fact = f"the {first.name} is to the {relation} of the {second.name}"
    else:
        question = f"Is the {first.name} above or below the {second.name}?"
        fact = f"the {first.name} is {relation} the {second.name}"
    answer = (f"The {first.name} is {first.where} of the image and the {second.name} is "
              f"{second.where}. So {fact}.")
    return question, answer, relation, "relative_position"


def _reason_colour_count(facts, rng):
    colour = _some_colour(facts, rng)
    matching = [obj for obj in facts.objects if obj.colour == colour]
    question = f"How many {colour} shapes are in the image, and which are they?"
    answer = f"The image holds {_the_names(facts.objects)}. "
    if matching:
        answer += f"Of these, {_the_names(matching)} {'is' if len(matching) == 1 else 'are'} " \
                  f"{colour}. "
    else:
        answer += f"None of them is {colour}. "
    answer += f"So there {'is' if len(matching) == 1 else 'are'} " \
              f"{_counted(len(matching), colour + ' shape')}."
    return question, answer, NUMBER_WORDS[len(matching)], "colour_count"


def _reason_removal(facts, rng):
    removed = _pick(rng, facts.objects)
    left = [obj for obj in facts.objects if obj is not removed]
    question = f"If the {removed.name} were taken away, how many shapes would be left?"
    answer = f"The image has {_counted(len(facts.objects), 'shape')}: " \
             f"{_the_names(facts.objects)}. "
    answer += (f"Taking away the {removed.name} leaves {_the_names(left)}. " if left
               else f"The {removed.name} is the only one. ")
    answer += f"So {_counted(len(left), 'shape')} would be left."
    return question, answer, NUMBER_WORDS[len(left)], "removal"


def _reason_all_same(facts, rng):
    if len(facts.objects) < 2:
        return None
    attribute = _pick(rng, ("colour", "shape"))
    values = [getattr(obj, attribute) for obj in facts.objects]
    question = f"Do all the shapes in the image have the same {attribute}?"
    listed = _listed([f"the one {obj.where} is {getattr(obj, attribute)}"
                      for obj in facts.objects])
    same = len(set(values)) == 1
    answer = f"Looking at each shape's {attribute}: {listed}. " + (
        f"So yes, they all have the same {attribute}." if same
        else f"So no, they do not all have the same {attribute}.")
    return question, answer, "yes" if same else "no", "all_same"


def _reason_largest_colour(facts, rng):
    large = [obj for obj in facts.objects if obj.size == "large"]
    if len(facts.objects) < 2 or len(large) != 1:  # only a unique largest shape has an answer
        return None
    biggest = large[0]
    others = [obj for obj in facts.objects if obj is not biggest]
    question = "What colour is the largest shape in the image?"
    answer = (f"The {biggest.shape} {biggest.where} is large, while {_the_names(others)} "
              f"{'is' if len(others) == 1 else 'are'} small. So the largest shape is "
              f"{biggest.colour}.")
    return question, answer, biggest.colour, "largest_colour"


def _reason_existence(facts, rng):
    colour, shape = _some_combo(facts, rng)
    question = f"Is there {_a(colour)} {shape} in the image? If so, where is it?"
    found = [obj for obj in facts.objects if (obj.colour, obj.shape) == (colour, shape)]
    answer = f"The image holds {_the_names(facts.objects)}. "
    if found:
        return question, answer + f"So yes, the {colour} {shape} is {found[0].where}.", \
            "yes", "existence"
    return question, answer + f"None of them is {_a(colour)} {shape}. So no, there is none.", \
        "no", "existence"


REASONING_QUESTIONS = (_reason_larger, _reason_relative_position, _reason_colour_count,
                       _reason_removal, _reason_all_same, _reason_largest_colour,
                       _reason_existence)


# --- the four kinds --------------------------------------------------------------------------

def _human(text: str, rng, with_image: bool) -> dict:
    """A human turn; the first carries <image> before or after the text, as LLaVA's data does."""
    if with_image:
        text = f"{IMAGE_TOKEN}\n{text}" if rng.random() < 0.5 else f"{text}\n{IMAGE_TOKEN}"
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _caption(facts: SceneFacts, rng) -> dict | None:
    if not facts.captions:  # a noisy config may have replaced every caption with junk
        return None
    caption = _pick(rng, facts.captions)
    return {"conversations": [_human(_pick(rng, BRIEF_INSTRUCTIONS), rng, True), _gpt(caption)],
            "captions": list(facts.captions)}


def _conversation(facts: SceneFacts, rng) -> dict:
    num_turns = int(rng.integers(2, 5))
    askers = [CONVERSATION_QUESTIONS[i]
              for i in rng.permutation(len(CONVERSATION_QUESTIONS))[:num_turns]]
    turns, answers, types = [], [], []
    for turn, ask in enumerate(askers):
        question, sentence, short, question_type = ask(facts, rng)
        turns += [_human(question, rng, with_image=turn == 0), _gpt(sentence)]
        answers.append(short)
        types.append(question_type)
    return {"conversations": turns, "answers": answers, "question_types": types}


def description_paragraph(facts: SceneFacts, rng) -> str:
    """A paragraph that names every object's size, colour, shape and position, and the
    background, in canonical words (so an evaluator can match them)."""
    background = f"a {facts.background}" if facts.background else "a textured"
    count = len(facts.objects)
    sentences = [f"The image shows {_counted(count, 'shape')} on {background} background."]
    for index in rng.permutation(count):
        obj = facts.objects[index]
        described = f"{obj.size} {obj.colour} {obj.shape}"
        sentences.append(_pick(rng, (f"{_capitalised(obj.where)}, there is a {described}.",
                                     f"A {described} sits {obj.where}.",
                                     f"{_capitalised(obj.where)} is a {described}.")))
    sizes = {obj.size for obj in facts.objects}
    if count == 1:
        sentences.append("It is the only object in the image.")
    elif len(sizes) == 1:
        sentences.append(f"All {NUMBER_WORDS[count]} shapes are {sizes.pop()}, and they do not "
                         "overlap.")
    else:
        large = [f"the {o.name}" for o in facts.objects if o.size == "large"]
        small = [f"the {o.name}" for o in facts.objects if o.size == "small"]
        sentences.append(f"{_capitalised(_listed(large))} {'is' if len(large) == 1 else 'are'} "
                         f"larger than {_listed(small)}, and the shapes do not overlap.")
    return " ".join(sentences)


def _detailed_description(facts: SceneFacts, rng) -> dict:
    question = _pick(rng, DETAIL_INSTRUCTIONS)
    return {"conversations": [_human(question, rng, True),
                              _gpt(description_paragraph(facts, rng))]}


def _complex_reasoning(facts: SceneFacts, rng) -> dict:
    # Try the question kinds in a random order; the first one the scene can pose is asked.
    for index in rng.permutation(len(REASONING_QUESTIONS)):
        posed = REASONING_QUESTIONS[index](facts, rng)
        if posed is not None:
            break
    question, answer, short, question_type = posed  # removal and existence always apply
    return {"conversations": [_human(question, rng, True), _gpt(answer)],
            "answers": [short], "question_types": [question_type]}


def _short_answer_vqa(facts: SceneFacts, rng) -> dict:
    """One of the image's dataset questions, picked at random, with LLaVA-1.5's short-answer
    instruction, answered with the dataset's short answer. One question per entry, not all of
    them as turns of one chat: a later question names what an earlier one asks ("What shape is
    the red object?" after "What colour is the circle?"), so a model trained on such chats learns
    to copy answers from the context, and then guesses when asked a single question."""
    question, answer, question_type = facts.qa[int(rng.integers(len(facts.qa)))]
    return {"conversations": [_human(f"{question}\n{SHORT_ANSWER_INSTRUCTION}", rng, True),
                              _gpt(answer)],
            "answers": [answer], "question_types": [question_type]}


def _cot_maker(make):
    def maker(facts: SceneFacts, rng) -> dict:
        made = make(facts, rng)
        return {"conversations": [_human(made.pop("question"), rng, True),
                                  _gpt(made.pop("response"))], **made}
    return maker


_MAKERS = {"caption": _caption, "conversation": _conversation,
           "detailed_description": _detailed_description,
           "complex_reasoning": _complex_reasoning, "vqa": _short_answer_vqa,
           "cot": _cot_maker(shapes_cot.cot_entry),
           "cot_judge": _cot_maker(shapes_cot.judge_entry)}


def check_kinds(kinds) -> tuple[str, ...]:
    """`kinds` (a sequence or a comma-separated string) as a tuple without repeats; an unknown
    or empty one is an error naming the valid kinds."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise ValueError(f"instruction kind(s) {unknown or list(kinds)} not valid; valid kinds: "
                         f"{', '.join(ALL_KINDS)}")
    return tuple(dict.fromkeys(kinds))


def image_filename(image_id: str) -> str:
    return f"{image_id}.png"


def make_entry(facts: SceneFacts, kind: str, seed: int = 0) -> dict | None:
    """One LLaVA JSON entry of `kind` for an image, or None when the example cannot give one
    (a caption entry for an image whose captions are all noise)."""
    check_kinds([kind])
    # crc32, not hash(): str hashing is salted per process, and entries must not depend on it.
    rng = np.random.default_rng([seed, ALL_KINDS.index(kind),
                                 zlib.crc32(facts.image_id.encode())])
    made = _MAKERS[kind](facts, rng)
    if made is None:
        return None
    return {"id": f"{facts.image_id}_{kind}", "image": image_filename(facts.image_id),
            "type": kind, **made, **facts.to_json()}


def make_entries(example: dict, kinds=KINDS, seed: int = 0) -> list[dict]:
    """The entries of `kinds` for one vlm_shapes example (see the module docstring)."""
    facts = scene_facts(example)
    entries = (make_entry(facts, kind, seed) for kind in check_kinds(kinds))
    return [entry for entry in entries if entry is not None]
