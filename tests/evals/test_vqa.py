"""The vqa and captioning evaluators (answer normalisation, per-type scores and description
checks against a stub answerer whose right and wrong answers are known), and
ImageQuestionAnswerer on a tiny random PrefixLM against generate + decode of the training
prompt."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.data import conversations, pipeline_config, shapes, shapes_instruct, shapes_text
from vlmjax.data.shapes_instruct import ObjectFacts
from vlmjax.data.tokenizers import VLM_SHAPES_LM_TOKENS, load_tokenizer
from vlmjax.evals import caption_metrics, captioning, registry, vqa
from vlmjax.evals.generation import ImageQuestionAnswerer, stop_ids
from vlmjax.inference import generate
from vlmjax.models.prefix_lm import PrefixLM

SIZES = dict(train_size=16, eval_size=6, novel_size=2)
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """(train data config, builder) of a tiny 32px vlm_shapes build (6 test images)."""
    data_dir = str(tmp_path_factory.mktemp("vqa_tfds"))
    builder = shapes.prepare(shapes.make_builder("32px", data_dir, **SIZES, num_workers=0))
    train = ml_collections.ConfigDict(dict(source="vlm_shapes", split="train", config="32px",
                                           data_dir=data_dir, **SIZES))
    return train, builder


@pytest.fixture(scope="module")
def test_examples(shapes_data):
    """The test split's examples, decoded by TFDS itself, in order."""
    _, builder = shapes_data
    return list(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())


@pytest.fixture(scope="module")
def tokenizer(shapes_data):
    tokenizer = load_tokenizer(shapes.tokenizer_path(shapes_data[1]))
    tokenizer.add_special_tokens(list(VLM_SHAPES_LM_TOKENS))
    return tokenizer


class StubAnswerer:
    """Answers row k of all rows asked with `reply(k, question)`; records what it was given."""

    def __init__(self, reply):
        self.reply, self.questions, self.images, self.max_new_tokens = reply, [], [], set()

    def answer(self, params, images, questions, max_new_tokens=None):
        assert params == "params" and images.dtype == np.float32
        assert images.shape == (len(questions), IMAGE_SIZE, IMAGE_SIZE, 3)
        self.max_new_tokens.add(max_new_tokens)
        first = len(self.questions)
        self.questions += list(questions)
        self.images += list(images)
        return [self.reply(first + i, q) for i, q in enumerate(questions)]


def evaluator(train, entry, answerer):
    context = registry.EvalContext(
        mesh=None, train_data=train, model=answerer,
        input=ml_collections.ConfigDict(dict(pipeline_config.INPUT_DEFAULTS,
                                             image_size=IMAGE_SIZE)))
    (built,) = registry.build_evaluators(ml_collections.ConfigDict({"e": entry}), context)
    return built


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("prediction, answer", [
    ("Red.", "red"), ("  the Red  ", "red"), ("Two", "2"), ("two", "two"), ("none", "zero"),
    ("a blue square", "blue square"), ("Yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"),
    ("It's left.", "its left"), ("center\n", "center"),
])
def test_normalised_answers_match(prediction, answer):
    assert vqa.exact_match(prediction, answer)


@pytest.mark.parametrize("prediction, answer", [
    ("red circle", "red"), ("3", "2"), ("3.5", "35"), ("yes it is", "yes"), ("", "no"),
    ("bluegreen", "blue"),
])
def test_other_answers_do_not(prediction, answer):
    assert not vqa.exact_match(prediction, answer)


def test_contains_needs_whole_words():
    assert vqa.contains_answer("The star on the left is Red.", "red")
    assert vqa.contains_answer("It is the blue square.", "a blue square")
    assert not vqa.contains_answer("It is reddish.", "red")
    assert not vqa.contains_answer("a square that is blue", "blue square")
    assert not vqa.contains_answer("anything", "")


