"""The llava task's input pipeline on vlm_shapes' LLaVA export: the loss mask holds exactly the
assistant answers, bad samples are skipped and counted, text-only entries get no image, and a
resumed stream is the uninterrupted one."""
import json

import ml_collections
import numpy as np
import pytest

from vlmjax.data import export, llava_pipeline, shapes, tokenizers

T = 4  # image tokens per image (the pipeline takes the model's count as given)
IM_END = "<|im_end|>"
IMAGE_ID = 4  # <image> in tokenizers.VLM_SHAPES_LM_TOKENS


def long_answer() -> str:
    return " ".join(["the red circle is on the left"] * 30)


@pytest.fixture(scope="module")
def llava_files(shapes_builder, tmp_path_factory):
    """{"clean": 12 conversation entries, "mixed": them with bad, text-only and long entries
    in between, "entries": the mixed list, "image_dir", "tokenizer"}."""
    out = tmp_path_factory.mktemp("llava_export")
    export.export_llava(shapes_builder, str(out), "train", kinds=("conversation",), limit=12)
    clean = json.loads((out / "train_conversation.json").read_text())
    image = clean[0]["image"]
    human = {"from": "human", "value": "<image>\nWhat colour is the circle?"}
    extra = [
        {"id": "no_answer", "image": image, "conversations": [human]},          # missing_text
        "not a record",                                                          # bad_json
        {"id": "robot", "image": image, "conversations": [
            human, {"from": "robot", "value": "beep"}, {"from": "gpt", "value": "red"}]},
        {"id": "leading", "image": image, "conversations": [                    # no_targets
            {"from": "gpt", "value": "hello"}, human]},
        {"id": "text_only", "conversations": [
            {"from": "human", "value": "How many sides has a square?"},
            {"from": "gpt", "value": "four"}]},
        {"id": "long", "image": image, "conversations": [                       # truncated
            human, {"from": "gpt", "value": long_answer()}]},
        {"id": "gone", "image": "nowhere.png", "conversations": [               # missing file
            human, {"from": "gpt", "value": "red"}]},
    ]
    mixed = clean[:4] + extra[:4] + clean[4:8] + extra[4:] + clean[8:]
    (out / "mixed.json").write_text(json.dumps(mixed))
    return {"clean": str(out / "train_conversation.json"), "mixed": str(out / "mixed.json"),
            "entries": mixed, "image_dir": str(out / "images"),
            "tokenizer": shapes.tokenizer_path(shapes_builder)}


def data_config(files, name="mixed"):
    return ml_collections.ConfigDict(dict(source="llava_json", json_path=files[name],
                                          image_dir=files["image_dir"]))


def input_config(files, **overrides):
    config = llava_pipeline.default_llava_input_config()
    config.update(dict(global_batch_size=4, image_size=32, max_len=192, template="chatml",
                       tokenizer=files["tokenizer"], shuffle_buffer=64,
                       special_tokens=list(tokenizers.VLM_SHAPES_LM_TOKENS)))
    config.update(overrides)
    return config


def make(files, training, state=None, **overrides):
    return llava_pipeline.LlavaPipeline(
        data_config(files), input_config(files, **overrides), training=training,
        num_image_tokens=T, process_index=0, process_count=1, state=state)


def expected_targets(entry, tokenizer):
    """The ids of every answer and its end of turn: what the loss mask may hold, in order."""
    turns = entry["conversations"]
    while turns and turns[0]["from"] == "gpt":  # leading answers are dropped, as LLaVA does
        turns = turns[1:]
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    return [i for ids in tokenizer.encode_raw([a + IM_END for a in answers]) for i in ids]


def test_eval_rows_train_on_the_answers_only_and_count_what_they_skip(llava_files):
    with make(llava_files, training=False) as data:
        batches = list(data)
        counts = data.skip_counts
        tokenizer = data.tokenizer
    assert set(batches[0]) == {"tokens", "targets", "loss_mask", "segment_ids", "image", "_mask"}
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    real = rows["_mask"]
    kept = [e for e in llava_files["entries"] if isinstance(e, dict)
            and e["id"] not in ("no_answer", "robot", "leading", "gone")]
    assert real.sum() == len(kept) == 14 and not real[len(kept):].any()  # padded last batch
    image_id = tokenizer.token_id("<image>")
    for row, entry in enumerate(kept):
        mask = rows["loss_mask"][row]
        got = rows["targets"][row][mask].tolist()
        want = expected_targets(entry, tokenizer)
        if entry["id"] == "long":  # cut at max_len: the answer's first part
            assert len(got) < len(want) and got == want[:len(got)] and len(got) > 10
        else:
            assert got == want, entry["id"]
        length = int(rows["segment_ids"][row].sum())
        assert (rows["segment_ids"][row][:length] == 1).all() and not mask[length - 1:].any()
        np.testing.assert_array_equal(rows["targets"][row][:length - 1],
                                      rows["tokens"][row][1:length])
        has_image = "image" in entry
        assert (rows["tokens"][row] == image_id).sum() == (T if has_image else 0)
        assert (np.abs(rows["image"][row]).max() > 0) == has_image  # text-only: zeros
    assert not rows["loss_mask"][~real].any() and not rows["segment_ids"][~real].any()
    assert {k: v for k, v in counts.items() if v} == {
        "missing_text": 1, "bad_json": 2, "no_targets": 1, "truncated_conversation": 1,
        "missing_image_file": 1}


