"""The cot evaluator against a stub answerer whose right and wrong replies are known: accuracy
per question type from the CONCLUSION stage, format validity, judge accuracy; and parse_stages."""
import numpy as np
import pytest

from tests.evals.test_vqa import StubAnswerer, evaluator, shapes_data  # noqa: F401 (fixture)
from vlmjax.data import shapes_cot
from vlmjax.evals import cot as cot_eval
from vlmjax.inference import cot


def test_parse_stages_reads_closed_stages_in_order():
    text = "<SUMMARY>plan</SUMMARY> <CAPTION>a red star</CAPTION><REASONING>4 + 3 = 7.</REASONING>"
    assert cot.parse_stages(text + "<CONCLUSION> 7 </CONCLUSION>") == {
        "SUMMARY": "plan", "CAPTION": "a red star", "REASONING": "4 + 3 = 7.",
        "CONCLUSION": "7"}
    assert cot.conclusion(text + "<CONCLUSION>7") == ""  # never closed
    assert list(cot.parse_stages("<CAPTION>x</CAPTION><SUMMARY>y</SUMMARY>")) == []  # order
    assert cot.conclusion("<CONCLUSION>yes</CONCLUSION>") == ""  # earlier stages missing


def row_layout(n: int, batch: int) -> list[tuple[str, int]]:
    """(kind, example) of each answer() row: per chunk of `batch` examples, their questions,
    then their judge prompts."""
    rows = []
    for start in range(0, n, batch):
        chunk = range(start, min(start + batch, n))
        rows += [("question", i) for i in chunk] + [("judge", i) for i in chunk]
    return rows


class CharStub(StubAnswerer):
    """A StubAnswerer whose tokens are characters: a reply is cut at max_new_tokens as
    generate cuts it, so a judge budget shorter than the trained replies shows."""
    class tokenizer:  # noqa: N801 (the answerer's tokenizer attribute)
        @staticmethod
        def encode_raw(texts):
            return [[ord(c) for c in text] for text in texts]

    def answer(self, params, images, questions, max_new_tokens=None):
        return [r[:max_new_tokens] for r in super().answer(params, images, questions,
                                                           max_new_tokens)]


def test_cot_scores_conclusions_formats_and_judgements(shapes_data):  # noqa: F811
    train, _ = shapes_data
    items = []  # per example: (CotQuestion, judge prompt, right choice), filled below
    layout = row_layout(6, 4)

    def reply(k, text):
        kind, i = layout[k % len(layout)]  # a second run numbers on
        question, prompt, choice = items[i]
        if kind == "question":  # right on even examples, a broken format on odd ones
            assert text == question.question
            if i % 2 == 0:
                return shapes_cot.staged_answer(question)
            return f"<SUMMARY>x</SUMMARY><CONCLUSION>{question.answer}</CONCLUSION>"
        assert text == prompt  # the judge prompt: right on examples 0, 1, 3, 4; wrong on 2, 5
        return shapes_cot.judge_answer("REASONING", 3 - choice if i % 3 == 2 else choice)

    stub = CharStub(reply)
    run = evaluator(train, dict(type="cot", data=dict(split="test"), batch_size=4,
                                max_new_tokens=5000), stub)
    items += [run.items(example) for example in run.examples()]
    assert len(items) == 6  # six test images, one question and one judge pair each
    metrics = run("params")
    right = [i % 2 == 0 for i in range(6)]
    assert metrics["cot/e/accuracy"] == pytest.approx(0.5)
    assert metrics["cot/e/format_valid"] == pytest.approx(0.5)
    assert metrics["cot/e/stage/SUMMARY"] == 1.0
    assert metrics["cot/e/stage/CAPTION"] == pytest.approx(0.5)
    assert metrics["cot/e/judge_accuracy"] == pytest.approx(4 / 6)
    assert metrics["cot/e/judge_unparsed"] == 0.0 and metrics["cot/e/questions"] == 6.0
    for question_type in {q.question_type for q, _, _ in items}:
        of_type = [r for (q, _, _), r in zip(items, right) if q.question_type == question_type]
        assert metrics[f"cot/e/{question_type}"] == pytest.approx(np.mean(of_type))
    assert stub.max_new_tokens == {5000, cot.judge_reply_tokens(CharStub.tokenizer) + 8}
    assert run("params") == metrics  # the same questions and pairs every run
