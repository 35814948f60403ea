"""LLaVA-CoT data from vlm_shapes scenes: questions that need several steps, four-stage answers,
and judge pairs that teach the same model to pick the better of two texts for a stage.

    question = reasoning_question(facts, rng)     # a CotQuestion, true to the scene
    staged_answer(question)    # "<SUMMARY>..</SUMMARY><CAPTION>..</CAPTION>
                               #  <REASONING>..</REASONING><CONCLUSION>..</CONCLUSION>"
    judge_example(facts, question, stage, rng)  # (prompt, "Since ..., I choose response N.", N)

The questions (in the spirit of LLaVA-CoT's "how many corners do ... have together?"):

    corner_sum            How many corners do the red shape and the blue shape have together?
    size_majority         Are there more large shapes than small ones, and by how many?
    colour_beside_largest What colour is the shape to the left of the largest one?
    corner_compare        Does the red shape have more corners than the blue one?
    corners_not_colour    How many shapes are not red, and how many corners do they have in total?

Corners are the outline's convex and concave vertices as drawn (shapes_scene): circle 0,
triangle 3, square and diamond 4, hexagon 6, star 10, cross 12, heart 2 (the top cusp and the
bottom point). Each answer's CAPTION names every object the question needs, its REASONING
states the intermediate facts (each corner count, the sum), and its CONCLUSION is a short text
checked by exact match (numbers as digits, so sums stay single words).

The wrong candidates of the judge pairs are the mistakes a small VLM makes: a wrong plan, a
caption with a wrong colour or a missing object, a miscount or an arithmetic slip, a wrong final
answer. `facts` is shapes_instruct.SceneFacts (objects with colour, shape, size, position, name,
where).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vlmjax.data import shapes_scene
from vlmjax.data.shapes_text import COT_TAGS, _article, _pick

CORNERS = {"circle": 0, "square": 4, "triangle": 3, "star": 10, "hexagon": 6, "cross": 12,
           "diamond": 4, "heart": 2}
QUESTION_TYPES = ("corner_sum", "size_majority", "colour_beside_largest", "corner_compare",
                  "corners_not_colour")
STAGE_NAMES = {"SUMMARY": "summary", "CAPTION": "caption", "REASONING": "reasoning",
               "CONCLUSION": "conclusion"}
JUDGE_PROMPT = (
    "Now you act as a judge: which of the two texts below is the better {name} for answering "
    "the question? Question: {question}\n{hint}Response 1: {first}\nResponse 2: {second}\n"
    "Answer in the form \"Since [reason], I choose response [1/2].\"")


@dataclasses.dataclass(frozen=True)
class CotQuestion:
    question: str
    question_type: str
    summary: str
    caption: str
    reasoning: str
    answer: str
    objects: tuple  # the objects the question is about (for the wrong candidates)

    def stages(self) -> dict[str, str]:
        return dict(zip(COT_TAGS, (self.summary, self.caption, self.reasoning, self.answer)))


def staged_answer(question: CotQuestion) -> str:
    return staged_text(question.stages())


def staged_text(stages: dict[str, str]) -> str:
    """The four stages, {tag: text}, as one tagged answer."""
    return "".join(f"<{tag}>{stages[tag]}</{tag}>" for tag in COT_TAGS)


def _listed(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _described(objects) -> str:
    return _listed([f"a {o.size} {o.colour} {o.shape} {o.where}" for o in objects])


def _caption(objects) -> str:
    return f"The image shows {_described(objects)}."


def _corners(obj) -> str:
    count = CORNERS[obj.shape]
    return f"the {obj.colour} shape is {_article(obj.shape)} {obj.shape}, which has {count} " \
           f"corner{'s' if count != 1 else ''}"


def _uniquely_coloured(facts) -> list:
    colours = [o.colour for o in facts.objects]
    return [o for o in facts.objects if colours.count(o.colour) == 1]


def _plan(steps: str) -> str:
    return f"To answer, I will {steps}, then give the answer."


# --- the questions: each returns a CotQuestion, or None when the scene cannot pose it --------

def _corner_sum(facts, rng):
    named = _uniquely_coloured(facts)
    if len(named) < 2:
        return None
    first, second = (named[i] for i in rng.choice(len(named), 2, replace=False))
    total = CORNERS[first.shape] + CORNERS[second.shape]
    return CotQuestion(
        f"How many corners do the {first.colour} shape and the {second.colour} shape have "
        "together?", "corner_sum",
        _plan("find the two shapes by their colours, count the corners of each and add them"),
        _caption(facts.objects),
        f"{_corners(first).capitalize()}; {_corners(second)}. "
        f"{CORNERS[first.shape]} + {CORNERS[second.shape]} = {total}.",
        str(total), (first, second))


def _size_majority(facts, rng):
    if len(facts.objects) < 2:
        return None
    large = sum(o.size == "large" for o in facts.objects)
    small = len(facts.objects) - large
    counts = f"There {'is' if large == 1 else 'are'} {large} large and {small} small."
    if large > small:
        answer = f"yes, by {large - small}"
    elif large < small:
        answer = f"no, there are more small ones, by {small - large}"
    else:
        answer = "no, there are as many"
    return CotQuestion(
        "Are there more large shapes than small ones, and by how many?", "size_majority",
        _plan("find the size of every shape, count the large and the small ones and compare"),
        _caption(facts.objects),
        " ".join(f"The {o.name} is {o.size}." for o in facts.objects) + f" {counts}",
        answer, tuple(facts.objects))


def _x(obj) -> float:
    return shapes_scene.REGION_CENTRES[obj.position][0]


def _colour_beside_largest(facts, rng):
    large = [o for o in facts.objects if o.size == "large"]
    if len(large) != 1 or len(facts.objects) < 2:
        return None
    largest = large[0]
    for side, beside in (("left", lambda o: _x(o) < _x(largest)),
                         ("right", lambda o: _x(o) > _x(largest))):
        found = [o for o in facts.objects if beside(o)]
        if len(found) == 1:
            target = found[0]
            return CotQuestion(
                f"What colour is the shape to the {side} of the largest one?",
                "colour_beside_largest",
                _plan(f"find the largest shape, then the shape to its {side}, and read its "
                      "colour"),
                _caption(facts.objects),
                f"The largest shape is the {largest.name} {largest.where}. The shape to its "
                f"{side} is the {target.shape} {target.where}, and it is {target.colour}.",
                target.colour, (largest, target))
    return None


def _corner_compare(facts, rng):
    named = _uniquely_coloured(facts)
    if len(named) < 2:
        return None
    first, second = (named[i] for i in rng.choice(len(named), 2, replace=False))
    a, b = CORNERS[first.shape], CORNERS[second.shape]
    answer = "yes" if a > b else "no"
    relation = "more than" if a > b else ("as many as" if a == b else "fewer than")
    return CotQuestion(
        f"Does the {first.colour} shape have more corners than the {second.colour} one?",
        "corner_compare",
        _plan("find the two shapes by their colours, count the corners of each and compare"),
        _caption(facts.objects),
        f"{_corners(first).capitalize()}; {_corners(second)}. {a} is {relation} {b}.",
        answer, (first, second))


def _corners_not_colour(facts, rng):
    present = sorted({o.colour for o in facts.objects})
    absent = [c for c in shapes_scene.COLOUR_NAMES if c not in present]
    colour = _pick(rng, present if rng.random() < 0.5 else absent)  # absent: all shapes count
    others = [o for o in facts.objects if o.colour != colour]
    total = sum(CORNERS[o.shape] for o in others)
    if others:
        reasoning = (f"The shapes that are not {colour}: " + "; ".join(
            f"the {o.name} has {CORNERS[o.shape]}" for o in others)
            + f". {len(others)} shape{'s' if len(others) != 1 else ''}, "
            + " + ".join(str(CORNERS[o.shape]) for o in others) + f" = {total} corners.")
    else:
        reasoning = f"Every shape is {colour}, so there are 0 shapes and 0 corners."
    return CotQuestion(
        f"How many shapes are not {colour}, and how many corners do they have in total?",
        "corners_not_colour",
        _plan(f"find the shapes that are not {colour}, count them and add up their corners"),
        _caption(facts.objects), reasoning, f"{len(others)} shapes, {total} corners",
        tuple(others) or tuple(facts.objects))


_QUESTIONS = {"corner_sum": _corner_sum, "size_majority": _size_majority,
              "colour_beside_largest": _colour_beside_largest,
              "corner_compare": _corner_compare, "corners_not_colour": _corners_not_colour}


def reasoning_question(facts, rng: np.random.Generator) -> CotQuestion:
    """A question the scene can pose, of a type drawn at random (corners_not_colour always
    applies)."""
    for index in rng.permutation(len(QUESTION_TYPES)):
        posed = _QUESTIONS[QUESTION_TYPES[index]](facts, rng)
        if posed is not None:
            return posed
    raise AssertionError("corners_not_colour applies to every scene")


# --- judge pairs -----------------------------------------------------------------------------

def _other(rng, options, not_this):
    return _pick(rng, [o for o in options if o != not_this])


def _altered_object(obj, rng, field: str):
    options = {"colour": shapes_scene.COLOUR_NAMES, "shape": shapes_scene.SHAPES,
               "size": shapes_scene.SIZES}[field]
    return dataclasses.replace(obj, **{field: _other(rng, options, getattr(obj, field))})


def _slipped_number(text: str, rng) -> str | None:
    """`text` with its last number off by one or two (an arithmetic slip or a miscount); None
    when it holds no number."""
    words = text.split(" ")
    for i in range(len(words) - 1, -1, -1):
        digits = words[i].rstrip(".,;")
        if digits.isdigit():
            number, delta = int(digits), int(_pick(rng, (-2, -1, 1, 2)))
            wrong = number + delta if number + delta >= 0 else number + abs(delta)
            words[i] = str(wrong) + words[i][len(digits):]
            return " ".join(words)
    return None


def wrong_stage(facts, question: CotQuestion, stage: str, rng) -> str:
    """A plausible but wrong text for `stage` of `question` (never equal to the right one)."""
    right = question.stages()[stage]
    if stage == "SUMMARY":
        other = _pick(rng, [t for t in QUESTION_TYPES if t != question.question_type])
        wrong = {"corner_sum": "count the shapes in the image",
                 "size_majority": "name the colour of the largest shape",
                 "colour_beside_largest": "count the corners of every shape",
                 "corner_compare": "compare the sizes of the shapes",
                 "corners_not_colour": "find the shape on the left"}[other]
        return _plan(wrong)
    if stage == "CAPTION":
        objects = list(facts.objects)
        if len(objects) > 1 and rng.random() < 0.3:  # an object missed
            objects.pop(int(rng.integers(len(objects))))
        else:  # an object's colour, shape or size misread
            index = int(rng.integers(len(objects)))
            objects[index] = _altered_object(objects[index], rng,
                                             _pick(rng, ("colour", "shape", "size")))
        return _caption(objects)
    if stage == "REASONING":
        slipped = _slipped_number(right, rng)
        if slipped is not None:
            return slipped
        target = question.objects[-1]
        return right.replace(target.colour, _other(rng, shapes_scene.COLOUR_NAMES,
                                                   target.colour))
    # CONCLUSION
    slipped = _slipped_number(right, rng)
    if slipped is not None:
        return slipped
    if right in ("yes", "no"):
        return "no" if right == "yes" else "yes"
    if right in shapes_scene.COLOUR_NAMES:
        return _other(rng, shapes_scene.COLOUR_NAMES, right)
    return _pick(rng, [a for a in ("yes, by 1", "yes, by 2", "no, there are as many",
                                   "no, there are more small ones, by 1") if a != right])


def judge_prompt(question: str, stage_name: str, earlier: str, first: str,
                 second: str) -> str:
    """The judge prompt: the question, the earlier stages (tagged, "" for none) as a hint, two
    texts for the stage called `stage_name` ("summary", ...). vlmjax.inference.cot asks with
    the same words."""
    hint = f"Hint (the earlier stages): {earlier}\n" if earlier else ""
    return JUDGE_PROMPT.format(name=stage_name, question=question, hint=hint, first=first,
                               second=second)


def earlier_stages(question: CotQuestion, stage: str) -> str:
    """The tagged stages of `question` before `stage`."""
    stages = list(question.stages().items())
    return "".join(f"<{tag}>{text}</{tag}>" for tag, text in stages[:COT_TAGS.index(stage)])


JUDGE_REASONS = {"SUMMARY": "its plan asks for what the question needs",
                 "CAPTION": "it describes the shapes in the image correctly",
                 "REASONING": "its steps state the right facts and the right arithmetic",
                 "CONCLUSION": "its answer follows from the reasoning"}


def judge_answer(stage: str, choice: int) -> str:
    return f"Since {JUDGE_REASONS[stage]}, I choose response {choice}."


def judge_pair(facts, question: CotQuestion, stage: str, rng) -> tuple[str, str, int]:
    """(the stage's right text, a plausibly wrong one, the response number the right text
    gets: 1 or 2 at random)."""
    right, wrong = question.stages()[stage], wrong_stage(facts, question, stage, rng)
    return right, wrong, 1 + int(rng.integers(2))


def pair_prompt(question: CotQuestion, stage: str, right: str, wrong: str, choice: int) -> str:
    """The judge prompt of a pair, the right text as response `choice`."""
    first, second = (right, wrong) if choice == 1 else (wrong, right)
    return judge_prompt(question.question, STAGE_NAMES[stage], earlier_stages(question, stage),
                        first, second)


def judge_example(facts, question: CotQuestion, stage: str, rng) -> tuple[str, str, int]:
    """(judge prompt, its answer, the number of the right response) for one stage: the right
    text and a wrong one, in a random order."""
    right, wrong, choice = judge_pair(facts, question, stage, rng)
    return pair_prompt(question, stage, right, wrong, choice), judge_answer(stage, choice), choice


# --- LLaVA JSON entries (shapes_instruct kinds "cot" and "cot_judge") ------------------------

def cot_entry(facts, rng) -> dict:
    """A reasoning question -> its four-stage answer; `answers` holds the CONCLUSION."""
    question = reasoning_question(facts, rng)
    return {"question": question.question, "response": staged_answer(question),
            "answers": [question.answer], "question_types": [question.question_type]}


def judge_entry(facts, rng) -> dict:
    """A judge prompt for one stage (drawn at random) -> "Since ..., I choose response N.";
    `answers` holds N."""
    question = reasoning_question(facts, rng)
    stage = _pick(rng, COT_TAGS)
    prompt, answer, choice = judge_example(facts, question, stage, rng)
    return {"question": prompt, "response": answer, "answers": [str(choice)],
            "question_types": [f"judge_{STAGE_NAMES[stage]}"]}
