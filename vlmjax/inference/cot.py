"""LLaVA-CoT inference-time search: stage-level beam search with a pairwise judge, and the
baselines it is measured against (best-of-N over whole answers, sentence-level beam search).

    searcher = ModelCot(answerer, params, images, questions, temperature=0.7)
    answers = stage_beam(searcher.sample, searcher.judge, keys=range(len(questions)),
                         num_beams=4, seed=0)                     # one answer text per question

LLaVA-CoT answers in four tagged stages (<SUMMARY>, <CAPTION>, <REASONING>, <CONCLUSION>). Its
search, per stage: sample N candidates for the stage; pick 2 of them at random, let the judge say
which is better and drop the other; repeat N-1 times; append the survivor and go on to the next
stage. Here every question of a batch is searched at once: one sampling call per stage gives all
questions their N candidates, and each round of the elimination is one batched judge call.

The search is written against two small interfaces, so that it is tested with scripted
samplers and judges and run with the model:
  sampler(keys, prefixes, unit, num, seed) -> per question (`keys`: the questions' ids),
      `num` Candidates continuing its prefix by one `unit`: a stage tag ("SUMMARY", ...: the
      text from <TAG> to </TAG>), ANSWER (the whole rest of the answer, to </CONCLUSION>) or
      SENTENCE (up to a sentence end or a closing tag).
  judge(keys, prefixes, unit, first, second) -> per pair, 1 or 2: the better Candidate.
Judges: `ModelCot.judge` (the model with LLaVA-CoT's judge prompt, default), `loglik_judge`
(the candidates' mean log-probability), `reference_judge` (an oracle that knows the reference
answer: what selection alone can give), or any callable with that signature.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Callable, Mapping, Sequence

import numpy as np

from vlmjax.data import shapes_cot
from vlmjax.data.shapes_text import COT_TAGS

ANSWER, SENTENCE = "ANSWER", "SENTENCE"
MODEL_JUDGES = ("model", "model_both_orders", "loglik")  # ModelCot(judging=...)
STAGE_NAMES = {**shapes_cot.STAGE_NAMES, ANSWER: "answer", SENTENCE: "next sentence"}
FINAL_TAG = f"</{COT_TAGS[-1]}>"


@dataclasses.dataclass(frozen=True)
class Candidate:
    text: str
    logprob: float = 0.0   # summed log-probability of its tokens under the sampler
    tokens: int = 0        # how many tokens were generated for it

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.tokens, 1)


Sampler = Callable[[list[int], list[str], str, int, int], list[list[Candidate]]]
Judge = Callable[[list[int], list[str], str, list[Candidate], list[Candidate]], Sequence[int]]


def tournament(candidates: list[list[Candidate]], judge: Callable,
               rngs: list[np.random.Generator]) -> list[Candidate]:
    """LLaVA-CoT's elimination: for each question, N-1 rounds of "two of the survivors at
    random (from the question's own rng), the judge keeps one"; `judge(rows, first, second)`
    judges one round of every question at once (lists of Candidates) and returns 1 or 2 per
    question."""
    pools = [list(range(len(row))) for row in candidates]
    for _ in range(max(len(pool) for pool in pools) - 1):
        active = [q for q, pool in enumerate(pools) if len(pool) > 1]
        pairs = {q: rngs[q].choice(len(pools[q]), 2, replace=False) for q in active}
        first = [candidates[q][pools[q][pairs[q][0]]] for q in active]
        second = [candidates[q][pools[q][pairs[q][1]]] for q in active]
        choices = list(judge(active, first, second))
        if len(choices) != len(active):
            raise ValueError(f"judge returned {len(choices)} choices for {len(active)} pairs")
        for q, choice in zip(active, choices):
            if choice not in (1, 2):
                raise ValueError(f"judge returned {choice!r}; it must return 1 or 2")
            loser = pairs[q][1] if choice == 1 else pairs[q][0]
            pools[q].pop(int(loser))
    return [candidates[q][pool[0]] for q, pool in enumerate(pools)]


def _search(sampler: Sampler, judge: Judge, units: Callable[[list[str]], str | None],
            keys: Sequence[int], num_beams: int, seed: int, max_steps: int) -> list[str]:
    """Shared loop: sample `num_beams` continuations of every unfinished prefix by the next
    unit, keep the judged winner, until no prefix has a next unit (or max_steps). Question q's
    pairings come from an rng of (seed, step, keys[q]), so a question is searched the same
    in any batch."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    prefixes = [""] * len(keys)
    for step in range(max_steps):
        unit = units(prefixes)
        if unit is None:
            break
        rows = [q for q, p in enumerate(prefixes) if FINAL_TAG not in p]
        row_prefixes = [prefixes[q] for q in rows]
        sampled = sampler([keys[q] for q in rows], row_prefixes, unit, num_beams,
                          seed * 1000 + step)
        if num_beams == 1:
            winners = [row[0] for row in sampled]
        else:
            def judge_round(active, first, second):
                return judge([keys[rows[i]] for i in active], [row_prefixes[i] for i in active],
                             unit, first, second)
            rngs = [np.random.default_rng([seed, step, keys[q]]) for q in rows]
            winners = tournament(sampled, judge_round, rngs)
        for q, winner in zip(rows, winners):
            prefixes[q] += winner.text
    return prefixes


def stage_beam(sampler: Sampler, judge: Judge, keys: Sequence[int], num_beams: int = 4,
               seed: int = 0) -> list[str]:
    """LLaVA-CoT's stage-level beam search: the four stages in order, each chosen among
    `num_beams` samples by the judge's elimination (num_beams=1: one sample a stage)."""
    stages = iter(COT_TAGS)
    return _search(sampler, judge, lambda prefixes: next(stages, None), keys, num_beams, seed,
                   len(COT_TAGS))


def best_of_n(sampler: Sampler, judge: Judge, keys: Sequence[int], num_beams: int = 4,
              seed: int = 0) -> list[str]:
    """N whole answers, the same elimination over them."""
    units = iter((ANSWER,))
    return _search(sampler, judge, lambda prefixes: next(units, None), keys, num_beams, seed, 1)


def sentence_beam(sampler: Sampler, judge: Judge, keys: Sequence[int], num_beams: int = 2,
                  seed: int = 0, max_sentences: int = 24) -> list[str]:
    """Sentence-level beam search: candidates stop at a sentence end or a closing tag, judged
    sentence by sentence until every answer holds </CONCLUSION> (or max_sentences)."""
    def unit(prefixes):
        return SENTENCE if any(FINAL_TAG not in p for p in prefixes) else None
    return _search(sampler, judge, unit, keys, num_beams, seed, max_sentences)


def loglik_judge(keys, prefixes, unit, first: list[Candidate],
                 second: list[Candidate]) -> list[int]:
    """The candidate with the higher mean log-probability per token (ties: the first)."""
    del keys, prefixes, unit
    return [1 if a.mean_logprob >= b.mean_logprob else 2 for a, b in zip(first, second)]


def reference_judge(references: Mapping[int, Mapping[str, str]]) -> Judge:
    """An oracle judge: `references[key]` is question `key`'s reference answer, {tag: stage
    text}. It prefers the candidate whose answer so far ends in the right CONCLUSION (exact
    match), then the one whose text is nearer the reference's (difflib ratio; for a stage, that
    stage's text; for a whole answer or a sentence, the staged reference answer as far as the
    candidate reaches); ties keep the first. The search with it bounds what a judge can give."""
    from vlmjax.evals.vqa import exact_match
    staged = {key: shapes_cot.staged_text(stages) for key, stages in references.items()}

    def score(key, prefix, unit, candidate):
        stages, full = references[key], staged[key]
        answer = prefix + candidate.text
        right = FINAL_TAG in answer and exact_match(conclusion(answer), stages[COT_TAGS[-1]])
        if unit in COT_TAGS:
            text, reference = _untagged(candidate.text, unit).strip(), stages[unit]
        else:  # ANSWER or SENTENCE: the reference over the same stretch of the answer
            text, reference = answer, full[:len(answer)]
        return right, difflib.SequenceMatcher(None, text, reference).ratio()

    def judge(keys, prefixes, unit, first, second) -> list[int]:
        return [1 if score(k, p, unit, a) >= score(k, p, unit, b) else 2
                for k, p, a, b in zip(keys, prefixes, first, second)]
    return judge


def judge_prompt(question: str, prefix: str, unit: str, first: str, second: str) -> str:
    """The judge prompt vlmjax.data.shapes_cot trains the judge with: the question, the answer
    so far as a hint, the two texts (a stage's without its tags, as in the judge data)."""
    return shapes_cot.judge_prompt(question, STAGE_NAMES.get(unit, unit.lower()), prefix,
                                   _untagged(first, unit), _untagged(second, unit))


def _untagged(text: str, unit: str) -> str:
    """A stage candidate without its own <TAG> and </TAG> (the judge data shows the text)."""
    if unit in COT_TAGS:
        text = text.strip()
        opening, closing = f"<{unit}>", f"</{unit}>"
        if text.startswith(opening):
            text = text[len(opening):]
        if text.endswith(closing):
            text = text[:-len(closing)]
    return text


def parse_choice(text: str) -> int | None:
    """1 or 2 from "Since ..., I choose response N."; None when the text names neither."""
    lowered = text.lower()
    at = lowered.rfind("response")
    tail = lowered[at + len("response"):] if at >= 0 else lowered
    for char in tail:
        if char in "12":
            return int(char)
    return None


def judge_reply_tokens(tokenizer) -> int:
    """Tokens of the longest judge reply the judge data trains ("Since ..., I choose response
    N.", shapes_cot.judge_answer), with its end of turn."""
    replies = [shapes_cot.judge_answer(stage, choice) for stage in shapes_cot.JUDGE_REASONS
               for choice in (1, 2)]
    return max(len(ids) for ids in tokenizer.encode_raw(replies)) + 1


class ModelCot:
    """The sampler and judge of a LLaVA-style model for questions about images.

    Args:
      answerer: an evals.generation.ImageQuestionAnswerer of the model (its tokenizer holds the
        stage tags as special tokens: tokenizers.VLM_SHAPES_SYMBOLS).
      params, images (float32 [B, H, W, 3] or None), questions (B strings): what is searched;
        a sampler / judge call's `keys` index these.
      temperature, top_p: sampling; max_stage_tokens: the longest stage or sentence sampled
        (a whole answer, ANSWER, gets one for each of the four stages); max_judge_tokens: the
        longest judge reply (None: the longest reply the judge data trains, shapes_cot.
        judge_answer, in this tokenizer, plus 8; a shorter budget cuts the reply before
        "response N" and every judgement falls back to the first text).

    A stage is sampled from the question's prompt, the answer so far and the stage's opening
    tag, and stops at its closing tag (or EOS / end of turn); ANSWER stops at </CONCLUSION>,
    SENTENCE at a piece that ends a sentence or any closing tag. The judge asks the judge
    prompt as a new question about the same image (greedy) and reads "response 1/2"; a reply
    that names neither keeps the first text and is counted in `unparsed_judgements`.
    `judging` (MODEL_JUDGES) picks what `judge` does: "model" asks as above (LLaVA-CoT);
    "model_both_orders" asks again with the texts swapped (a judge trained on vlm_shapes names
    "response 1" ~70% of the time, and the pairs it judges the same in both orders are right far
    more often: docs/experiments.md, LLaVA-CoT), a split going to `loglik_judge`; "loglik" is
    `loglik_judge` alone (no judge prompt). `generated_tokens` counts every new token, the
    judges' included.
    """

    def __init__(self, answerer, params, images, questions: Sequence[str], temperature=0.7,
                 top_p=1.0, max_stage_tokens: int = 96, max_judge_tokens: int | None = None,
                 judging: str = "model"):
        if judging not in MODEL_JUDGES:
            raise ValueError(f"judging {judging!r} is not one of {MODEL_JUDGES}")
        self.answerer, self.params, self.images = answerer, params, images
        self.judging = judging
        self.questions = list(questions)
        self.temperature, self.top_p = float(temperature), float(top_p)
        tokenizer = answerer.tokenizer
        self.tokenizer = tokenizer
        self.max_stage_tokens = max_stage_tokens
        missing = [f"<{t}>" for t in COT_TAGS if f"<{t}>" not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"the tokenizer has no special token(s) {missing}: LLaVA-CoT's "
                             "stage tags must be single tokens (tokenizers.VLM_SHAPES_SYMBOLS)")
        self.max_judge_tokens = max_judge_tokens or judge_reply_tokens(tokenizer) + 8
        self.opening = {t: tokenizer.token_id(f"<{t}>") for t in COT_TAGS}
        self.closing = {t: tokenizer.token_id(f"</{t}>") for t in COT_TAGS}
        self.prompts = answerer.prompts(self.questions, images is not None)
        self.generated_tokens = 0
        self.unparsed_judgements = 0

    @functools.cached_property
    def sentence_ends(self) -> list[int]:
        """The ids whose piece ends a sentence (SENTENCE's stops): one pass over the
        vocabulary, made only when a sentence-level search asks for it."""
        return [i for i in range(self.tokenizer.vocab_size)
                if self.tokenizer.decode_raw([i]).rstrip().endswith((".", "?", "!"))]

    def _stops(self, unit: str) -> list[int]:
        eos = list(self.answerer.eos_ids)
        if unit in COT_TAGS:
            return eos + [self.closing[unit]]
        if unit == ANSWER:
            return eos + [self.closing[COT_TAGS[-1]]]
        return eos + list(self.closing.values()) + self.sentence_ends

    def _generate(self, keys, prompts, stops, max_new_tokens, **options):
        from vlmjax.evals.generation import left_padded
        from vlmjax.inference.generate import generate
        tokens, mask = left_padded(prompts, self.answerer.pad_id)
        images = None if self.images is None else np.asarray(self.images, np.float32)[keys]
        out = generate(self.answerer.model, self.params, tokens, images=images,
                       prompt_mask=mask, max_new_tokens=max_new_tokens, eos_id=stops,
                       pad_id=self.answerer.pad_id, **options)
        new, lengths, scores = (np.asarray(x) for x in (out.tokens, out.lengths, out.scores))
        self.generated_tokens += int(lengths.sum())
        return [new[row, :int(lengths[row])].tolist() for row in range(len(prompts))], scores

    def _text(self, ids) -> str:
        """The text of generated ids without EOS / end of turn, and without ids past the
        tokenizer's vocabulary (a padded model vocabulary; an undertrained model emits them)."""
        eos = set(self.answerer.eos_ids)
        return self.tokenizer.decode_raw([i for i in ids if i not in eos
                                          and 0 <= i < self.tokenizer.vocab_size])

    def sample(self, keys, prefixes, unit, num, seed) -> list[list[Candidate]]:
        import jax
        forced = [self.opening[unit]] if unit in COT_TAGS else []
        prompts, rows = [], []
        for key, prefix in zip(keys, prefixes):
            prompt = (self.prompts[key] + (self.tokenizer.encode_raw([prefix])[0] if prefix
                                           else []) + forced)
            prompts += [prompt] * num
            rows += [key] * num
        budget = self.max_stage_tokens * (len(COT_TAGS) if unit == ANSWER else 1)
        ids, scores = self._generate(rows, prompts, self._stops(unit), budget,
                                     strategy="sample", temperature=self.temperature,
                                     top_p=self.top_p, rng=jax.random.key(seed))
        candidates = [Candidate(self._text(forced + row), float(score), len(row))
                      for row, score in zip(ids, scores)]
        return [candidates[q * num:(q + 1) * num] for q in range(len(keys))]

    def judge(self, keys, prefixes, unit, first, second) -> list[int]:
        if self.judging == "loglik":
            return loglik_judge(keys, prefixes, unit, first, second)
        choices = self._ask_judge(keys, prefixes, unit, first, second)
        if self.judging == "model":
            return [choice or 1 for choice in choices]
        swapped = self._ask_judge(keys, prefixes, unit, second, first)
        fallback = loglik_judge(keys, prefixes, unit, first, second)
        # The same text chosen in both orders wins; a split (or an unparsed reply) goes to
        # the higher mean log-probability.
        return [choice if choice and again and choice != again else other
                for choice, again, other in zip(choices, swapped, fallback)]

    def _ask_judge(self, keys, prefixes, unit, first, second) -> list[int | None]:
        prompts = self.answerer.prompts(
            [judge_prompt(self.questions[key], prefix, unit, a.text, b.text)
             for key, prefix, a, b in zip(keys, prefixes, first, second)],
            self.images is not None)
        ids, _ = self._generate(keys, prompts, list(self.answerer.eos_ids),
                                self.max_judge_tokens)
        choices = [parse_choice(self._text(row)) for row in ids]
        self.unparsed_judgements += sum(choice is None for choice in choices)
        return choices


def parse_stages(text: str) -> dict[str, str]:
    """The text of each stage a response holds, {tag: text}, read in order: the response opens
    with <SUMMARY>, and each stage opens right after the previous one closes (whitespace
    between is allowed); reading stops at the first stage that does not."""
    stages, rest = {}, text
    for tag in COT_TAGS:
        rest = rest.lstrip()
        opening, closing = f"<{tag}>", f"</{tag}>"
        end = rest.find(closing)
        if not rest.startswith(opening) or end < 0:
            break
        stages[tag] = rest[len(opening):end].strip()
        rest = rest[end + len(closing):]
    return stages


def conclusion(text: str) -> str:
    """A response's final answer: its CONCLUSION stage, or "" when it has none."""
    return parse_stages(text).get(COT_TAGS[-1], "")
