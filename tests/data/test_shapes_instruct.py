"""LLaVA instruction data from vlm_shapes: every answer checked against the scene, determinism, and
the exported JSON read by LlavaJsonSource and encoded with the chat templates."""
from __future__ import annotations

import json
import os
import re

import pytest
import tensorflow_datasets as tfds

from tests.data.conftest import TINY_SIZES
from vlmjax.data import (conversations, export, shapes, shapes_examples, shapes_instruct,
                         shapes_scene, shapes_text, sources, tokenizers)
from vlmjax.data.shapes_text import BACKGROUND_WORDS, NUMBER_WORDS, POSITION_PHRASES


def _examples(builder, split):
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return list(dataset.as_numpy_iterator())


@pytest.fixture(scope="module")
def examples(shapes_builder):
    return {split: _examples(shapes_builder, split) for split in ("train", "test_novel")}


def _true_scene(builder, image_id: str) -> shapes_scene.Scene:
    """The scene regenerated from its seed: ground truth that does not go through the features."""
    split, index = image_id.rsplit("_", 1)
    config = builder.builder_config
    spec = shapes_examples.ExampleSpec(split=split, image_size=config.image_size,
                                       seed=config.seed)
    return shapes_examples.make_scene(spec, int(index))[0]


def _named(text: str, scene) -> list:
    """The scene's objects that `text` names by colour + shape, in the order it names them."""
    found = [(text.find(obj.name), obj) for obj in scene.objects if obj.name in text]
    return [obj for _, obj in sorted(found, key=lambda pair: pair[0])]


def _at_named_position(text: str, scene):
    (obj,) = [o for o in scene.objects if POSITION_PHRASES[o.position][0] in text]
    return obj


def _named_combo(text: str) -> tuple[str, str]:
    (combo,) = [(c, s) for c, s in shapes_instruct.ALL_COMBOS if f"{c} {s}" in text]
    return combo


def _expected(question_type: str, question: str, scene) -> str:
    """The short answer, computed from the scene and the question text alone."""
    objects, count = scene.objects, len(scene.objects)
    if question_type == "colour":
        return _at_named_position(question, scene).colour
    if question_type == "shape":
        return _at_named_position(question, scene).shape
    if question_type == "count":
        return NUMBER_WORDS[count]
    if question_type == "colour_count":
        colour = re.search(r"How many (\w+) shapes", question)[1]
        return NUMBER_WORDS[sum(o.colour == colour for o in objects)]
    if question_type == "position":
        return _named(question, scene)[0].position
    if question_type == "size":
        return _named(question, scene)[0].size
    if question_type == "existence":
        present = {(o.colour, o.shape) for o in objects}
        return "yes" if _named_combo(question) in present else "no"
    if question_type == "larger":
        first, second = _named(question, scene)
        if first.size == second.size:
            return "same size"
        return first.name if first.size == "large" else second.name
    if question_type == "relative_position":
        first, second = _named(question, scene)
        a, b = (shapes_scene.REGION_CENTRES[o.position] for o in (first, second))
        if "left or" in question:
            return "left" if a[0] < b[0] else "right"
        return "above" if a[1] < b[1] else "below"
    if question_type == "removal":
        return NUMBER_WORDS[count - 1]
    if question_type == "all_same":
        attribute = "colour" if "same colour" in question else "shape"
        return "yes" if len({getattr(o, attribute) for o in objects}) == 1 else "no"
    if question_type == "largest_colour":
        (largest,) = [o for o in objects if o.size == "large"]
        return largest.colour
    raise AssertionError(f"no check for question type {question_type!r}")


def test_short_answers_agree_with_the_scene(shapes_builder, examples):
    seen_types = {"conversation": set(), "complex_reasoning": set()}
    for example in examples["train"] + examples["test_novel"]:
        scene = _true_scene(shapes_builder, example["id"].decode())
        for seed in range(3):  # more draws: every question type gets checked
            for entry in shapes_instruct.make_entries(
                    example, ("conversation", "complex_reasoning"), seed):
                turns = entry["conversations"]
                questions, replies = turns[0::2], turns[1::2]
                assert [t["from"] for t in questions] == ["human"] * len(questions)
                assert [t["from"] for t in replies] == ["gpt"] * len(replies)
                assert "<image>" in questions[0]["value"]
                assert not any("<image>" in t["value"] for t in turns[1:])
                assert len(replies) == len(entry["answers"]) == len(entry["question_types"])
                if entry["type"] == "conversation":
                    assert 2 <= len(replies) <= 4
                else:
                    assert len(replies) == 1
                for question, reply, short, question_type in zip(
                        questions, replies, entry["answers"], entry["question_types"]):
                    text = question["value"].replace("<image>", "")
                    assert short == _expected(question_type, text, scene), (text, reply)
                    # The reply states its fact (a zero count reads "no ... shapes").
                    stated = "no" if short == "zero" else short
                    assert stated in reply["value"].lower(), (short, reply["value"])
                    seen_types[entry["type"]].add(question_type)
    assert seen_types["conversation"] == {
        "colour", "shape", "count", "colour_count", "position", "existence", "size"}
    assert seen_types["complex_reasoning"] == {
        "larger", "relative_position", "colour_count", "removal", "all_same", "largest_colour",
        "existence"}