# -------------------------------------------------------------------------------------- vqa
def test_vqa_scores_each_type_exactly(shapes_data, test_examples):
    train, _ = shapes_data
    asked = [(i, q.decode(), a.decode(), shapes_text.QA_TYPES[t])
             for i, ex in enumerate(test_examples)
             for q, a, t in zip(ex["qa"]["question"], ex["qa"]["answer"], ex["qa"]["type"])]

    def right(k):  # colour always, count on even images, the rest never
        image, _, _, qa_type = asked[k]
        return qa_type == "colour" or (qa_type == "count" and image % 2 == 0)

    def reply(k, question):
        answer = asked[k][2]
        return f" The {answer.upper()}." if right(k) else f"not {answer}"

    stub = StubAnswerer(reply)
    run = evaluator(train, dict(type="vqa", data=dict(split="test"), batch_size=4,
                                max_new_tokens=5, answer_instruction="One word."), stub)
    metrics = run("params")
    assert stub.questions == [f"{q}\nOne word." for _, q, _, _ in asked]  # all, in split order
    assert stub.max_new_tokens == {5}
    first = {}  # each question sees its own image
    for k, (image, *_) in enumerate(asked):
        np.testing.assert_array_equal(stub.images[k], stub.images[first.setdefault(image, k)])
    assert not np.array_equal(stub.images[first[0]], stub.images[first[1]])
    n = len(test_examples)
    count_right = sum(1 for i in range(n) if i % 2 == 0) / n
    types = [t for *_, t in asked]
    expected = {"colour": 1.0, "shape": 0.0, "count": count_right, "position": 0.0,
                "existence": 0.0, "exact_match": sum(map(right, range(len(asked)))) / len(asked),
                "contains": 1.0, "questions": float(len(asked))}
    if "comparison" in types:
        expected["comparison"] = 0.0
    assert metrics == pytest.approx({f"vqa/e/{k}": v for k, v in expected.items()})
    assert run.last_samples[0] == dict(question=asked[0][1], prediction=reply(0, ""),
                                       answer=asked[0][2], type=asked[0][3])
    assert len(run.last_samples) == vqa.NUM_SAMPLES


def test_blip2_question_format_and_answer_stop(shapes_data, test_examples):
    """BLIP-2's zero-shot form: each question put in question_format; an answer cut at
    answer_stop (a plain LM goes on to its next question)."""
    train, _ = shapes_data
    answers = [a.decode() for ex in test_examples for a in ex["qa"]["answer"]]
    stub = StubAnswerer(lambda k, question: f" {answers[k]} Q: what next? A: x")
    run = evaluator(train, dict(type="vqa", data=dict(split="test"), batch_size=4,
                                question_format="Q: {question} A:", answer_stop="Q:"), stub)
    metrics = run("params")
    first = test_examples[0]["qa"]["question"][0].decode()
    assert stub.questions[0] == f"Q: {first} A:"
    assert metrics["vqa/e/exact_match"] == 1.0
    assert run.last_samples[0]["prediction"] == answers[0]


def test_vqa_reads_the_first_max_examples_images(shapes_data, test_examples):
    stub = StubAnswerer(lambda k, q: "yes")
    run = evaluator(shapes_data[0], dict(type="vqa", data=dict(source="vlm_shapes", split="test",
                                                              config="32px", **SIZES,
                                                              data_dir=shapes_data[0].data_dir),
                                         max_examples=2), stub)
    metrics = run("params")
    expected = [q.decode() for ex in test_examples[:2] for q in ex["qa"]["question"]]
    assert stub.questions == expected and stub.max_new_tokens == {16}
    assert metrics["vqa/e/questions"] == len(expected)


# ------------------------------------------------------------------------------- captioning
SCENE = (ObjectFacts("red", "circle", "large", "left"),
         ObjectFacts("blue", "cross", "small", "top"),
         ObjectFacts("red", "star", "small", "right"))


@pytest.mark.parametrize("text, expected", [
    ("There are three shapes: a large red disk, blue plus signs and a red star.",
     dict(colours_named=3, shapes_named=3, all_named=1, count_stated=1, count_right=1, pairs=3,
          pairs_in_scene=3)),
    ("Two shapes: a red cross and a blue circle.",  # right words, wrong pairs, wrong count
     dict(colours_named=3, shapes_named=2, all_named=0, count_stated=1, count_right=0, pairs=2,
          pairs_in_scene=0)),
    ("A circle that is red, and two red shapes.",  # no pair, no stated total
     dict(colours_named=2, shapes_named=1, all_named=0, count_stated=0, count_right=0, pairs=0,
          pairs_in_scene=0)),
    ("", dict(colours_named=0, shapes_named=0, all_named=0, count_stated=0, count_right=0,
              pairs=0, pairs_in_scene=0)),
])
def test_description_check_counts(text, expected):
    assert captioning.check_description(text, SCENE) == dict(objects=3, **expected)


