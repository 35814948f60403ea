"""Visual question answering on vlm_shapes: a generative model (LLaVA-style PrefixLM) answers
each image's questions, scored by normalised exact match against the reference answers.

Metrics, for the entry `name` of config.evals (fractions in [0, 1]):
  vqa/{name}/exact_match   normalise(prediction) == normalise(answer), over all questions
  vqa/{name}/{qa_type}     the same per question type: colour, shape, count, position,
                           existence, comparison (the types the data has)
  vqa/{name}/contains      lenient: the normalised answer appears as whole words in the
                           normalised prediction (credits sentence answers, "The star is red.",
                           and also a sentence that names both options of a question)
  vqa/{name}/questions     how many questions were scored
Normalisation (`normalize_answer`, after the VQA benchmark's): lower case; punctuation removed
(a decimal point and a thousands comma between digits kept / joined); the articles a, an, the
dropped; number words zero..twenty as digits ("none" as 0); whitespace collapsed.

Data: a vlm_shapes split, whose examples hold one question of each type (vlmjax/data/shapes.py:
`qa` question / answer / type). With vlm_shapes training data the default is the training source
at `data.split`; a model trained on other data (LLaVA JSON, e.g. vlm_shapes' own instruction
export) names it: `data=dict(source="vlm_shapes", split="test", config="64px", data_dir=...)`.
Images are preprocessed as in training without the random ops (evals/data.py). Every process
evaluates the whole split (the metrics agree across processes).

`context.model` is an ImageQuestionAnswerer (evals/generation.py), or anything with
`answer(params, images, questions, max_new_tokens=None) -> list[str]`. Entry keys beside the
common ones (evals/registry.py; `batch_size`: questions per generate call, default 32):
  max_examples       the first N images of the split (0 = all, the default)
  max_new_tokens     the longest answer in tokens (default 16)
  answer_instruction text after each question on a new line (default none; LLaVA-1.5 asks
                     "Answer the question using a single word or phrase.")
  question_format    how a question is put, "{question}" (the default) marking where it goes:
                     BLIP-2 asks "Question: {question} Answer:"
  answer_stop        cut each answer at the first occurrence of this text (default none): a
                     plain LM prompted BLIP-2's way goes on to a next question (BLIP-2 stops OPT
                     at its newline token; vlm_shapes' tiny LM writes " Q: ...")
  shots              k in-context examples before each question (default 0), for a model that
                     takes them (`supports_context`: the fusion task's InterleavedAnswerer):
                     (image, question, answer) triples of `shots_split` (default 'train', the
                     same data config otherwise) drawn from its first `shots_pool` images
                     (default 256), k distinct images per question, one random question of
                     each; the draw is seeded by the question's index, so every run and every
                     model sees the same examples. Name such entries e.g. 'test/4shot':
                     vqa/test/4shot/exact_match.
After a run `last_samples` holds its first few {question, prediction, answer, type}.
"""
from __future__ import annotations

import re
from typing import Iterator

import jax
import numpy as np
import tqdm

from vlmjax.config import ConfigError
from vlmjax.data import shapes_text
from vlmjax.evals import registry

DEFAULT_BATCH_SIZE = 32  # generation holds a KV cache per row: far smaller than embedding's
NUM_SAMPLES = 8
PROGRESS_MIN_EXAMPLES = 256  # shorter runs print no progress bar
# The record fields an evaluation reads (sources.VLM_SHAPES_FIELDS names); `texts` are captions.
SHAPES_FIELDS = ("id", "caption_noise", "box_colours", "box_shapes", "box_sizes",
                 "box_positions", "questions", "answers", "qa_types", "cot_answers")

