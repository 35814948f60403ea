"""inference/cot.py's search logic with scripted samplers and judges: the tournament keeps the
judged winner in N-1 rounds, a deterministic judge makes the search deterministic, a batch gives
each question the same answer as searching it alone, and each method stops where it should."""
from __future__ import annotations

import numpy as np
import pytest

from vlmjax.data.shapes_text import COT_TAGS
from vlmjax.inference import cot


def scripted_sampler(calls=None):
    """Candidate i of question `key` at a stage: "<TAG>k{key}s{seed}c{i}q{quality}</TAG>", its
    quality a pseudo-random function of (key, stage, i) alone (never of the batch)."""
    def sample(keys, prefixes, unit, num, seed):
        if calls is not None:
            calls.append((list(keys), unit, num))
        out = []
        for key, prefix in zip(keys, prefixes):
            row = []
            for i in range(num):
                quality = int(np.random.default_rng([key, len(prefix), i]).integers(1000))
                if unit in COT_TAGS:
                    text = f"<{unit}>k{key}c{i}q{quality}</{unit}>"
                elif unit == cot.ANSWER:
                    text = "".join(f"<{t}>k{key}c{i}q{quality}</{t}>" for t in COT_TAGS)
                else:  # SENTENCE: three sentences make an answer
                    done = prefix.count(".") >= 2
                    text = f"k{key}c{i}q{quality}." + (cot.FINAL_TAG if done else " ")
                row.append(cot.Candidate(text, logprob=-float(i), tokens=2))
            out.append(row)
        return out
    return sample


def quality(candidate: cot.Candidate) -> int:
    return int(candidate.text.split("q")[1].split("<")[0].split(".")[0])


def best_judge(calls=None):
    def judge(keys, prefixes, unit, first, second):
        if calls is not None:
            calls.append(len(first))
        return [1 if quality(a) >= quality(b) else 2 for a, b in zip(first, second)]
    return judge


def test_tournament_keeps_the_judged_winner_in_n_minus_1_rounds():
    rng = np.random.default_rng(0)
    candidates = [[cot.Candidate(f"q{int(v)}") for v in rng.permutation(n * 10)[:n]]
                  for n in (1, 2, 4, 5)]
    rounds = []
    judge = best_judge(rounds)
    winners = cot.tournament(candidates, lambda rows, a, b: judge(rows, None, "", a, b),
                             [np.random.default_rng(i) for i in range(4)])
    assert [quality(w) for w in winners] == [max(map(quality, row)) for row in candidates]
    assert len(rounds) == 4  # the largest pool (5) needs 4 rounds; finished rows drop out
    assert rounds == [3, 2, 2, 1]  # pools 2, 4, 5 -> 1, 3, 4 -> 2, 3 -> 1, 2 -> 1
    # a judge that always keeps the second text: the winner is the last one drawn, not the best
    winners = cot.tournament([list(map(cot.Candidate, "abcd"))], lambda rows, a, b: [2],
                             [np.random.default_rng(1)])
    assert winners[0].text in "abcd"
    with pytest.raises(ValueError, match="it must return 1 or 2"):
        cot.tournament([list(map(cot.Candidate, "ab"))], lambda rows, a, b: [0],
                       [np.random.default_rng(0)])


def test_stage_beam_picks_the_best_candidate_of_each_stage():
    calls = []
    answers = cot.stage_beam(scripted_sampler(calls), best_judge(), keys=[3, 7], num_beams=4)
    assert [unit for _, unit, _ in calls] == list(COT_TAGS)  # one sampling call per stage
    for key, answer in zip((3, 7), answers):
        prefix = ""
        for tag in COT_TAGS:  # rebuild the expected answer stage by stage
            best = max(range(4), key=lambda i: int(
                np.random.default_rng([key, len(prefix), i]).integers(1000)))
            quality_ = int(np.random.default_rng([key, len(prefix), best]).integers(1000))
            prefix += f"<{tag}>k{key}c{best}q{quality_}</{tag}>"
        assert answer == prefix


def test_a_deterministic_judge_makes_the_search_deterministic_and_batch_independent():
    def noisy_judge(keys, prefixes, unit, first, second):  # deterministic, but not "the best wins"
        return [1 + (quality(a) * 7 + quality(b) * 3) % 2 for a, b in zip(first, second)]
    keys = [0, 1, 2, 5, 9]
    for method in (cot.stage_beam, cot.best_of_n, cot.sentence_beam):
        batched = method(scripted_sampler(), noisy_judge, keys=keys, num_beams=3, seed=4)
        assert batched == method(scripted_sampler(), noisy_judge, keys=keys, num_beams=3, seed=4)
        alone = [method(scripted_sampler(), noisy_judge, keys=[k], num_beams=3,
                        seed=4)[0] for k in keys]
        assert batched == alone, method.__name__