def test_stated_count_and_metrics():
    assert captioning.stated_count(captioning.words_of("I see 2 objects, two shapes")) == 2
    assert captioning.stated_count(captioning.words_of("there are no shapes")) == 0
    assert captioning.stated_count(captioning.words_of("one red shape")) is None
    checks = [captioning.check_description(t, SCENE) for t in
              ("three shapes: red circle, blue cross, red star", "four shapes: a red star")]
    assert captioning.caption_metrics(checks) == pytest.approx(dict(
        colour_acc=5 / 6, shape_acc=4 / 6, all_objects_named=0.5, count_acc=0.5,
        count_stated=1.0, object_precision=1.0, images=2.0))


def test_captioning_checks_descriptions_against_each_scene(shapes_data, test_examples):
    facts = [shapes_instruct.scene_facts(ex) for ex in test_examples]
    rng = np.random.default_rng(0)
    # Even images: the instruction data's own detailed description; odd images: nothing.
    replies = [shapes_instruct.description_paragraph(f, rng) if i % 2 == 0 else ""
               for i, f in enumerate(facts)]
    stub = StubAnswerer(lambda k, q: replies[k])
    run = evaluator(shapes_data[0], dict(type="captioning", data=dict(split="test"),
                                         prompt="Describe it.", batch_size=4), stub)
    metrics = run("params")
    assert stub.questions == ["Describe it."] * len(facts) and stub.max_new_tokens == {128}
    objects = [len(f.objects) for f in facts]
    even = sum(objects[::2]) / sum(objects)
    scores = caption_metrics.caption_scores(
        replies, [[c.decode() for c in ex["captions"]] for ex in test_examples])
    assert metrics == pytest.approx({f"captioning/e/{k}": v for k, v in dict(
        colour_acc=even, shape_acc=even, all_objects_named=0.5, count_acc=1.0,
        count_stated=0.5, object_precision=1.0, images=float(len(facts)), **scores).items()})
    assert 0 < metrics["captioning/e/bleu4"] < 0.5  # paragraphs and empty texts: far off
    assert run.last_samples[0]["prediction"] == replies[0]


def test_captioning_scores_texts_against_each_images_captions(shapes_data, test_examples):
    """A model that answers with the image's own caption: BLEU-4 1 and a high CIDEr-D; with the
    next image's caption, both far lower (the references are each image's own)."""
    references = [[c.decode() for c in ex["captions"]] for ex in test_examples]
    n = len(references)
    metrics = {}
    for shift in (0, 1):
        stub = StubAnswerer(lambda k, q: references[(k + shift) % n][0])
        run = evaluator(shapes_data[0], dict(type="captioning", data=dict(split="test"),
                                             batch_size=4), stub)
        metrics[shift] = run("params")
    assert metrics[0]["captioning/e/bleu4"] == pytest.approx(1.0)
    assert metrics[0]["captioning/e/cider_d"] > 3.0
    assert metrics[0]["captioning/e/cider_d"] == pytest.approx(caption_metrics.cider_d(
        [refs[0] for refs in references], references))
    assert metrics[1]["captioning/e/bleu4"] < 0.5
    assert metrics[1]["captioning/e/cider_d"] < metrics[0]["captioning/e/cider_d"] / 3
    assert metrics[0]["captioning/e/images"] == n  # the scene checks are still reported


