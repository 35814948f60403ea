"""shapes_cot: LLaVA-CoT questions answered right on hand-made scenes, four tags in order, wrong
judge candidates that are never the right text, and the judge's choice naming the right one."""
from __future__ import annotations

import re

import numpy as np
import pytest

from vlmjax.data import shapes_cot, shapes_instruct, shapes_scene
from vlmjax.data.shapes_instruct import ObjectFacts, SceneFacts
from vlmjax.data.shapes_text import COT_TAGS


def scene(*objects: str) -> SceneFacts:
    """scene("large red square left", "small blue triangle center", ...)."""
    return SceneFacts(image_id="x", background="plain gray", captions=("c",), objects=tuple(
        ObjectFacts(size=s, colour=c, shape=sh, position=p)
        for s, c, sh, p in (o.split() for o in objects)))


def asked(facts, question_type, seed=0):
    question = shapes_cot._QUESTIONS[question_type](facts, np.random.default_rng(seed))
    assert question is not None and question.question_type == question_type
    return question


def random_scenes(count=300, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        drawn = shapes_scene.sample_scene(rng, shapes_scene.SEEN_COMBOS)
        yield SceneFacts(image_id="r", background=None, captions=(), objects=tuple(
            ObjectFacts(o.colour, o.shape, o.size, o.position) for o in drawn.objects))


def test_answers_on_hand_made_scenes():
    facts = scene("large red square left", "small blue triangle center",
                  "small green star right")
    corner_sum = asked(facts, "corner_sum")
    pair = re.match(r"How many corners do the (\w+) shape and the (\w+) shape", corner_sum.question)
    corners = {"red": 4, "blue": 3, "green": 10}
    assert corner_sum.answer == str(corners[pair[1]] + corners[pair[2]])
    assert f"= {corner_sum.answer}." in corner_sum.reasoning
    assert asked(facts, "size_majority").answer == "no, there are more small ones, by 1"
    # the largest is on the left, and two shapes lie to its right: not posed
    assert shapes_cot._QUESTIONS["colour_beside_largest"](facts, np.random.default_rng(0)) is None
    middle = scene("small red square left", "large blue triangle center",
                   "small green star right")
    beside = asked(middle, "colour_beside_largest")
    assert beside.question == "What colour is the shape to the left of the largest one?"
    assert beside.answer == "red"
    two = scene("large red square left", "small blue triangle right")
    assert asked(two, "colour_beside_largest").answer == "blue"
    assert asked(two, "corner_compare", seed=1).answer in ("yes", "no")
    for seed in range(6):
        compare = asked(two, "corner_compare", seed)
        first = re.match(r"Does the (\w+) shape", compare.question)[1]
        assert compare.answer == ("yes" if first == "red" else "no")  # 4 > 3
    not_red = asked(facts, "corners_not_colour", seed=3)
    colour = re.match(r"How many shapes are not (\w+)", not_red.question)[1]
    others = [o for o in facts.objects if o.colour != colour]
    expected_total = sum(shapes_cot.CORNERS[o.shape] for o in others)
    assert not_red.answer == f"{len(others)} shapes, {expected_total} corners"


def test_questions_that_the_scene_cannot_pose_are_not_posed():
    lone = scene("large red square left")
    rng = np.random.default_rng(0)
    for question_type in ("corner_sum", "size_majority", "colour_beside_largest",
                          "corner_compare"):
        assert shapes_cot._QUESTIONS[question_type](lone, rng) is None
    same_colour = scene("large red square left", "small red star right")
    assert shapes_cot._QUESTIONS["corner_sum"](same_colour, rng) is None  # "the red shape"?
    # every scene gets a question, and every type occurs over random scenes
    types = {shapes_cot.reasoning_question(f, rng).question_type for f in random_scenes()}
    assert types == set(shapes_cot.QUESTION_TYPES)


def test_staged_answer_has_the_four_tags_in_order_and_the_answer_last():
    for facts in random_scenes(50):
        question = shapes_cot.reasoning_question(facts, np.random.default_rng(1))
        text = shapes_cot.staged_answer(question)
        tags = re.findall(r"<(/?)(\w+)>", text)
        assert tags == [(close, tag) for tag in COT_TAGS for close in ("", "/")]
        assert text.endswith(f"<CONCLUSION>{question.answer}</CONCLUSION>")


@pytest.mark.parametrize("stage", COT_TAGS)
def test_wrong_candidates_differ_and_the_judge_answer_names_the_right_one(stage):
    rng = np.random.default_rng(2)
    choices = []
    for facts in random_scenes(200, seed=3):
        question = shapes_cot.reasoning_question(facts, rng)
        right = question.stages()[stage]
        assert shapes_cot.wrong_stage(facts, question, stage, rng) != right
        prompt, answer, choice = shapes_cot.judge_example(facts, question, stage, rng)
        responses = re.search(r"Response 1: (.*)\nResponse 2: (.*)\n", prompt).groups()
        assert responses[choice - 1] == right and responses[2 - choice] != right
        assert answer.endswith(f"I choose response {choice}.") and answer.startswith("Since ")
        assert question.question in prompt
        # the hint shows exactly the stages before this one
        earlier = COT_TAGS[:COT_TAGS.index(stage)]
        assert all(f"<{tag}>" in prompt for tag in earlier)
        assert f"<{stage}>" not in prompt
        choices.append(choice)
    assert 0.35 < np.mean(np.array(choices) == 1) < 0.65  # the right text is not always first


def test_cot_kinds_are_llava_entries_and_not_exported_by_default():
    assert "cot" not in shapes_instruct.KINDS and "cot" in shapes_instruct.ALL_KINDS
    facts = scene("large red square left", "small blue triangle right")
    cot = shapes_instruct.make_entry(facts, "cot", seed=0)
    human, gpt = cot["conversations"]
    assert "<image>" in human["value"] and gpt["value"].startswith("<SUMMARY>")
    assert gpt["value"].endswith(f"<CONCLUSION>{cot['answers'][0]}</CONCLUSION>")
    judge = shapes_instruct.make_entry(facts, "cot_judge", seed=0)
    assert judge["conversations"][1]["value"].endswith(
        f"I choose response {judge['answers'][0]}.")
    assert judge["question_types"][0].startswith("judge_")
    assert shapes_instruct.make_entry(facts, "cot", seed=0) == cot  # deterministic
    with pytest.raises(ValueError, match="valid kinds: .*cot, cot_judge"):
        shapes_instruct.check_kinds("cot,reasoning")
