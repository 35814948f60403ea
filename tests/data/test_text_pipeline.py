"""Text data for the LM: the text-file source, vlm_shapes / TFDS text, and the LM pipeline's
rows (documents, skip counters, exact resume, evaluation padding)."""
import collections

import ml_collections
import numpy as np
import pytest

from tests.data.conftest import TINY_SIZES
from tests.data.test_lm_rows import documents_of
from tests.data.text_fixtures import lm_input, text_corpus, text_data
from vlmjax.data import pipeline_config, skips, text_files, text_pipeline, tokenizers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory)


def reasons(source, process_index=0, process_count=1):
    records = list(source.records(process_index, process_count, False, 0).as_numpy_iterator())
    return [skips.SKIP_REASONS[r["_skip_reason"]] for r in records], records


def test_text_file_source_reads_documents_and_counts_bad_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([
        b'{"text": "a good document"}', b"{oops", b'{"other": "no text field"}',
        b'{"text": 5}', b'{"text": "   "}', b"", b'{"text": "caf\xe9"}', b"[1, 2]",
        b'{"text": "the last one"}']) + b"\n")
    got, records = reasons(text_files.TextFileSource(paths=str(path)))
    assert got == ["ok", "bad_json", "missing_text", "bad_json", "empty_text",
                   "bad_text_encoding", "missing_text", "ok"]  # the blank line is no record
    assert records[0]["texts"].tolist() == [b"a good document"] and records[0]["image"] == b""
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"first line\n\n  \nsecond \xff line\nthird line\n")
    got, records = reasons(text_files.TextFileSource(paths=str(plain)))
    assert got == ["ok", "bad_text_encoding", "ok"]
    assert records[2]["texts"].tolist() == [b"third line"]
    custom = tmp_path / "custom.txt"  # format="jsonl" reads any file as JSONL
    custom.write_text('{"body": "from another field"}\n')
    _, records = reasons(text_files.TextFileSource(paths=str(custom), text_field="body",
                                                   format="jsonl"))
    assert records[0]["texts"].tolist() == [b"from another field"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_files.TextFileSource(paths=str(tmp_path / "missing.txt"))


def test_text_file_hosts_split_files_or_lines(corpus, tmp_path):
    one_file = text_files.TextFileSource(paths=corpus["train"])
    parts = [reasons(one_file, p, 3)[1] for p in range(3)]  # 1 file, 3 hosts: by line
    keys = [r["key"] for part in parts for r in part]
    assert sorted(keys) == sorted(r["key"] for r in reasons(one_file)[1]) and len(keys) == 60
    assert [one_file.num_records(p, 3) for p in range(3)] == [20, 20, 20]
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"file {i} line one\nfile {i} line two\n")
    files = text_files.TextFileSource(paths=str(tmp_path / "part{0..2}.txt"))
    by_file = [reasons(files, p, 2)[1] for p in range(2)]  # 3 files, 2 hosts: by file
    assert [{r["key"].decode().split(":")[0][-9:] for r in part} for part in by_file] == [
        {"part0.txt", "part2.txt"}, {"part1.txt"}]


def test_text_file_split_and_image_tasks_are_errors(corpus):
    with pytest.raises(ValueError, match=r"data.split: 'validation': source 'text_file' has no "
                                         r"splits"):
        pipeline_config.validate_data_config(text_data(corpus["train"], split="validation"))
    pipeline_config.validate_data_config(text_data(corpus["train"], split="train"))
    with pytest.raises(ValueError, match="without images; it is for text tasks"):
        pipeline_config.make_source(text_data(corpus["train"]), training=True)
    with pytest.raises(ValueError, match=r"data.format: 'csv'"):
        pipeline_config.validate_data_config(text_data(corpus["train"], format="csv"))


def decoded_documents(batches, tokenizer):
    return [tokenizer.decode(document) for batch in batches
            for row in documents_of(batch) for document in row]