def test_one_beam_takes_the_first_sample_and_never_judges():
    judged = []
    answers = cot.stage_beam(scripted_sampler(), best_judge(judged), keys=[1], num_beams=1)
    assert judged == [] and answers[0].count("c0q") == 4


def test_best_of_n_samples_whole_answers_once_and_sentence_beam_stops_at_the_conclusion():
    calls = []
    answers = cot.best_of_n(scripted_sampler(calls), best_judge(), keys=[1, 2], num_beams=4)
    assert [unit for _, unit, _ in calls] == [cot.ANSWER]
    assert all(a.endswith(cot.FINAL_TAG) for a in answers)
    calls = []
    answers = cot.sentence_beam(scripted_sampler(calls), best_judge(), keys=[1, 2], num_beams=2)
    assert [unit for _, unit, _ in calls] == [cot.SENTENCE] * 3
    assert all(a.count(".") == 3 and a.endswith(cot.FINAL_TAG) for a in answers)


def test_loglik_judge_and_choice_parsing():
    a, b = cot.Candidate("x", logprob=-1.0, tokens=4), cot.Candidate("y", logprob=-3.0, tokens=4)
    assert cot.loglik_judge([0, 1], ["", ""], "SUMMARY", [a, b], [b, a]) == [1, 2]
    assert cot.parse_choice("Since it is right, I choose response 2.") == 2
    assert cot.parse_choice("response 1") == 1
    assert cot.parse_choice("I cannot tell") is None
    prompt = cot.judge_prompt("How many?", "<SUMMARY>plan</SUMMARY>", "CAPTION",
                              "<CAPTION>one</CAPTION>", "<CAPTION>two</CAPTION>")
    assert "Response 1: one\nResponse 2: two\n" in prompt
    assert "Hint (the earlier stages): <SUMMARY>plan</SUMMARY>" in prompt


REFERENCE = {"SUMMARY": "I count the red shapes.", "CAPTION": "A red circle and a red square.",
             "REASONING": "Two shapes are red.", "CONCLUSION": "2"}


def tagged(tag, text):
    return cot.Candidate(f"<{tag}>{text}</{tag}>")


def test_reference_judge_prefers_the_right_conclusion_then_the_nearer_text():
    judge = cot.reference_judge({5: REFERENCE})
    prefix = "".join(f"<{t}>{REFERENCE[t]}</{t}>" for t in COT_TAGS[:3])
    # the right conclusion wins in either position; ties (both wrong, equally far) keep the first
    assert judge([5, 5], [prefix] * 2, "CONCLUSION", [tagged("CONCLUSION", "3"),
                 tagged("CONCLUSION", " 2 ")], [tagged("CONCLUSION", "2"),
                 tagged("CONCLUSION", "4")]) == [2, 1]
    assert judge([5], [prefix], "CONCLUSION", [tagged("CONCLUSION", "3")],
                 [tagged("CONCLUSION", "4")]) == [1]
    # an earlier stage: the text nearer the reference stage's
    near, far = "A red circle and a blue square.", "Three green triangles."
    assert judge([5, 5], ["<SUMMARY>x</SUMMARY>"] * 2, "CAPTION",
                 [tagged("CAPTION", far), tagged("CAPTION", near)],
                 [tagged("CAPTION", near), tagged("CAPTION", far)]) == [2, 1]
    # whole answers: a right conclusion beats a nearer text with a wrong one
    right = "".join(f"<{t}>{'x' if t != 'CONCLUSION' else '2'}</{t}>" for t in COT_TAGS)
    wrong = "".join(f"<{t}>{REFERENCE[t] if t != 'CONCLUSION' else '3'}</{t}>"
                    for t in COT_TAGS)
    assert judge([5], [""], cot.ANSWER, [cot.Candidate(wrong)], [cot.Candidate(right)]) == [2]


def test_stage_beam_with_the_reference_judge_finds_the_reference_when_sampled():
    """A sampler whose candidate 2 of each stage is the reference's: the oracle's search returns
    the reference answer at 3+ beams, and a sample at 1 beam."""
    def sample(keys, prefixes, unit, num, seed):
        wrong = {"SUMMARY": "I look.", "CAPTION": "Shapes.", "REASONING": "Maybe three.",
                 "CONCLUSION": "3"}
        texts = [wrong[unit] + "!" * i for i in range(num)]
        if num > 2:
            texts[2] = REFERENCE[unit]
        return [[tagged(unit, t) for t in texts] for _ in keys]

    judge = cot.reference_judge({0: REFERENCE, 1: REFERENCE})
    reference = "".join(f"<{t}>{REFERENCE[t]}</{t}>" for t in COT_TAGS)
    assert cot.stage_beam(sample, judge, keys=[0, 1], num_beams=4) == [reference] * 2
    assert cot.conclusion(cot.stage_beam(sample, judge, keys=[0], num_beams=1)[0]) == "3"