@pytest.mark.parametrize("pack", [False, True])
def test_resumed_training_stream_equals_the_uninterrupted_one(llava_files, pack):
    """Shuffled, over epochs and the skipped samples: batches after a saved state are those
    that would have come, and the skip counts agree (packed too: a batch can end with a
    sample that did not fit, which then opens the next one)."""
    packing = dict(pack=True, max_len=400, images_per_row=2) if pack else {}
    with make(llava_files, training=True, **packing) as data:
        full = [next(data) for _ in range(6)]
        full_counts = data.skip_counts
    with make(llava_files, training=True, **packing) as data:
        first = [next(data) for _ in range(2)]
        state = json.loads(json.dumps(data.get_state()))
    with make(llava_files, training=True, state=state, **packing) as data:
        rest = [next(data) for _ in range(4)]
        rest_counts = data.skip_counts
    for a, b in zip(full, first + rest):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert rest_counts == full_counts and full_counts["no_targets"] >= 1  # past an epoch


def segments(batch):
    """(tokens, targets, loss_mask, image or None) of every sample of a batch, in order."""
    out = []
    for row in range(len(batch["tokens"])):
        ids = batch["segment_ids"][row]
        slot = 0
        for segment in range(1, int(ids.max()) + 1):
            where = ids == segment
            has_image = bool((batch["tokens"][row][where] == IMAGE_ID).any())
            image = None
            if has_image:
                image = batch["image"][row, slot] if batch["image"].ndim == 5 else (
                    batch["image"][row])
                slot += 1
            out.append((batch["tokens"][row][where], batch["targets"][row][where],
                        batch["loss_mask"][row][where], image))
    return out


def test_packed_rows_hold_the_unpacked_samples_in_order(llava_files):
    with make(llava_files, training=True, max_len=400) as data:
        unpacked = [s for _ in range(8) for s in segments(next(data))]
    with make(llava_files, training=True, pack=True, max_len=400, images_per_row=2) as data:
        batches = [next(data) for _ in range(2)]
    assert batches[0]["image"].shape == (4, 2, 32, 32, 3)
    packed = [s for b in batches for s in segments(b)]
    per_row = [int(b["segment_ids"][r].max()) for b in batches for r in range(4)]
    assert max(per_row) >= 2 and len(packed) > 8  # more samples than rows
    for (tokens, targets, mask, image), want in zip(packed, unpacked, strict=False):
        np.testing.assert_array_equal(tokens, want[0])
        np.testing.assert_array_equal(targets, want[1])
        np.testing.assert_array_equal(mask, want[2])
        assert (image is None) == (want[3] is None)
        if image is not None:
            np.testing.assert_array_equal(image, want[3])
    for batch in batches:  # within each row: at most images_per_row images, pads after
        images = (batch["tokens"] == IMAGE_ID).sum(axis=1) // T
        assert (images <= 2).all()
        assert not np.abs(batch["image"][images == 1][:, 1]).any()


@pytest.mark.parametrize("overrides, kwargs, message", [
    (dict(preprocess="resize|flip|value_range"), {}, r"\['flip'\] do not apply"),
    (dict(special_tokens=["<image>"]), {},
     r"needs '<\|im_start\|>' as one token"),
    ({}, dict(image_token_id=7), r"tokenizer's id of '<image>' is 4, and model.image_token_id "
                                 r"is 7"),
    ({}, dict(vocab_size=100), r"more than the LLM's vocab_size=100"),
    (dict(max_len=4), {}, r"input.max_len=4 leaves no room"),
    (dict(tokenizer="vlm_shapes"), {}, r"give the LLM's tokenizer file"),
    (dict(max_length=9), {}, r"unknown key\(s\) \['max_length'\]"),
    (dict(images_per_row=-1), {}, r"input.images_per_row: -1 must be an integer >= 0"),
])
def test_bad_settings_are_errors_before_any_record_is_read(llava_files, overrides, kwargs,
                                                           message):
    with pytest.raises(ValueError, match=message):
        llava_pipeline.LlavaPipeline(
            data_config(llava_files), input_config(llava_files, **overrides), training=True,
            num_image_tokens=T, process_index=0, process_count=1, **kwargs)


def test_sources_without_conversations_are_an_error(llava_files):
    data = ml_collections.ConfigDict(dict(source="vlm_shapes", split="train"))
    with pytest.raises(ValueError, match=r"data.source: \['vlm_shapes'\] hold no conversations"):
        llava_pipeline.LlavaPipeline(data, input_config(llava_files), training=True,
                                     num_image_tokens=T, process_index=0, process_count=1)