def test_description_names_every_object_and_the_background(shapes_builder, examples):
    for example in examples["train"] + examples["test_novel"]:
        scene = _true_scene(shapes_builder, example["id"].decode())
        (entry,) = shapes_instruct.make_entries(example, ["detailed_description"])
        question, answer = (t["value"] for t in entry["conversations"])
        assert question.replace("<image>", "").strip() in shapes_instruct.DETAIL_INSTRUCTIONS
        count = len(scene.objects)
        noun = "shape" if count == 1 else "shapes"
        assert answer.startswith(f"The image shows {NUMBER_WORDS[count]} {noun} on a "
                                 f"{BACKGROUND_WORDS[scene.background_kind][0]} "
                                 f"{scene.background_tone} background.")
        for obj in scene.objects:  # one sentence gives its size, colour, shape and position
            (sentence,) = [s for s in answer.split(". ")
                           if f"{obj.size} {obj.colour} {obj.shape}" in s]
            assert POSITION_PHRASES[obj.position][0] in sentence.lower()
        present = {(o.colour, o.shape) for o in scene.objects}
        assert not [c for c in shapes_instruct.ALL_COMBOS
                    if c not in present and f"{c[0]} {c[1]}" in answer]
        assert entry["objects"] == [{"colour": o.colour, "shape": o.shape, "size": o.size,
                                     "position": o.position} for o in scene.objects]
        assert entry["background"] == (f"{BACKGROUND_WORDS[scene.background_kind][0]} "
                                       f"{scene.background_tone}")


def test_caption_entries_use_the_example_captions(examples):
    for example in examples["train"]:
        (entry,) = shapes_instruct.make_entries(example, ["caption"])
        captions = [c.decode() for c in example["captions"]]
        instruction, caption = (t["value"] for t in entry["conversations"])
        assert instruction.replace("<image>", "").strip() in shapes_instruct.BRIEF_INSTRUCTIONS
        assert caption in captions and entry["captions"] == captions
        assert entry["type"] == "caption" and entry["image"] == f"{example['id'].decode()}.png"


def test_entries_are_deterministic_and_follow_the_seed(shapes_builder, examples):
    some = examples["train"][:12]
    first = [shapes_instruct.make_entries(ex, seed=0) for ex in some]
    assert first == [shapes_instruct.make_entries(ex, seed=0) for ex in some]
    assert first != [shapes_instruct.make_entries(ex, seed=1) for ex in some]
    # The same entries from the raw example (names, not TFDS class ids).
    spec = shapes_examples.ExampleSpec(split="train", image_size=64, seed=0, render=False)
    index = int(some[0]["id"].decode().rsplit("_", 1)[1])
    assert shapes_instruct.make_entries(shapes_examples.make_example(spec, index)) == first[0]
    assert [e["id"] for e in first[0]] == [f"{some[0]['id'].decode()}_{kind}"
                                           for kind in shapes_instruct.KINDS]


@pytest.fixture(scope="module")
def tokenizer(shapes_builder):
    tokenizer = tokenizers.SentencePieceTokenizer(shapes.tokenizer_path(shapes_builder))
    tokenizer.add_special_tokens(tokenizers.VLM_SHAPES_LM_TOKENS)
    return tokenizer


