"""inference/cot.py's ModelCot on a tiny random PrefixLM: a stage is sampled from the question's
prompt + the answer so far + the opening tag and is cut at its closing tag, the judge asks the
judge prompt about the same image, and the token count covers both."""
import jax
import numpy as np
import pytest

from tests.evals.test_vqa import T, shapes_data, tiny_llava, tokenizer  # noqa: F401 (fixtures)
from vlmjax.evals.generation import ImageQuestionAnswerer, left_padded
from vlmjax.inference import cot
from vlmjax.inference.generate import generate

QUESTIONS = ["How many corners do the red shape and the blue shape have together?",
             "Are there more large shapes than small ones, and by how many?"]


@pytest.fixture(scope="module")
def searcher(tiny_llava, tokenizer):  # noqa: F811 (fixtures of tests/evals/test_vqa.py)
    model, params, images = tiny_llava
    answerer = ImageQuestionAnswerer(model, tokenizer, "chatml", T)
    return cot.ModelCot(answerer, params, images[:2], QUESTIONS, temperature=1.0,
                        max_stage_tokens=12, max_judge_tokens=8)


def test_a_stage_is_sampled_after_its_opening_tag_and_cut_at_its_closing_tag(searcher,
                                                                            tokenizer,
                                                                            monkeypatch):
    close = tokenizer.token_id("</SUMMARY>")
    assert set(searcher._stops("SUMMARY")) == {close, *searcher.answerer.eos_ids}
    # A random model seldom samples </SUMMARY>: stop also at a quarter of the vocabulary, so
    # that most samples end at a stop and the cut shows.
    stops = sorted({close, *range(0, tokenizer.vocab_size, 4)})
    monkeypatch.setattr(searcher, "_stops", lambda unit: stops)
    prefix = "<SUMMARY>plan</SUMMARY>"
    before = searcher.generated_tokens
    sampled = searcher.sample([1, 0], ["", prefix], "SUMMARY", 6, seed=3)
    assert [len(row) for row in sampled] == [6, 6]
    assert all(c.text.startswith("<SUMMARY>") for row in sampled for c in row)
    assert searcher.generated_tokens - before == sum(c.tokens for r in sampled for c in r)
    # the first rows' prompt: question 1's prompt + <SUMMARY>; the others: question 0's +
    # the tokenised prefix + <SUMMARY>; the same sampling call by hand gives the same texts
    opening = tokenizer.token_id("<SUMMARY>")
    prompts = ([searcher.prompts[1] + [opening]] * 6
               + [searcher.prompts[0] + tokenizer.encode_raw([prefix])[0] + [opening]] * 6)
    tokens, mask = left_padded(prompts, searcher.answerer.pad_id)
    out = generate(searcher.answerer.model, searcher.params, tokens,
                   images=searcher.images[[1] * 6 + [0] * 6], prompt_mask=mask,
                   max_new_tokens=12, eos_id=stops, strategy="sample",
                   temperature=1.0, rng=jax.random.key(3), pad_id=searcher.answerer.pad_id)
    rows = [[int(i) for i in row[:int(n)]]
            for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]
    ended = 0
    for ids, candidate in zip(rows, [c for row in sampled for c in row]):
        assert candidate.tokens == len(ids)
        assert not set(ids[:-1]) & set(stops)  # cut at the first stop, nothing after it
        ended += ids[-1] in stops
        eos = searcher.answerer.eos_ids
        assert candidate.text == tokenizer.decode_raw([opening] + [i for i in ids
                                                                   if i not in eos])
    assert ended >= 6


def test_the_judge_asks_about_the_same_image_and_falls_back_to_the_first(searcher):
    first = [cot.Candidate("<SUMMARY>a</SUMMARY>"), cot.Candidate("<SUMMARY>b</SUMMARY>")]
    second = [cot.Candidate("<SUMMARY>c</SUMMARY>"), cot.Candidate("<SUMMARY>d</SUMMARY>")]
    unparsed = searcher.unparsed_judgements
    choices = searcher.judge([1, 0], ["<CAPTION>x</CAPTION>", ""], "SUMMARY", first, second)
    expected, missed = [], 0
    for key, prefix, a, b in zip([1, 0], ["<CAPTION>x</CAPTION>", ""], first, second):
        text = cot.judge_prompt(QUESTIONS[key], prefix, "SUMMARY", a.text, b.text)
        (prompt,) = searcher.answerer.prompts([text], with_images=True)
        out = generate(searcher.answerer.model, searcher.params, np.asarray([prompt], np.int32),
                       images=searcher.images[key:key + 1], max_new_tokens=8,
                       eos_id=list(searcher.answerer.eos_ids))
        reply = searcher.tokenizer.decode_raw(
            [int(i) for i in np.asarray(out.tokens[0, :int(out.lengths[0])])])
        choice = cot.parse_choice(reply)
        missed += choice is None
        expected.append(choice or 1)
    assert choices == expected
    assert searcher.unparsed_judgements - unparsed == missed
    answers = cot.stage_beam(searcher.sample, searcher.judge, keys=[0, 1], num_beams=2)
    assert all(a.startswith("<SUMMARY>") for a in answers)