def test_captioning_with_beams_asks_the_model_for_beam_search(shapes_data, test_examples):
    calls = []

    class BeamStub(StubAnswerer):
        def answer(self, params, images, questions, max_new_tokens=None, **options):
            calls.append(options)
            return super().answer(params, images, questions, max_new_tokens)

    stub = BeamStub(lambda k, q: "a red circle")
    entry = dict(type="captioning", data=dict(split="test"), batch_size=4, num_beams=3)
    evaluator(shapes_data[0], entry, stub)("params")
    assert calls == [dict(strategy="beam", num_beams=3)] * 2  # 6 images in batches of 4
    calls.clear()
    evaluator(shapes_data[0], dict(entry, num_beams=1), stub)("params")
    assert calls == [{}, {}]  # greedy: the model's own default


# ------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("entry, message", [
    (dict(type="vqa", max_examples=-1), r"evals.e.max_examples must be an integer >= 0"),
    (dict(type="vqa", max_new_tokens=0), r"evals.e.max_new_tokens must be an integer >= 1"),
    (dict(type="vqa", prompt="Describe."), r"evals.e.prompt is not used by anything"),
    (dict(type="vqa", answer_instruction=3), r"evals.e.answer_instruction must be a string"),
    (dict(type="captioning", prompt=3), r"evals.e.prompt must be a string"),
    (dict(type="captioning", num_beams=0), r"evals.e.num_beams must be an integer >= 1"),
    (dict(type="vqa", question_format="Q: A:"), r"question_format must be a string holding"),
    (dict(type="vqa", answer_stop=1), r"evals.e.answer_stop must be a string"),
    (dict(type="captioning", answer_instruction="x"),
     r"evals.e.answer_instruction is not used by anything"),
    (dict(type="vqa", data=dict(source="tfds", name="coco_captions", split="test")),
     r"evals.e.data.source='tfds': a vqa evaluation reads a vlm_shapes split"),
])
def test_bad_entries_are_config_errors(entry, message):
    train = ml_collections.ConfigDict(dict(source="vlm_shapes", split="train",
                                           data_dir="/nonexistent"))
    entry = {"data": dict(split="test"), **entry}
    with pytest.raises(ConfigError, match=message):
        registry.check_evals(ml_collections.ConfigDict({"e": entry}), train)


def test_llava_json_training_needs_a_vlm_shapes_split():
    train = ml_collections.ConfigDict(dict(source="llava_json", json_path="/train.json"))
    entry = dict(type="captioning", data=dict(json_path="/held_out.json"))
    with pytest.raises(ConfigError, match=r"evals.e.data: a captioning evaluation reads a "
                                          r"vlm_shapes split, and training reads 'llava_json'"):
        evaluator(train, entry, StubAnswerer(None))


# ------------------------------------------------------------------- ImageQuestionAnswerer
VISION = dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8, pool="cls")
T = 4  # visual tokens of a 16 x 16 image (the class token dropped)
QUESTIONS = ["What colour is the circle?", "How many shapes are there?",
             "Is there a red star in the image?"]


@pytest.fixture(scope="module")
def tiny_llava(tokenizer):
    model = PrefixLM(vision=VISION, image_token_id=tokenizer.token_id("<image>"),
                     llm=dict(vocab_size=tokenizer.vocab_size, width=32, depth=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=64))
    tokens = jnp.full((1, T + 2), tokenizer.token_id("<image>"), jnp.int32).at[0, -2:].set(7)
    images = jnp.zeros((1, 16, 16, 3), jnp.float32)
    shapes_ = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, images=images))["params"])
    rng = np.random.default_rng(0)  # O(1) weights: greedy answers differ between prompts
    params = jax.tree.map(lambda s: jnp.asarray(
        rng.normal(size=s.shape) / np.sqrt(s.shape[0] if len(s.shape) > 1 else 1)
        + (len(s.shape) == 1), jnp.float32), shapes_)
    images = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
    return model, params, images


def training_prompt(tokenizer, question):
    """The ids before the answer of a one-turn training conversation about one image."""
    enc = conversations.encode_conversation(
        [{"from": "human", "value": f"{question}\n<image>"}, {"from": "gpt", "value": "red"}],
        tokenizer, "vicuna_v1", max_len=512, num_image_tokens=T)
    return enc.tokens[:int(np.argmax(enc.loss_mask)) + 1].tolist()


