"""The text LM's per-record ops (ops.py registry): which texts of a record are documents.

Each appends to the record's `documents` (string [N]; created empty by the first), so they
compose: "texts_as_documents|qa_documents" makes vlm_shapes' captions and its question-answer
pairs documents. The `lm` task's rows (lm_rows.py: tokenisation with BOS/EOS per document,
packing or padding, targets and loss mask) are built from `documents`.

  texts_as_documents      every text of the record: a line of a text file, a TFDS text
                          feature, vlm_shapes' captions
  qa_documents(question_prefix="Q: ", answer_prefix=" A: ")
                          one document per question-answer pair, "Q: {question} A: {answer}"
                          (vlm_shapes' `questions` / `answers` fields)
  scene_documents(question_prefix=" Q: ", answer_prefix=" A: ", scene_text="caption")
                          one document per image: its first caption, then every question-answer
                          pair about it: "{caption} Q: {question} A: {answer} Q: ...";
                          scene_text="description": the scene description of its LLaVA-CoT
                          answer ("The image shows a large red circle on the left ..."), which
                          names every fact a question asks (a caption may leave positions
                          out or say "disk" for circle). The
                          answers are read from the context, the skill a LLaVA LLM needs when
                          the context is visual tokens (the LLaVA demo's LM trains on these)
  cot_documents(question_prefix="Q: ", answer_prefix=" A: ")
                          the same with the LLaVA-CoT answer (`cot_answers`:
                          "<SUMMARY>..</SUMMARY><CAPTION>..</CAPTION><REASONING>..</REASONING>
                          <CONCLUSION>..</CONCLUSION>")
"""
from __future__ import annotations

from vlmjax.data.ops import Op, register_op
from vlmjax.data.tf_cpu import tf


SCENE_TEXTS = ("caption", "description")


def _appended(example, new) -> dict:
    documents = example.get("documents")
    if documents is None:
        documents = tf.zeros([0], tf.string)
    return {**example, "documents": tf.concat([documents, tf.reshape(new, [-1])], axis=0)}


@register_op("texts_as_documents")
def texts_as_documents() -> Op:
    return lambda example: _appended(example, example["texts"])


def _pairs(answers_field: str, question_prefix: str, answer_prefix: str) -> Op:
    for name, value in (("question_prefix", question_prefix), ("answer_prefix", answer_prefix)):
        if not isinstance(value, str):
            raise ValueError(f"{name} {value!r} must be a string")

    def op(example):
        questions = tf.strings.strip(example["questions"])
        answers = tf.strings.strip(example[answers_field])
        return _appended(example, tf.strings.join(
            [question_prefix, questions, answer_prefix, answers]))
    return op


@register_op("qa_documents", reads=("questions", "answers"))
def qa_documents(question_prefix: str = "Q: ", answer_prefix: str = " A: ") -> Op:
    return _pairs("answers", question_prefix, answer_prefix)


@register_op("scene_documents", reads=("questions", "answers", "cot_answers"))
def scene_documents(question_prefix: str = " Q: ", answer_prefix: str = " A: ",
                    scene_text: str = "caption") -> Op:
    for name, value in (("question_prefix", question_prefix), ("answer_prefix", answer_prefix)):
        if not isinstance(value, str):
            raise ValueError(f"{name} {value!r} must be a string")
    if scene_text not in SCENE_TEXTS:
        raise ValueError(f"scene_documents scene_text {scene_text!r} is not one of {SCENE_TEXTS}")

    def op(example):
        pairs = tf.strings.join([question_prefix, tf.strings.strip(example["questions"]),
                                 answer_prefix, tf.strings.strip(example["answers"])])
        if scene_text == "caption":
            text = tf.strings.strip(example["texts"][0])
        else:  # the CAPTION stage of the LLaVA-CoT answers: every object with all its facts
            text = tf.strings.regex_replace(example["cot_answers"][0],
                                            ".*<CAPTION>(.*)</CAPTION>.*", r"\1")
        return _appended(example, tf.strings.join([text, tf.strings.reduce_join(pairs)]))
    return op


@register_op("cot_documents", reads=("questions", "cot_answers"))
def cot_documents(question_prefix: str = "Q: ", answer_prefix: str = " A: ") -> Op:
    return _pairs("cot_answers", question_prefix, answer_prefix)