def test_training_rows_hold_the_documents_in_stream_order(corpus):
    """Unshuffled, the first batches hold a prefix of the file's documents (BOS/EOS each),
    packed several to a row."""
    tokenizer = tokenizers.load_tokenizer(corpus["tokenizer"])
    with text_pipeline.TextPipeline(text_data(corpus["train_jsonl"]), lm_input(
            corpus["tokenizer"]), training=True, process_index=0, process_count=1) as data:
        batches = [next(data) for _ in range(3)]
        state = data.get_state()
    assert set(batches[0]) == {"tokens", "targets", "loss_mask", "segment_ids"}
    got = decoded_documents(batches, tokenizer)
    assert collections.Counter(got) == collections.Counter(
        corpus["documents"]["train"][:len(got)])
    first_row = documents_of(batches[0])[0]
    assert len(first_row) > 1 and all(d[0] == tokenizer.bos_id and d[-1] == tokenizer.eos_id
                                      for d in first_row)
    assert state["position"] == len(got) and state["document"] == 0  # one document a record


def test_eval_rows_hold_every_document_once_and_count_skips(corpus, tmp_path):
    """Evaluation: one pass, `_mask` on the rows that hold documents; documents of one token
    have no target (skipped and counted), longer ones than max_len are cut (counted); the bad
    lines at the end of the file are counted too."""
    tokenizer = tokenizers.load_tokenizer(corpus["tokenizer"])
    words = corpus["documents"]["valid"] + ["a", " ".join(["red circle"] * 30)]
    path = tmp_path / "eval.txt"
    path.write_bytes("".join(f"{w}\n" for w in words).encode() + b"bad \xff\n")
    config = lm_input(corpus["tokenizer"], add_bos=False, add_eos=False, pack=False)
    with text_pipeline.TextPipeline(text_data(str(path)), config, training=False,
                                    process_index=0, process_count=1) as data:
        batches = list(data)
        counts = data.skip_counts
    lengths = [len(ids) for ids in tokenizer.encode_raw(words)]
    assert lengths[-2] == 1 and lengths[-1] > 24
    assert counts["no_targets"] == 1 and counts["truncated_document"] == 1
    assert counts["bad_text_encoding"] == 1 and sum(counts.values()) == 3
    got = decoded_documents(batches, tokenizer)
    assert got[:-1] == corpus["documents"]["valid"]  # pad mode: one document a row, in order
    assert len(got) == len(words) - 1
    masks = np.concatenate([b["_mask"] for b in batches])
    rows = np.concatenate([b["segment_ids"] for b in batches]).max(axis=1) > 0
    np.testing.assert_array_equal(masks, rows)
    assert masks.sum() == len(got) and not masks[-1]  # the last batch is padded


@pytest.fixture(scope="module")
def shapes_data(shapes_builder, tfds_dir):
    data = pipeline_config.default_data_config()
    data.update(dict(data_dir=tfds_dir, **TINY_SIZES))
    return data


def test_resume_mid_record_gives_the_uninterrupted_batches(shapes_data):
    """vlm_shapes captions + QA: ~9 documents a record, so batches end inside records; a
    pipeline rebuilt from any saved state continues with exactly the same batches."""
    config = lm_input("vlm_shapes", documents="texts_as_documents|qa_documents",
                      shuffle_buffer=16, max_len=32, special_tokens=["<|im_start|>"])

    def make(state=None):
        return text_pipeline.TextPipeline(shapes_data, config, training=True, process_index=0,
                                          process_count=1, state=state)
    with make() as data:
        reference, states = [], []
        for _ in range(8):
            reference.append(next(data))
            states.append(data.get_state())
    assert any(s["document"] > 0 for s in states)  # some batch ended inside a record
    for cut in (1, 4):
        with make(states[cut - 1]) as resumed:
            for want in reference[cut:cut + 3]:
                got = next(resumed)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="another data/input config"):
        text_pipeline.TextPipeline(shapes_data, lm_input("vlm_shapes", max_len=16),
                                   training=True, process_index=0, process_count=1,
                                   state=states[0])


