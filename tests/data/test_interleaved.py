"""Interleaved (MMC4-style) documents -> rows: marker placement, loss mask (no loss on image
tokens, padding, text before the first image or between an end of chunk and the next image),
truncation, counted skips, exact resume, and the vlm_shapes mmc4 export."""
import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmjax.data import export, interleaved
from vlmjax.models.fusion import media_mask_from_tokens

IMAGE_ID, END_ID = 90, 91


class WordTokenizer:
    """One id per word (a hash into 10..89), BOS 1, EOS 2, pad 0."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 90

    def encode_raw(self, texts):
        return [[10 + zlib.crc32(w.encode()) % 80 for w in t.split()] for t in texts]


def doc(sentences, images):
    """images: (name, sentence index[, similarity]) each."""
    return {"text_list": sentences,
            "image_info": [{"image_name": image[0], "matched_text_index": image[1],
                            "matched_sim": image[2] if len(image) > 2 else 1.0}
                           for image in images]}


def test_images_go_before_their_sentence_and_chunks_end_before_the_next_image():
    segments = interleaved.document_segments(doc(
        ["intro text", "first caption", "more", "second caption"],
        [("a.png", 1, 0.3), ("b.png", 3, 0.3)]))
    kinds = [s if isinstance(s, interleaved.Marker) else "text" for s in segments]
    assert kinds == ["text", "<image>", "text", "<|endofchunk|>", "<image>", "text",
                     "<|endofchunk|>"]
    assert segments[2] == "first caption more"
    assert [s.name for s in segments if s == "<image>"] == ["a.png", "b.png"]


def test_similarity_threshold_and_malformed_documents():
    kept = interleaved.document_segments(
        doc(["x", "y"], [("a.png", 0, 0.1), ("b.png", 1, 0.5)]), sim_threshold=0.24)
    assert [s.name for s in kept if s == "<image>"] == ["b.png"]
    assert interleaved.document_segments({"text": "no list"}) is None
    assert interleaved.document_segments(doc(["x"], [("a.png", 3, 1.0)])) is None  # bad index
    assert interleaved.document_segments(None) is None


def row_of(sentences, images, max_len=32, max_images=4):
    tokenizer = WordTokenizer()
    segments = interleaved.document_segments(doc(sentences, [(n, i, 1.0) for n, i in images]))
    ids, names = interleaved.encode_segments(segments, tokenizer, IMAGE_ID, END_ID)
    return ids, names, interleaved.make_row(ids, max_len, max_images, IMAGE_ID, END_ID)


def test_loss_mask_counts_chunk_text_and_its_end_only():
    ids, names, row = row_of(["before", "q one", "between", "q two"],
                             [("a.png", 1), ("b.png", 3)])
    # BOS before | <image> q one <eoc> | <image> q two <eoc> | EOS; "between" joins chunk 1's text
    assert names == ["a.png", "b.png"]
    tokens, targets, loss = row["tokens"], row["targets"], row["loss_mask"]
    real = len(ids) - 1
    np.testing.assert_array_equal(tokens[:real], ids[:-1])
    np.testing.assert_array_equal(targets[:real], ids[1:])
    counted = [int(t) for t, m in zip(targets, loss) if m]
    # Counted: chunk 1's words and its end, chunk 2's words and its end; never BOS's "before",
    # an image token, EOS (after the last end: in no chunk) or padding.
    assert counted.count(END_ID) == 2 and IMAGE_ID not in counted
    assert 2 not in counted and not loss[real:].any()
    assert int(loss.sum()) == 3 + 1 + 2 + 1  # "q one between" + end, "q two" + end
    assert targets[0] == ids[1] and not loss[0]  # "before" (before the first image)
    assert row["num_images"] == 2 and not row["truncated"]


def test_text_after_an_end_of_chunk_waits_for_the_next_image():
    ids = np.array([1, IMAGE_ID, 10, 11, END_ID, 12, 13, IMAGE_ID, 14, END_ID, 2])
    mask = interleaved.chunk_loss_mask(ids, IMAGE_ID, END_ID)
    np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0])


def test_truncation_at_max_images_and_max_len():
    ids, _, row = row_of(["a b", "c d", "e f"], [("1.png", 0), ("2.png", 1), ("3.png", 2)],
                         max_images=2)
    assert row["truncated"] and row["num_images"] == 2
    assert IMAGE_ID not in row["targets"][row["loss_mask"]]
    assert list(row["tokens"]).count(IMAGE_ID) == 2
    _, _, short = row_of(["a b c d e f g h"], [("1.png", 0)], max_len=5)
    assert short["truncated"] and short["tokens"].shape == (5,)
    # ids cut to BOS <image> a b c d: the targets <image> a b c d, all but the image counted
    assert short["loss_mask"].sum() == 4


def test_a_document_whose_targets_are_all_cut_gives_no_row():
    _, _, row = row_of(["long text before the image", "x"], [("1.png", 1)], max_len=4)
    assert row is None


@pytest.fixture
def mmc4_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * index, np.uint8)).save(images / f"{index}.png")
    (images / "corrupt.png").write_bytes(b"not a png")
    docs = [doc(["q zero", "q one"], [("0.png", 0), ("1.png", 1)]),
            doc(["q two"], [("2.png", 0)]),
            doc(["text only"], []),
            doc(["q gone"], [("missing.png", 0)]),
            doc(["q bad"], [("corrupt.png", 0)]),
            doc(["q three", "q four", "q five"], [("3.png", 0), ("4.png", 1), ("5.png", 2)])]
    with open(tmp_path / "docs.jsonl", "w") as file:
        for d in docs:
            file.write(json.dumps(d) + "\n")
        file.write("{not json\n")
    return tmp_path


def pipeline(mmc4_dir, state=None, batch=2):
    data = dict(source="mmc4", json_path=str(mmc4_dir / "docs.jsonl"),
                image_dir=str(mmc4_dir / "images"))
    config = dict(global_batch_size=batch, image_size=4, max_len=16, max_images=3,
                  tokenizer="unused", seed=3)
    import ml_collections
    return interleaved.InterleavedPipeline(
        ml_collections.ConfigDict(data), ml_collections.ConfigDict(config),
        image_token_id=IMAGE_ID, end_of_chunk_id=END_ID, state=state,
        tokenizer=WordTokenizer())


def test_pipeline_batches_images_masks_and_counts_skips(mmc4_dir):
    data = pipeline(mmc4_dir)
    batches = [next(data) for _ in range(3)]  # 6 usable rows: a whole pass
    batch = batches[0]
    assert batch["tokens"].shape == (2, 16) and batch["images"].shape == (2, 3, 4, 4, 3)
    assert batch["image_mask"].shape == (2, 16, 3)
    for b in batches:
        np.testing.assert_array_equal(b["image_mask"], media_mask_from_tokens(
            b["tokens"], IMAGE_ID, 3, END_ID, xp=np))
        for row in range(2):
            count = int((b["tokens"][row] == IMAGE_ID).sum())
            assert not b["images"][row, count:].any()  # no image past the row's own
            # An image of value v/255 in [-1, 1]: the grey level of its file.
            levels = {round(float(b["images"][row, i].mean()), 3) for i in range(count)}
            assert levels <= {round(40 * k / 255 * 2 - 1, 3) for k in range(6)}
    # 3 usable documents of 7: 6 rows are two passes, so every bad one was met at least once,
    # and every document read is a row or a counted skip.
    skips = data.skip_counts
    assert min(skips[r] for r in ("no_image", "missing_image_file", "corrupt_image",
                                  "bad_json")) >= 1
    state = data.get_state()
    read = state["epoch"] * 7 + state["position"]
    assert read == 6 + sum(skips[r] for r in interleaved.SKIP_REASONS)
    assert all(b["loss_mask"].any(axis=1).all() for b in batches)


def test_pipeline_resumes_exactly(mmc4_dir):
    data = pipeline(mmc4_dir)
    next(data)
    state = data.get_state()
    expected = [next(data) for _ in range(4)]  # across the epoch boundary
    resumed = pipeline(mmc4_dir, state=state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_pipeline_config_errors(mmc4_dir):
    import ml_collections
    from vlmjax.config import ConfigError
    with pytest.raises(ConfigError, match=r"data.source='llava_json': interleaved training "
                                          r"reads 'mmc4'"):
        interleaved.validate_data(ml_collections.ConfigDict(dict(source="llava_json")))
    with pytest.raises(ConfigError, match=r"input.max_images must be an integer >= 1"):
        interleaved.validate_input(ml_collections.ConfigDict(dict(
            global_batch_size=2, image_size=4, max_len=8, max_images=0, tokenizer="t")))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['pack'\]"):
        interleaved.validate_input(ml_collections.ConfigDict(dict(pack=True)))


def test_vlm_shapes_mmc4_export(shapes_builder, tmp_path):
    counts = export.export_mmc4(shapes_builder, str(tmp_path), "train", limit=20, max_images=3,
                                caption_fraction=0.0)
    with open(tmp_path / "train_mmc4.jsonl") as file:
        docs = [json.loads(line) for line in file]
    assert counts == {"images": 20, "documents": len(docs)}
    assert all(1 <= len(d["image_info"]) <= 3 for d in docs)
    for d in docs:
        for info in d["image_info"]:
            assert os.path.exists(tmp_path / "images" / info["image_name"])
            sentence = d["text_list"][info["matched_text_index"]]
            assert sentence.startswith("Q: ") and " A: " in sentence
    # The images are the split's in order, each once.
    names = [i["image_name"] for d in docs for i in d["image_info"]]
    assert len(set(names)) == 20


def test_mmc4_question_weights_pick_the_weighted_types():
    from vlmjax.data.shapes_text import QA_TYPES
    example = {"qa": {"question": [f"{t}?".encode() for t in QA_TYPES],
                      "answer": [b"x"] * len(QA_TYPES), "type": np.arange(len(QA_TYPES))}}
    weights = export.parse_question_weights("colour=10, shape=10")
    assert weights == {"colour": 10.0, "shape": 10.0}

    def asked(question_weights):
        rng = np.random.default_rng(0)
        sentences = [export.mmc4_sentence(example, rng, 0.0, question_weights)
                     for _ in range(2000)]
        return np.mean([s.startswith(("Q: colour?", "Q: shape?")) for s in sentences])

    # 20 of 24 weight units (four other types at 1) vs 2 of the 6 types
    assert abs(asked(weights) - 20 / 24) < 0.03 and abs(asked(None) - 2 / 6) < 0.03
    for bad in ("size=2", "colour=0", "colour=many", "colour"):
        with pytest.raises(ValueError, match="TYPE=POSITIVE_NUMBER.*colour, shape, count"):
            export.parse_question_weights(bad)