_NUMBERS = {word: str(i) for i, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    text = str(text).lower().replace("\n", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)        # 1,000 -> 1000
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)    # keep only decimal points
    text = text.replace("'", "")                      # it's -> its (one word, as typed)
    text = re.sub(r"[^\w\s.]|_", " ", text)
    words = [_NUMBERS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_answer(prediction: str, answer: str) -> bool:
    """The normalised answer is a run of whole words of the normalised prediction."""
    said, wanted = normalize_answer(prediction).split(), normalize_answer(answer).split()
    return bool(wanted) and any(said[i:i + len(wanted)] == wanted
                                for i in range(len(said) - len(wanted) + 1))


def score_answers(predictions, answers, qa_types) -> dict[str, float]:
    """{exact_match, contains, questions, <type>: exact match of that type} of aligned lists."""
    if not predictions:
        raise ValueError("no question was answered")
    exact = np.array([exact_match(p, a) for p, a in zip(predictions, answers, strict=True)])
    contains = np.array([contains_answer(p, a) for p, a in zip(predictions, answers)])
    types = np.array(list(qa_types), dtype=object)
    metrics = {"exact_match": float(exact.mean()), "contains": float(contains.mean()),
               "questions": float(len(exact))}
    for qa_type in dict.fromkeys(types):
        metrics[str(qa_type)] = float(exact[types == qa_type].mean())
    return metrics


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GenerativeEvaluator(registry.Evaluator):
    """What the vqa and captioning evaluators share: the keys below, a vlm_shapes split read
    example by example with preprocessed images, and a progress bar on long runs."""
    KEYS = {"max_examples": "the first N images of the split (0 = all, the default)",
            "max_new_tokens": "the longest generated text in tokens"}
    DEFAULT_MAX_NEW_TOKENS = 16

    @classmethod
    def check(cls, entry, where):
        for key, minimum in (("max_examples", 0), ("max_new_tokens", 1)):
            value = entry.get(key, minimum)
            if type(value) is not int or value < minimum:
                raise ConfigError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
        data = entry.get("data") or {}
        if data.get("source") not in (None, "vlm_shapes"):
            raise ConfigError(f"{where}.data.source={data.get('source')!r}: a {entry['type']} "
                              "evaluation reads a vlm_shapes split (it scores against the "
                              f"scene's facts); give {where}.data=dict(source='vlm_shapes', "
                              "split=..., config=..., data_dir=...)")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        if self.data.data_config.source != "vlm_shapes":
            raise ConfigError(
                f"evals.{name}.data: a {self.type} evaluation reads a vlm_shapes split, and "
                f"training reads {self.data.data_config.source!r}; give evals.{name}.data="
                "dict(source='vlm_shapes', split='test', config=..., data_dir=...)")
        self.batch_size = int(entry.get("batch_size", DEFAULT_BATCH_SIZE))
        self.max_examples = int(entry.get("max_examples", 0))
        self.max_new_tokens = int(entry.get("max_new_tokens", self.DEFAULT_MAX_NEW_TOKENS))

    def examples(self, data_config=None, max_examples: int | None = None) -> Iterator[dict]:
        """The split's examples in order (the first `max_examples`): numpy `image` f32
        [S, S, 3], `captions` and SHAPES_FIELDS, behind a progress bar on long runs.
        `data_config`: another split to read (default: the entry's)."""
        from vlmjax.data import pipeline_config, preprocess
        from vlmjax.data.tf_cpu import tf
        from vlmjax.evals.data import eval_preprocess

        data_config = self.data.data_config if data_config is None else data_config
        max_examples = self.max_examples if max_examples is None else max_examples
        source = pipeline_config.make_source(data_config, training=False, fields=SHAPES_FIELDS)
        prepare_fn = preprocess.make_preprocess_fn(
            eval_preprocess(self.context.input.preprocess), int(self.context.input.image_size))

        def prepare(record):
            example = prepare_fn({"image": preprocess.decode(record["image"]),
                                  "texts": record["texts"], "_seed": tf.zeros([2], tf.int64)})
            return {"image": example["image"], "captions": record["texts"],
                    **{field: record[field] for field in SHAPES_FIELDS}}

        dataset = (source.records(0, 1, training=False, seed=0)
                   .filter(lambda r: r["_skip_reason"] == 0)
                   .map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
        total = source.num_records(0, 1)
        if max_examples:
            dataset, total = dataset.take(max_examples), min(total, max_examples)
        progress = tqdm.tqdm(dataset.prefetch(2).as_numpy_iterator(), total=total,
                             desc=f"{self.type}/{self.name}", unit="img", mininterval=2.0,
                             disable=jax.process_index() != 0 or total < PROGRESS_MIN_EXAMPLES)
        for example in progress:
            example["image"] = example["image"].astype(np.float32)
            yield example

    def scene(self, example: dict):
        """The example's scene facts (objects, background, captions): shapes_instruct's."""
        from vlmjax.data.shapes_instruct import scene_facts
        return scene_facts({
            "id": example["id"], "captions": example["captions"],
            "caption_noise": example["caption_noise"],
            "objects": {"colour": example["box_colours"], "shape": example["box_shapes"],
                        "size": example["box_sizes"], "position": example["box_positions"]},
            "qa": {"cot_answer": example["cot_answers"]}})

    def generate(self, params, pending: list[tuple[np.ndarray, str]], **options) -> list[str]:
        """The model's answers to (image, question) pairs; `options` (e.g. strategy="beam",
        num_beams=3) go to its `answer`."""
        images = np.stack([image for image, _ in pending])
        return list(self.context.model.answer(params, images, [q for _, q in pending],
                                              max_new_tokens=self.max_new_tokens, **options))


class VqaEvaluator(GenerativeEvaluator):
    KEYS = {**GenerativeEvaluator.KEYS,
            "answer_instruction": "text after each question on a new line (default none)",
            "question_format": "the question's text, '{question}' where it goes (default "
                               "'{question}'; BLIP-2: 'Question: {question} Answer:')",
            "answer_stop": "cut each answer at this text (default none)",
            "shots": "in-context examples before each question (default 0)",
            "shots_split": "the split the in-context examples come from (default 'train')",
            "shots_pool": "how many images of shots_split they are drawn from (default 256)"}

    @classmethod
    def check(cls, entry, where):
        super().check(entry, where)
        if not isinstance(entry.get("answer_instruction", ""), str):
            raise ConfigError(f"{where}.answer_instruction must be a string, got "
                              f"{entry.get('answer_instruction')!r}")
        form = entry.get("question_format", "{question}")
        if not isinstance(form, str) or form.count("{question}") != 1:
            raise ConfigError(f"{where}.question_format must be a string holding '{{question}}' "
                              f"once, got {form!r}")
        if not isinstance(entry.get("answer_stop", ""), str):
            raise ConfigError(f"{where}.answer_stop must be a string, got "
                              f"{entry.get('answer_stop')!r}")
        registry.check_counts(entry, ("shots",), where)
        pool = entry.get("shots_pool", 256)
        if type(pool) is not int or pool < entry.get("shots", 0):
            raise ConfigError(f"{where}.shots_pool must be an integer >= shots "
                              f"({entry.get('shots', 0)}), got {pool!r}")

    def __init__(self, name, entry, context):
        super().__init__(name, entry, context)
        self.answer_instruction = entry.get("answer_instruction", "")
        self.question_format = entry.get("question_format", "{question}")
        self.answer_stop = entry.get("answer_stop", "")
        self.shots = int(entry.get("shots", 0))
        self.shots_split = entry.get("shots_split", "train")
        self.shots_pool = int(entry.get("shots_pool", 256))
        if self.shots and not getattr(context.model, "supports_context", False):
            raise ConfigError(f"evals.{name}.shots={self.shots}: this task's model answers "
                              "without in-context examples (the fusion task's does); use "
                              "shots=0")
        self.last_samples: list[dict] = []
        self._pool: list[tuple] | None = None

    def question(self, text: str) -> str:
        text = self.question_format.replace("{question}", text)
        return f"{text}\n{self.answer_instruction}" if self.answer_instruction else text

    def shot_pool(self) -> list[tuple]:
        """(image, questions, answers) of the first shots_pool images of shots_split."""
        if self._pool is None:
            data_config = self.data.data_config.copy_and_resolve_references()
            with data_config.unlocked():
                data_config.split = self.shots_split
            self._pool = [(e["image"], [_text(q) for q in e["questions"]],
                           [_text(a) for a in e["answers"]])
                          for e in self.examples(data_config, self.shots_pool)]
            if len(self._pool) < self.shots:
                raise ValueError(f"evals.{self.name}: {len(self._pool)} image(s) in "
                                 f"{self.shots_split} for {self.shots}-shot prompts")
        return self._pool

    def shots_for(self, index: int) -> list[tuple]:
        """The (image, question, answer) examples before question `index`."""
        pool = self.shot_pool()
        rng = np.random.default_rng([index, self.shots])
        shots = []
        for pick in rng.choice(len(pool), self.shots, replace=False):
            image, questions, answers = pool[pick]
            qa = rng.integers(len(questions))
            shots.append((image, self.question(questions[qa]), answers[qa]))
        return shots

    def generate(self, params, pending) -> list[str]:
        if not self.shots:
            return super().generate(params, pending)
        images = np.stack([image for image, _, _ in pending])
        return list(self.context.model.answer(
            params, images, [q for _, q, _ in pending], max_new_tokens=self.max_new_tokens,
            context=[shots for _, _, shots in pending]))

    def __call__(self, params) -> dict:
        questions, answers, types, predictions = [], [], [], []
        pending: list[tuple] = []

        def flush():
            predictions.extend(self.generate(params, pending))
            pending.clear()

        for example in self.examples():
            for question, answer, qa_type in zip(example["questions"], example["answers"],
                                                 example["qa_types"], strict=True):
                questions.append(_text(question))
                answers.append(_text(answer))
                types.append(shapes_text.QA_TYPES[int(qa_type)])
                pending.append((example["image"], self.question(questions[-1])) if not self.shots
                               else (example["image"], self.question(questions[-1]),
                                     self.shots_for(len(questions) - 1)))
                if len(pending) == self.batch_size:
                    flush()
        if pending:
            flush()
        if self.answer_stop:
            predictions = [p.split(self.answer_stop)[0].strip() for p in predictions]
        self.last_samples = [dict(question=q, prediction=p, answer=a, type=t) for q, p, a, t
                             in zip(questions, predictions, answers, types)][:NUM_SAMPLES]
        return self.metric_names(score_answers(predictions, answers, types))