def test_vlm_shapes_documents_and_special_tokens(shapes_data):
    config = lm_input("vlm_shapes", documents="texts_as_documents|qa_documents|cot_documents",
                      max_len=128, special_tokens=list(tokenizers.VLM_SHAPES_LM_TOKENS),
                      pack=False, global_batch_size=32)
    data_config = ml_collections.ConfigDict(dict(shapes_data.to_dict(), split="validation"))
    with text_pipeline.TextPipeline(data_config, config, training=False, process_index=0,
                                    process_count=1, vocab_size=512) as data:
        tokenizer = data.tokenizer
        texts = decoded_documents(list(data), tokenizer)
    qa = [t for t in texts if t.startswith("Q: ")]
    cot = [t for t in qa if "<SUMMARY>" in t]
    assert len(texts) > 16 * 9 and len(qa) - len(cot) == len(cot)  # one QA and one CoT a pair
    assert any(t.endswith(" A: yes") or t.endswith(" A: no") for t in qa)
    for token in ("<|im_start|>", "<|im_end|>", "[ENC]", "[DEC]", "<image>", "<SUMMARY>"):
        ids = tokenizer.encode_raw([f"a {token} b"])[0]
        assert tokenizer.special_tokens[token] in ids and len(ids) <= 6, token  # never split
    assert tokenizer.vocab_size <= 512
    with pytest.raises(ValueError, match="more than model.vocab_size=300"):
        text_pipeline.TextPipeline(data_config, config, training=False, process_index=0,
                                   process_count=1, vocab_size=300)


def test_tfds_text_feature_through_the_tfds_source(shapes_builder, tfds_dir):
    """Any TFDS text feature: here vlm_shapes' `boxes_context`, read without its images."""
    data = ml_collections.ConfigDict(dict(
        source="tfds", name=f"vlm_shapes/{shapes_builder.builder_config.name}",
        data_dir=tfds_dir, split="test_novel", text_key="boxes_context"))
    with text_pipeline.TextPipeline(data, lm_input("vlm_shapes", max_len=64), training=False,
                                    process_index=0, process_count=1,
                                    tokenizer=tokenizers.load_tokenizer(
                                        f"{shapes_builder.data_dir}/vlm_shapes_sp.model")) as it:
        texts = decoded_documents(list(it), it.tokenizer)
    want = [r["boxes_context"].decode() for r in shapes_builder.as_dataset(
        split="test_novel").as_numpy_iterator()]
    assert sorted(texts) == sorted(want) and len(texts) == TINY_SIZES["novel_size"]


def test_lm_input_config_errors(corpus):
    with pytest.raises(ValueError, match=r"input: unknown key\(s\) \['max_length'\]"):
        text_pipeline.validate_lm_input(lm_input("x", max_length=3))
    with pytest.raises(ValueError, match=r"input.documents='caption_first' must name"):
        text_pipeline.validate_lm_input(lm_input("x", documents="caption_first"))
    with pytest.raises(ValueError, match=r"input.max_len: 1 must be an integer >= 2"):
        text_pipeline.validate_lm_input(lm_input("x", max_len=1))
    with pytest.raises(ValueError, match=r"input.pack: 'yes' must be True or False"):
        text_pipeline.validate_lm_input(ml_collections.ConfigDict(dict(
            lm_input("x").to_dict(), pack="yes")))


def test_scene_documents_put_a_caption_before_its_answered_questions():
    from vlmjax.data import ops
    from vlmjax.data.tf_cpu import tf
    op = ops.get_op("scene_documents").factory()
    example = {"texts": tf.constant([" a red circle on the left. ", "another caption"]),
               "questions": tf.constant(["What colour is the circle?", "How many objects?"]),
               "answers": tf.constant(["red", "one"]),
               "documents": tf.constant(["earlier"])}
    documents = [d.decode() for d in op(example)["documents"].numpy()]
    assert documents == ["earlier", "a red circle on the left. Q: What colour is the circle? "
                                    "A: red Q: How many objects? A: one"]


def test_scene_documents_can_start_with_the_scene_description_instead():
    from vlmjax.data import ops
    from vlmjax.data.tf_cpu import tf
    op = ops.get_op("scene_documents").factory(scene_text="description")
    example = {"texts": tf.constant(["a disk"]),
               "questions": tf.constant(["Where is the red circle?"]),
               "answers": tf.constant(["left"]),
               "cot_answers": tf.constant([
                   "<SUMMARY>To answer, I will look.</SUMMARY><CAPTION>The image shows a large "
                   "red circle on the left.</CAPTION><REASONING>It is left.</REASONING>"
                   "<CONCLUSION>left</CONCLUSION>"])}
    documents = [d.decode() for d in op(example)["documents"].numpy()]
    assert documents == ["The image shows a large red circle on the left. Q: Where is the red "
                         "circle? A: left"]
    with pytest.raises(ValueError, match="scene_text 'boxes' is not one of"):
        ops.get_op("scene_documents").factory(scene_text="boxes")