def test_answers_are_generate_and_decode_of_the_training_prompt(tokenizer, tiny_llava):
    model, params, images = tiny_llava
    answerer = ImageQuestionAnswerer(model, tokenizer, "vicuna_v1", T, max_new_tokens=6,
                                     batch_size=4)
    answers = answerer.answer(params, images, QUESTIONS)
    eos = tokenizer.eos_id
    for question, image, answer in zip(QUESTIONS, images, answers):
        prompt = training_prompt(tokenizer, question)
        assert answerer.prompts([question], with_images=True) == [prompt]
        assert tokenizer.decode(prompt).endswith(f"{question} ASSISTANT:")
        out = generate(model, params, np.asarray([prompt], np.int32), images=image[None],
                       max_new_tokens=6, eos_id=[eos])
        ids = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
        assert answer == tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids).strip()
    assert len(set(answers)) > 1  # random weights, still distinct texts
    # Any grouping gives the same answers: one question a call (padded to 4 rows), and all
    # three in one call of another batch size: under a mesh, a multiple of its 8 devices.
    assert [answerer.answer(params, images[i:i + 1], [q])[0]
            for i, q in enumerate(QUESTIONS)] == answers
    meshed = ImageQuestionAnswerer(model, tokenizer, "vicuna_v1", T, max_new_tokens=6,
                                   mesh=sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert meshed.answer(params, images, QUESTIONS) == answers and meshed.batch_size == 8
    with pytest.raises(ValueError, match=r"2 images for 3 questions"):
        answerer.answer(params, images[:2], QUESTIONS)


def test_text_only_prompts_and_stop_ids(tokenizer):
    answerer = ImageQuestionAnswerer(None, tokenizer, "vicuna_v1", T)
    (prompt,) = answerer.prompts(["Hi?"], with_images=False)
    assert tokenizer.token_id("<image>") not in prompt
    assert stop_ids(tokenizer, "vicuna_v1") == [tokenizer.eos_id]
    assert stop_ids(tokenizer, "chatml") == sorted([tokenizer.eos_id,
                                                    tokenizer.token_id("<|im_end|>")])
    chatml = ImageQuestionAnswerer(None, tokenizer, "chatml", T)
    im_end = tokenizer.token_id("<|im_end|>")
    assert chatml.decode(tokenizer.encode_raw(["blue square"])[0] + [im_end, 7]) == "blue square"
    # ids past the tokenizer's (a model vocabulary padded beyond it) have no text: dropped
    blue = tokenizer.encode_raw(["blue"])[0]
    assert chatml.decode(blue + [tokenizer.vocab_size, tokenizer.vocab_size + 20]) == "blue"
    plain = ImageQuestionAnswerer(None, tokenizer, "plain", T)
    assert plain.prompts(["dropped"], with_images=True) == [[tokenizer.bos_id] + [
        tokenizer.token_id("<image>")] * T]


@pytest.mark.parametrize("template, end", [("vicuna_v1", ""), ("chatml", "<|im_end|>"),
                                           ("llama3", "<|eot_id|>")])
def test_encode_prompts_is_the_conversation_before_its_last_answer(shapes_data, template, end):
    tokenizer = load_tokenizer(shapes.tokenizer_path(shapes_data[1]))
    tokenizer.add_special_tokens(list(VLM_SHAPES_LM_TOKENS) + [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    turns = [{"from": "human", "value": "<image>\nWhat colour is the star?"},
             {"from": "gpt", "value": "It is red."}, {"from": "human", "value": "And the circle?"}]
    one, two = conversations.encode_prompts([turns[:1], turns], tokenizer, template,
                                            num_image_tokens=3)
    for prompt, question in ((one, turns[:1]), (two, turns)):
        full = conversations.encode_conversation(question + [{"from": "gpt", "value": "blue"}],
                                                 tokenizer, template, max_len=400,
                                                 num_image_tokens=3)
        ids = full.tokens[:full.length].tolist()
        assert ids[:len(prompt)] == prompt
        assert tokenizer.decode(ids[len(prompt):]) == f"blue {end}".strip()
    assert len(two) > len(one) and two.count(tokenizer.token_id("<image>")) == 3
    with pytest.raises(ValueError, match=r"must end with a user turn"):
        conversations.encode_prompts([turns[:2]], tokenizer, template)
