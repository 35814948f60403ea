"""vlm_shapes: scenes, rendering, text, noise, the TFDS builder and the build CLI."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re

import numpy as np
import pytest

from vlmjax.data import (build, shapes, shapes_examples, shapes_noise, shapes_render,
                         shapes_scene, shapes_text, tokenizers)

ALL_COMBOS = shapes_examples.ALL_COMBOS


def _scenes(count=400, combos=shapes_scene.SEEN_COMBOS):
    return [shapes_scene.sample_scene(np.random.default_rng([7, i]), combos) for i in range(count)]


def test_vocabulary_sizes():
    assert len(shapes_scene.SHAPES) >= 6 and len(shapes_scene.COLOURS) >= 8
    assert shapes_scene.NUM_CLASSES == len(shapes_scene.CLASS_NAMES) >= 48
    assert shapes_scene.CLASS_NAMES[shapes_scene.class_index("blue", "star")] == "blue star"
    assert set(shapes_scene.NOVEL_COMBOS).isdisjoint(shapes_scene.SEEN_COMBOS)
    # Every shape and every colour is still seen in train with other partners.
    assert {s for _, s in shapes_scene.NOVEL_COMBOS} == set(shapes_scene.SHAPES)
    assert {c for c, _ in shapes_scene.SEEN_COMBOS} == set(shapes_scene.COLOURS)


def test_scene_layout_invariants():
    counts = collections.Counter()
    for scene in _scenes():
        counts[len(scene.objects)] += 1
        assert 1 <= len(scene.objects) <= 3
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        assert all((o.colour, o.shape) in shapes_scene.SEEN_COMBOS for o in scene.objects)
        boxes = [o.bbox_xyxy() for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        for i, a in enumerate(boxes):  # non-overlapping
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        expected = (shapes_scene.class_index(scene.objects[0].colour, scene.objects[0].shape)
                    if len(scene.objects) == 1 else -1)
        assert scene.label == expected
    assert set(counts) == {1, 2, 3}


def test_render_draws_antialiased_objects_in_their_colour():
    scene = shapes_scene.Scene(objects=(shapes_scene.SceneObject(
        shape="circle", colour="blue", size="large", position="center", centre=(0.5, 0.5),
        half_extent=0.13, rotation=0.0, colour_rgb=shapes_scene.COLOURS["blue"]),),
        background_kind="gradient", background_tone="gray", background_seed=3)
    image = shapes_render.render(scene, 64).astype(float)
    assert image.shape == (64, 64, 3)
    np.testing.assert_allclose(image[32, 32], np.array(shapes_scene.COLOURS["blue"]) * 255, atol=2)
    corner = image[2, 2]
    assert abs(corner[2] - corner[0]) < 20  # gray-ish background, not blue
    # Anti-aliasing: along the row through the centre, some edge pixels lie strictly between.
    blue_weight = (image[32, :, 2] - image[32, :, 0])
    assert np.any((blue_weight > 40) & (blue_weight < 150))


def test_captions_are_true_varied_and_within_align_limits():
    rng_seed = 0
    for scene in _scenes(200):
        rng = np.random.default_rng(rng_seed)
        rng_seed += 1
        captions = shapes_text.captions(scene, rng)
        assert len(captions) == 3 and len(set(captions)) == 3
        for caption in captions:
            assert 3 <= shapes_text.word_count(caption) <= 20
            for obj in scene.objects:  # every object is named by its colour
                assert obj.colour in caption.split()


def test_questions_answers_and_cot_match_the_scene():
    cot = re.compile(r"^<SUMMARY>.+</SUMMARY><CAPTION>.+</CAPTION><REASONING>.+</REASONING>"
                     r"<CONCLUSION>(.+)</CONCLUSION>$")
    for i, scene in enumerate(_scenes(150)):
        qas = shapes_text.questions(scene, np.random.default_rng(i), ALL_COMBOS)
        types = [qa.qa_type for qa in qas]
        assert types == [t for t in shapes_text.QA_TYPES
                         if t != "comparison" or len(scene.objects) > 1]
        for qa in qas:
            assert cot.match(qa.cot_answer).group(1) == qa.answer
            if qa.qa_type == "colour":
                assert qa.answer in {o.colour for o in scene.objects}
            if qa.qa_type == "shape":
                assert qa.answer in {o.shape for o in scene.objects}
            if qa.qa_type == "position":
                obj = next(o for o in scene.objects if f"the {o.name}" in qa.question)
                assert qa.answer == obj.position
            if qa.qa_type == "count" and qa.question.startswith("How many shapes"):
                assert qa.answer == shapes_text.NUMBER_WORDS[len(scene.objects)]
            if qa.qa_type == "existence":
                named = re.search(r"an? (\w+ \w+)", qa.question).group(1)
                present = named in {o.name for o in scene.objects}
                assert qa.answer == ("yes" if present else "no")


def test_boxes_context_lists_every_object_box():
    scene = _scenes(1)[0]
    lines = shapes_text.boxes_context(scene).splitlines()
    assert len(lines) == len(scene.objects)
    for line, obj in zip(lines, scene.objects):
        name, box = line.split(": ")
        assert name == obj.name
        np.testing.assert_allclose(eval(box), obj.bbox_xyxy(), atol=1e-3)  # noqa: S307


def test_noise_kinds_and_fraction():
    rng = np.random.default_rng(0)
    clean = ["a large red circle on the left", "there is a small blue star at the top"]
    kinds = collections.Counter()
    for _ in range(2000):
        texts, noise = shapes_noise.add_noise(clean, 0.3, rng,
                                              swapped_caption=lambda r: "another image's caption")
        for text, kind in zip(texts, noise):
            kinds[kind] += 1
            words = len(text.split())
            if kind == "clean":
                assert text in clean
            elif kind == "swapped":
                assert text == "another image's caption"
            elif kind == "size_string":
                assert re.fullmatch(r"\d+x\d+", text)
            elif kind in ("generic", "too_short"):
                assert words < 3
            elif kind == "too_long":
                assert words > 20
            elif kind == "shared":
                assert text in shapes_noise.SHARED_BOILERPLATE
    junk = sum(v for k, v in kinds.items() if k != "clean")
    assert 0.27 < junk / 4000 < 0.33
    assert set(kinds) == set(shapes_noise.NOISE_KINDS)


def test_examples_are_deterministic_and_noise_keeps_clean_content():
    clean_spec = shapes_examples.ExampleSpec("train", 32, seed=5)
    noisy_spec = shapes_examples.ExampleSpec("train", 32, seed=5, noise_fraction=1.0,
                                             split_size=50)
    a = shapes_examples.make_example(clean_spec, 11)
    b = shapes_examples.make_example(clean_spec, 11)
    noisy = shapes_examples.make_example(noisy_spec, 11)
    other = shapes_examples.make_example(clean_spec, 12)
    assert a["image"] == b["image"] and a["captions"] == b["captions"]
    assert noisy["image"] == a["image"] and noisy["qa"] == a["qa"]
    assert "clean" not in noisy["caption_noise"] and noisy["captions"] != a["captions"]
    assert other["image"] != a["image"]
    validation = shapes_examples.make_example(
        shapes_examples.ExampleSpec("validation", 32, seed=5, noise_fraction=1.0), 11)
    assert set(validation["caption_noise"]) == {"clean"}  # noise only in train
    with pytest.raises(ValueError, match="split_size >= 2"):
        shapes_examples.make_example(
            shapes_examples.ExampleSpec("train", 32, seed=5, noise_fraction=0.3), 11)


def test_swapped_captions_are_another_images_clean_caption_and_false_of_this_one():
    size = 120
    clean_spec = shapes_examples.ExampleSpec("train", 32, seed=3, render=False, split_size=size)
    noisy_spec = dataclasses.replace(clean_spec, noise_fraction=1.0)
    clean = [shapes_examples.make_example(clean_spec, i) for i in range(size)]
    owners = collections.defaultdict(set)  # caption -> the examples it is a clean caption of
    for i, example in enumerate(clean):
        for caption in example["captions"]:
            owners[caption].add(i)
    objects = [set(zip(ex["objects"]["colour"], ex["objects"]["shape"])) for ex in clean]
    swapped = 0
    for i in range(size):
        noisy = shapes_examples.make_example(noisy_spec, i)
        for caption, kind in zip(noisy["captions"], noisy["caption_noise"]):
            if kind != "swapped":
                continue
            swapped += 1
            assert owners[caption] and i not in owners[caption], caption
            # Every image it is true of has an object (colour, shape) this image lacks.
            assert all(objects[j] - objects[i] for j in owners[caption]), caption
    assert 30 < swapped < 80  # 1 of the 7 noise kinds of 360 captions: about 51


def test_builder_splits_features_and_novel_split(shapes_builder):
    info = shapes_builder.info
    assert {name: split.num_examples for name, split in info.splits.items()} == {
        "train": 48, "validation": 16, "test": 16, "test_novel": 10}
    assert info.features["label"].num_classes == shapes_scene.NUM_CLASSES
    novel_classes = {shapes_scene.class_index(c, s) for c, s in shapes_scene.NOVEL_COMBOS}
    for example in shapes_builder.as_dataset(split="test_novel").as_numpy_iterator():
        assert example["label"] in novel_classes and len(example["objects"]["shape"]) == 1
    for split in ("train", "validation", "test"):
        for example in shapes_builder.as_dataset(split=split).as_numpy_iterator():
            assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
            assert len(example["captions"]) == 3
            objects = example["objects"]
            assert objects["bbox_xyxy"].shape == (len(objects["shape"]), 4)
            for colour, shape in zip(objects["colour"], objects["shape"]):
                combo = (shapes_scene.COLOUR_NAMES[colour], shapes_scene.SHAPES[shape])
                assert combo in shapes_scene.SEEN_COMBOS


def test_builder_tokenizer_beside_the_data(shapes_builder):
    tokenizer = tokenizers.load_tokenizer(shapes.tokenizer_path(shapes_builder))
    assert tokenizer.special_ids == {"pad": 0, "bos": 2, "eos": 3}
    for tag in ("<SUMMARY>", "</CONCLUSION>", "<image>"):  # single pieces
        ids, mask = tokenizer.encode_batch([f"yes{tag}"], max_len=8)
        assert tokenizer.piece_id(tag) in ids[0][mask[0]]
        assert tokenizer.decode(ids[0], mask[0]) == f"yes{tag}"
    text = "a large red circle on the left"
    ids, mask = tokenizer.encode_batch([text], max_len=32)
    assert tokenizer.decode(ids[0], mask[0]) == text
    assert mask.sum() <= 10  # the vocabulary covers the caption words


def test_config_names_and_errors(tfds_dir):
    assert shapes.config_name("64px") == "64px"
    assert shapes.config_name("64px", train_size=50_000) == "64px"
    assert shapes.config_name("noisy", train_size=100) == "noisy_train100"
    assert shapes.config_name("32px", noise_fraction=0.1) == "32px_noise10"
    with pytest.raises(ValueError, match="valid: .*64px"):
        shapes.make_builder("128px", tfds_dir)
    with pytest.raises(ValueError, match="noise_fraction"):
        shapes.make_builder("64px", tfds_dir, noise_fraction=1.5)


def test_build_cli_builds_and_reports(tmp_path, capsys):
    code = build.main(["vlm_shapes", "--data_dir", str(tmp_path), "--config", "noisy",
                       "--train_size", "30", "--eval_size", "4", "--novel_size", "3"])
    assert code == 0
    out = capsys.readouterr().out
    assert "vlm_shapes/noisy_train30_eval4_novel3: {'train': 30" in out
    builder = shapes.make_builder("noisy", str(tmp_path), train_size=30, eval_size=4,
                                  novel_size=3)
    assert builder.is_prepared()
    noise = [n for ex in builder.as_dataset(split="train").as_numpy_iterator()
             for n in ex["caption_noise"]]
    assert 0 < np.mean(np.array(noise) > 0) < 0.7  # some but not all captions are junk
    assert build.main(["vlm_shapes", "--data_dir", str(tmp_path), "--config", "12px"]) == 2


def _file_checksums(root) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_builds_are_bit_identical_across_core_counts_and_workers(tmp_path, monkeypatch):
    """Every file (records, dataset_info.json, tokenizer) has the same bytes whether the build
    runs in this process on "1 core" or in 2 spawned worker processes (their own str hash
    seeds) on "3 cores" (what the tokenizer trainer would see)."""
    monkeypatch.setattr(shapes, "_MIN_EXAMPLES_FOR_WORKERS", 0)  # use the pool even for 30
    checksums = []
    for cores, workers in ((1, 0), (3, 2)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        root = tmp_path / f"cores{cores}"
        shapes.prepare(shapes.make_builder("noisy", str(root), train_size=30, eval_size=6,
                                           novel_size=4, num_workers=workers))
        checksums.append(_file_checksums(root))
    names = set(checksums[0])
    assert any(name.endswith(".tfrecord-00000-of-00001") for name in names)
    assert any(name.endswith(shapes.TOKENIZER_FILENAME) for name in names)
    assert any(name.endswith("dataset_info.json") for name in names)
    assert checksums[0] == checksums[1]
