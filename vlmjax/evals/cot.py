"""LLaVA-CoT evaluation on vlm_shapes: greedy four-stage answers to questions that need several
steps (data/shapes_cot.py), and the model's own judging of two texts for a stage.

For each image of a vlm_shapes split, one reasoning question (shapes_cot.reasoning_question,
drawn from the image id and `seed`, so every run asks the same) and one judge prompt (a random
stage: the right text and a plausibly wrong one, in a random order). Metrics, for the entry
`name` of config.evals (fractions in [0, 1]):
  cot/{name}/accuracy        the CONCLUSION stage of the greedy answer == the answer
                             (vqa.normalize_answer on both; no CONCLUSION: wrong)
  cot/{name}/{question_type} the same per question type (shapes_cot.QUESTION_TYPES)
  cot/{name}/format_valid    all four stages, each opened and closed, in order
  cot/{name}/stage/{tag}     that stage present (and every stage before it)
  cot/{name}/judge_accuracy  the judge reply names the right response ("... response N")
  cot/{name}/judge_unparsed  judge replies that name neither response
  cot/{name}/questions       how many questions were scored
Entry keys beside the common ones: max_examples (the first N images), max_new_tokens (the
longest answer, default 192), seed (default 0). `context.model` is an ImageQuestionAnswerer;
a judge reply may be as long as the longest the judge data trains, plus 8 tokens.
"""
from __future__ import annotations

import zlib

import numpy as np

from vlmjax.data import shapes_cot
from vlmjax.data.shapes_text import COT_TAGS
from vlmjax.evals.vqa import NUM_SAMPLES, GenerativeEvaluator, exact_match
from vlmjax.inference import cot


def score_cot(responses, answers, question_types) -> dict[str, float]:
    """The answer metrics of the module docstring for greedy `responses`."""
    metrics, by_type = {}, {}
    stages = [cot.parse_stages(r) for r in responses]
    correct = [COT_TAGS[-1] in s and exact_match(s[COT_TAGS[-1]], a)
               for s, a in zip(stages, answers)]
    metrics["accuracy"] = float(np.mean(correct)) if correct else 0.0
    for hit, question_type in zip(correct, question_types):
        by_type.setdefault(question_type, []).append(hit)
    metrics.update({t: float(np.mean(v)) for t, v in sorted(by_type.items())})
    metrics["format_valid"] = float(np.mean([len(s) == len(COT_TAGS) for s in stages]))
    for tag in COT_TAGS:
        metrics[f"stage/{tag}"] = float(np.mean([tag in s for s in stages]))
    metrics["questions"] = float(len(responses))
    return metrics


def cot_draw(facts, seed: int = 0):
    """(CotQuestion, the stage of its judge pair, the right text, the wrong one, the right
    choice) of an image's scene facts: drawn from the image id and `seed`, so every run (and
    benchmarks/cot_search.py, cot_judge_bias.py) asks the same."""
    rng = np.random.default_rng([seed, zlib.crc32(facts.image_id.encode())])
    question = shapes_cot.reasoning_question(facts, rng)
    stage = COT_TAGS[int(rng.integers(len(COT_TAGS)))]
    return (question, stage, *shapes_cot.judge_pair(facts, question, stage, rng))


def cot_items(facts, seed: int = 0):
    """(CotQuestion, judge prompt, the judge's right choice) of an image's scene facts
    (cot_draw)."""
    question, stage, right, wrong, choice = cot_draw(facts, seed)
    return question, shapes_cot.pair_prompt(question, stage, right, wrong, choice), choice


class CotEvaluator(GenerativeEvaluator):
    KEYS = {**GenerativeEvaluator.KEYS, "seed": "which question and judge pair each image gets"}
    DEFAULT_MAX_NEW_TOKENS = 192

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.seed = int(entry.get("seed", 0))
        self.last_samples: list[dict] = []

    def items(self, example):
        """(question, judge prompt, judge's right choice) of one example."""
        return cot_items(self.scene(example), self.seed)

    def __call__(self, params) -> dict:
        questions, prompts, choices, images = [], [], [], []
        for example in self.examples():
            question, prompt, choice = self.items(example)
            questions.append(question)
            prompts.append(prompt)
            choices.append(choice)
            images.append(example["image"])
        responses, replies = [], []
        # the longest trained judge reply and some: a shorter budget cuts "response N" off
        judge_budget = cot.judge_reply_tokens(self.context.model.tokenizer) + 8
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            batch = np.stack(images[chunk])
            responses += self.context.model.answer(
                params, batch, [q.question for q in questions[chunk]],
                max_new_tokens=self.max_new_tokens)
            replies += self.context.model.answer(params, batch, prompts[chunk],
                                                 max_new_tokens=judge_budget)
        metrics = score_cot(responses, [q.answer for q in questions],
                            [q.question_type for q in questions])
        judged = [cot.parse_choice(reply) for reply in replies]
        metrics["judge_accuracy"] = float(np.mean([j == c for j, c in zip(judged, choices)]))
        metrics["judge_unparsed"] = float(np.mean([j is None for j in judged]))
        self.last_samples = [dict(question=q.question, response=r, answer=q.answer,
                                  judge_reply=j) for q, r, j
                             in zip(questions, responses, replies)][:NUM_SAMPLES]
        return self.metric_names(metrics)
