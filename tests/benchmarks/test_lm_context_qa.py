"""benchmarks/lm_context_qa.py: its prompt is the lm task's scene document up to an answer (the
layout the LM trained on), and the answer is cut at the
next question."""
import os
import sys

import numpy as np
import tensorflow as tf

from tests.benchmarks.test_quick import REPO
from vlmjax.data import ops_lm, shapes_text

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import lm_context_qa as bench  # noqa: E402

EXAMPLE = {"captions": [b"a red star on the left", b"a star"],
           "qa": {"question": [b"What colour is the star on the left?", b"How many objects?"],
                  "answer": [b"red", b"one"],
                  "type": np.array([shapes_text.QA_TYPES.index("colour"),
                                    shapes_text.QA_TYPES.index("count")])}}


def test_prompts_are_the_scene_document_up_to_each_answer():
    items = bench.prompts_of([EXAMPLE])
    assert [(a, t) for _, a, t in items] == [("red", "colour"), ("one", "count")]
    record = {"texts": tf.constant(["a red star on the left", "a star"]),
              "questions": tf.constant([q.decode() for q in EXAMPLE["qa"]["question"]]),
              "answers": tf.constant(["red", "one"])}
    document = ops_lm.scene_documents()(record)["documents"].numpy()[-1].decode()
    for prompt, answer, _ in items:  # each prompt + its answer: a prefix of the document
        assert document.startswith(prompt + " " + answer)
    assert items[1][0].startswith(items[0][0] + " red Q: ")


def test_answer_is_cut_at_the_next_question_and_scored_per_type():
    assert bench.answer_of(" red Q: What") == "red"
    assert bench.answer_of(" two objects") == "two objects"
    scores = bench.score(["Red", "two"], ["red", "one"], ["colour", "count"])
    assert scores == {"overall": 0.5, "colour": 1.0, "count": 0.0}


def test_description_context_is_the_cot_caption_stage():
    example = {**EXAMPLE, "qa": {**EXAMPLE["qa"], "cot_answer": [
        b"<SUMMARY>s</SUMMARY><CAPTION>The image shows a small red star on the left.</CAPTION>"
        b"<REASONING>r</REASONING><CONCLUSION>red</CONCLUSION>"] * 2}}
    prompt = bench.prompts_of([example], "description")[0][0]
    assert prompt == ("The image shows a small red star on the left. Q: What colour is the star "
                      "on the left? A:")