def test_missing_stage_tokens_are_an_error(searcher):
    class Plain:
        special_tokens = {}
    answerer = type("A", (), {"tokenizer": Plain()})()
    with pytest.raises(ValueError, match="stage tags must be single tokens"):
        cot.ModelCot(answerer, None, None, ["q"])


def test_the_judge_budget_fits_every_trained_reply_and_a_whole_answer_gets_four_stages(
        tiny_llava, tokenizer, monkeypatch):  # noqa: F811
    from vlmjax.data import shapes_cot
    model, params, images = tiny_llava
    answerer = ImageQuestionAnswerer(model, tokenizer, "chatml", T)
    searcher = cot.ModelCot(answerer, params, images[:2], QUESTIONS, max_stage_tokens=10)
    budgets = []

    def scripted(keys, prompts, stops, max_new_tokens, **options):
        # the model replies as the judge data trains it, cut at the budget as generate cuts
        budgets.append(max_new_tokens)
        reply = tokenizer.encode_raw([shapes_cot.judge_answer("REASONING", 2)])[0]
        return [reply[:max_new_tokens] for _ in prompts], np.zeros(len(prompts))

    monkeypatch.setattr(searcher, "_generate", scripted)
    pair = [cot.Candidate("<REASONING>a</REASONING>")], [cot.Candidate("<REASONING>b</REASONING>")]
    assert searcher.judge([0], [""], "REASONING", *pair) == [2]
    assert searcher.unparsed_judgements == 0
    longest = max(len(tokenizer.encode_raw([shapes_cot.judge_answer(stage, 1)])[0])
                  for stage in shapes_cot.JUDGE_REASONS)
    assert budgets[-1] >= longest + 1
    searcher.sample([0], [""], cot.ANSWER, 1, seed=0)
    searcher.sample([0], [""], "CAPTION", 1, seed=0)
    assert budgets[-2:] == [40, 10]


def test_judging_both_orders_keeps_a_text_chosen_twice_and_splits_go_to_the_loglik(
        tiny_llava, tokenizer, monkeypatch):  # noqa: F811
    """A judge that always names "response 1" (the position bias the trained judge shows): in
    both orders it contradicts itself, so every pair goes to the mean log-probability; a judge
    that names the text containing "good" is kept in both orders."""
    from vlmjax.data import shapes_cot
    model, params, images = tiny_llava
    answerer = ImageQuestionAnswerer(model, tokenizer, "chatml", T)
    searcher = cot.ModelCot(answerer, params, images[:2], QUESTIONS,
                            judging="model_both_orders")
    prompts_seen = []

    def replies(pick):
        def scripted(keys, prompts, stops, max_new_tokens, **options):
            texts = [tokenizer.decode_raw(p) for p in prompts]
            prompts_seen.extend(texts)
            reply = [shapes_cot.judge_answer("CAPTION", pick(t)) for t in texts]
            return tokenizer.encode_raw(reply), np.zeros(len(prompts))
        return scripted

    good = cot.Candidate("<CAPTION>good</CAPTION>", logprob=-9.0, tokens=3)
    bad = cot.Candidate("<CAPTION>bad</CAPTION>", logprob=-1.0, tokens=3)
    pairs = [good, bad], [bad, good]
    monkeypatch.setattr(searcher, "_generate", replies(lambda text: 1))
    assert searcher.judge([0, 1], ["", ""], "CAPTION", *pairs) == [2, 1]  # the likelier: bad
    assert len(prompts_seen) == 4  # each pair asked twice, the texts swapped the second time
    assert "Response 1: good" in prompts_seen[0] and "Response 1: bad" in prompts_seen[2]

    def names_good(text):
        return 1 if "Response 1: good" in text else 2
    monkeypatch.setattr(searcher, "_generate", replies(names_good))
    assert searcher.judge([0, 1], ["", ""], "CAPTION", *pairs) == [1, 2]  # good, twice
    assert searcher.unparsed_judgements == 0
    searcher.judging, asked = "loglik", len(prompts_seen)
    assert searcher.judge([0, 1], ["", ""], "CAPTION", *pairs) == [2, 1]
    assert len(prompts_seen) == asked  # no judge prompt
    with pytest.raises(ValueError, match="is not one of"):
        cot.ModelCot(answerer, params, images[:2], QUESTIONS, judging="oracle")