def test_export_loads_with_llava_source_and_encodes(shapes_builder, tokenizer, tmp_path):
    counts = export.export_llava(shapes_builder, str(tmp_path / "a"), split="validation")
    assert counts == {"images": 16, **{kind: 16 for kind in shapes_instruct.KINDS}}
    assert len(os.listdir(tmp_path / "a" / "images")) == 16
    for kind in shapes_instruct.KINDS:
        path = tmp_path / "a" / f"validation_{kind}.json"
        source = sources.LlavaJsonSource(str(path), str(tmp_path / "a" / "images"))
        records = list(source.records(0, 1, training=False, seed=0).as_numpy_iterator())
        assert len(records) == 16 and all(r["_skip_reason"] == 0 for r in records)
        turns = [json.loads(r["conversation"]) for r in records]
        for template in ("vicuna_v1", "plain"):
            encoded = conversations.encode_conversations(turns, tokenizer, template, max_len=512,
                                                         num_image_tokens=4)
            for enc in encoded:
                assert enc.skip_reason is None and not enc.truncated and enc.num_images == 1
                assert enc.loss_mask.sum() >= 1
    again = export.export_llava(shapes_builder, str(tmp_path / "b"), split="validation")
    assert again == counts
    for kind in shapes_instruct.KINDS:
        name = f"validation_{kind}.json"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_writes_the_chosen_kinds(shapes_builder, tfds_dir, tmp_path, capsys):
    del shapes_builder  # built: the command finds it from the same sizes
    sizes = [arg for name, size in TINY_SIZES.items() for arg in (f"--{name}", str(size))]
    out = tmp_path / "out"
    assert export.main(["llava", str(out), "--data_dir", tfds_dir, *sizes, "--split",
                        "test_novel", "--kinds", "caption,complex_reasoning", "--limit",
                        "4"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 image(s)" in printed and "wrote 4 caption entries" in printed
    assert sorted(os.listdir(out)) == ["images", "test_novel_caption.json",
                                       "test_novel_complex_reasoning.json"]
    assert len(json.loads((out / "test_novel_complex_reasoning.json").read_text())) == 4


def test_bad_arguments_name_the_valid_values(shapes_builder, tfds_dir, tmp_path, capsys):
    out = str(tmp_path)
    with pytest.raises(ValueError, match="'chat'.*valid kinds: caption, conversation, "
                                         "detailed_description, complex_reasoning"):
        export.export_llava(shapes_builder, out, kinds=["caption", "chat"])
    with pytest.raises(ValueError, match="valid kinds"):
        shapes_instruct.check_kinds(" , ")
    with pytest.raises(ValueError, match="'dev'.*valid splits: train, validation, test, "
                                         "test_novel"):
        export.export_llava(shapes_builder, out, split="dev")
    with pytest.raises(ValueError, match="limit=0"):
        export.export_llava(shapes_builder, out, limit=0)
    for args, message in ((["--kinds", "captions"], "valid kinds: caption,"),
                          (["--split", "dev"], "valid splits: train,"),
                          (["--captions", "all"], "llava takes no --captions")):
        with pytest.raises(SystemExit) as exit_info:
            export.main(["llava", out, "--data_dir", tfds_dir, *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_noisy_captions_are_never_used():
    """A noisy config's junk captions are no answers: all junk leaves no caption entry."""
    spec = shapes_examples.ExampleSpec(split="train", image_size=64, seed=0, render=False,
                                       noise_fraction=1.0, split_size=10)
    example = shapes_examples.make_example(spec, 3)
    assert set(example["caption_noise"]) != {"clean"}
    kinds = [e["type"] for e in shapes_instruct.make_entries(example)]
    assert kinds == ["conversation", "detailed_description", "complex_reasoning", "vqa"]


def test_vqa_entries_are_one_dataset_question_with_the_short_answer_instruction(examples):
    """One question per entry (a chat of all of them would let later questions give away earlier
    answers); over a few images every question type is asked."""
    asked = set()
    for example in examples["train"][:12]:
        entry = shapes_instruct.make_entries(example, ["vqa"])[0]
        qa = example["qa"]
        types = [shapes_text.QA_TYPES[t] for t in qa["type"]]
        expected = {(q.decode(), a.decode(), t)
                    for q, a, t in zip(qa["question"], qa["answer"], types)}
        human, gpt = entry["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count(shapes_instruct.IMAGE_TOKEN) == 1
        assert "?\n" + shapes_instruct.SHORT_ANSWER_INSTRUCTION in human["value"]
        question = human["value"].replace(shapes_instruct.IMAGE_TOKEN, "").replace(
            shapes_instruct.SHORT_ANSWER_INSTRUCTION, "").strip()
        (question_type,) = entry["question_types"]
        assert (question, gpt["value"], question_type) in expected
        assert entry["answers"] == [gpt["value"]]
        asked.add(question_type)
    assert len(asked) >= 4, asked