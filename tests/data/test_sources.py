"""Sources: path expansion, tar streaming, and each source's records (bad data as placeholders)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.conftest import BAD_SAMPLES, image_bytes
from vlmjax.data import skips, sources, webdataset


def _records(source, process_index=0, process_count=1):
    return list(source.records(process_index, process_count, training=False,
                               seed=0).as_numpy_iterator())


def _reasons(records):
    return [skips.SKIP_REASONS[r["_skip_reason"]] for r in records]


def test_expand_braces():
    assert webdataset.expand_braces("d/s-{0008..0010}.tar") == [
        "d/s-0008.tar", "d/s-0009.tar", "d/s-0010.tar"]
    assert webdataset.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert webdataset.expand_braces("plain.tar") == ["plain.tar"]


def test_expand_paths_globs_braces_and_lists(good_shards):
    d = str(good_shards)
    expected = [f"{d}/part0-000000.tar", f"{d}/part1-000000.tar"]
    assert webdataset.expand_paths(f"{d}/part*-*.tar") == expected
    assert webdataset.expand_paths(f"{d}/part{{0..1}}-000000.tar") == expected
    assert webdataset.expand_paths(f"{d}/part1-000000.tar,{d}/part*.tar") == expected[::-1]
    assert webdataset.expand_paths([f"{d}/none-*.tar"]) == []


def test_tar_samples_grouped_by_key(good_shards):
    samples = list(webdataset.iter_tar_samples(str(good_shards / "part0-000000.tar")))
    assert [s.key for s in samples] == [f"sample{i:04d}" for i in range(10)]
    assert set(samples[3].files) == {"jpg", "txt", "json"}
    assert samples[3].files["txt"] == b"a photo of thing number 3"


def test_truncated_and_missing_tar_report_problems(bad_shards, tmp_path):
    items = list(webdataset.iter_tar_samples(str(bad_shards / "truncated-000000.tar")))
    assert [i.key for i in items[:-1]] == ["tail00", "tail01", "tail02"]
    assert isinstance(items[-1], webdataset.TarProblem) and items[-1].reason == "truncated_tar"
    missing = list(webdataset.iter_tar_samples(str(tmp_path / "nope.tar")))
    assert len(missing) == 1 and missing[0].reason == "unreadable_file"


def test_shard_writer_splits_into_shards(tmp_path):
    with webdataset.ShardWriter(str(tmp_path), prefix="x", max_samples=3) as writer:
        for i in range(7):
            writer.write(f"k{i}", {"txt": b"t"})
    assert [p.split("/")[-1] for p in writer.paths] == ["x-000000.tar", "x-000001.tar",
                                                        "x-000002.tar"]
    counts = [len(list(webdataset.iter_tar_samples(p))) for p in writer.paths]
    assert counts == [3, 3, 1]


def test_webdataset_source_records_and_labels(good_shards):
    source = sources.WebdatasetSource(paths=f"{good_shards}/part*.tar", label_field="label")
    records = _records(source)
    assert len(records) == 20 and set(_reasons(records)) == {"ok"}
    by_key = {r["key"].decode(): r for r in records}
    assert by_key["sample0013"]["label"] == 13
    assert list(by_key["sample0013"]["texts"]) == [b"a photo of thing number 13"]
    assert by_key["sample0013"]["image"] == image_bytes(53, 43)
    assert source.num_records(0, 1) == 20


def test_webdataset_source_host_split_by_file(good_shards):
    source = sources.WebdatasetSource(paths=f"{good_shards}/part*.tar")
    keys = [{r["key"] for r in _records(source, i, 2)} for i in range(2)]
    assert len(keys[0]) == len(keys[1]) == 10 and not keys[0] & keys[1]
    with pytest.raises(ValueError, match="2 shard.*3 processes"):
        source.host_files(0, 3)


def test_webdataset_source_turns_bad_samples_into_placeholders(bad_shards):
    source = sources.WebdatasetSource(paths=f"{bad_shards}/*.tar")
    reasons = _reasons(_records(source))
    expected = {reason for _, reason in BAD_SAMPLES.values()} - {"corrupt_image"}
    assert set(reasons) == {"ok", "truncated_tar"} | expected
    assert reasons.count("ok") == 6 + 1 + 3  # good + the truncated jpeg (header is fine) + tail
    assert reasons.count("truncated_tar") == 1


def test_no_files_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        sources.WebdatasetSource(paths=f"{tmp_path}/shard-{{000..009}}.tar*")


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "images" / name).write_bytes(image_bytes(24, 16, fmt="PNG"))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\x00\x01 not an image")
    return tmp_path


def test_llava_json_source(image_folder):
    entries = [
        {"id": "one", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A red square."}]},
        {"id": "two", "image": "missing.jpg", "conversations": [{"from": "gpt", "value": "x y"}]},
        {"id": "three", "conversations": [{"from": "gpt", "value": "text only"}]},
        {"id": "four", "image": "b.png", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "five", "image": "broken.jpg", "conversations": [{"from": "gpt", "value": "a"}]},
        {"id": "six", "image": "b.png", "conversations": "not a list"},
    ]
    path = image_folder / "data.json"
    path.write_text(json.dumps(entries))
    source = sources.LlavaJsonSource(str(path), str(image_folder / "images"))
    records = _records(source)
    assert _reasons(records) == ["ok", "missing_image_file", "missing_image", "missing_text",
                                 "undecodable_image", "bad_json"]
    assert list(records[0]["texts"]) == [b"A red square."]
    assert json.loads(records[0]["conversation"])[0]["value"] == "<image>\nDescribe it."
    assert [r["key"] for r in _records(source, 1, 2)] == [b"two", b"four", b"six"]
    assert source.num_records(1, 2) == 3


def test_llava_json_question_types_select_entries(image_folder):
    def entry(name, types):
        return {"id": name, "image": "a.jpg", "question_types": types,
                "conversations": [{"from": "gpt", "value": "red"}]}
    entries = [entry("colour", ["colour"]), entry("count", ["count"]),
               entry("both", ["colour", "shape"]), entry("mixed", ["colour", "count"]),
               {"id": "untyped", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]},
               None]  # a bad record is kept, to be counted
    path = image_folder / "typed.json"
    path.write_text(json.dumps(entries))
    chosen = sources.LlavaJsonSource(str(path), str(image_folder / "images"),
                                     question_types=("colour", "shape"))
    assert [r["key"] for r in _records(chosen)][:2] == [b"colour", b"both"]
    assert _reasons(_records(chosen)) == ["ok", "ok", "bad_json"]
    assert len(_records(sources.LlavaJsonSource(str(path), str(image_folder / "images")))) == 6
    with pytest.raises(ValueError, match="typed.json.*no records whose question_types.*'size'"):
        sources.LlavaJsonSource(str(path), str(image_folder), question_types=("size",))


def test_llava_jsonl_skips_lines_that_do_not_parse(image_folder):
    good = json.dumps({"id": "g", "image": "a.jpg",
                       "conversations": [{"from": "gpt", "value": "fine"}]})
    path = image_folder / "data.jsonl"
    path.write_text(f"{good}\n{{broken json\n\n{good}\n")
    assert _reasons(_records(sources.LlavaJsonSource(str(path), str(image_folder / "images")))) \
        == ["ok", "bad_json", "ok"]
    bad = image_folder / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        sources.LlavaJsonSource(str(bad), str(image_folder))


def test_csv_and_tsv_sources(image_folder):
    path = image_folder / "data.tsv"
    path.write_text("image\tcaption\tlabel\na.jpg\ta red square\t3\nnope.jpg\tlost\t1\n"
                    "b.png\t \t2\nb.png\ttoo\tmany\tcolumns\nb.png\tnot a label\tx\n")
    source = sources.CsvSource(str(path), image_dir=str(image_folder / "images"),
                               label_column="label")
    records = _records(source)
    assert _reasons(records) == ["ok", "missing_image_file", "empty_text", "bad_row", "bad_row"]
    assert records[0]["label"] == 3 and list(records[0]["texts"]) == [b"a red square"]
    with pytest.raises(ValueError, match="text_column='text' is not a column.*caption"):
        sources.CsvSource(str(path), text_column="text")


def test_tfds_source_reads_vlm_shapes_per_host(shapes_builder):
    source = sources.TfdsSource(name="vlm_shapes", split="validation", text_key="captions",
                                label_key="label", builder=shapes_builder)
    hosts = [_records(source, i, 3) for i in range(3)]
    assert [len(h) for h in hosts] == [source.num_records(i, 3) for i in range(3)]
    keys = [r["key"] for h in hosts for r in h]
    assert len(keys) == len(set(keys)) == 16
    assert all(len(r["texts"]) == 3 and r["image"][:4] == b"\x89PNG" for h in hosts for r in h)
    assert {int(r["label"]) for h in hosts for r in h} >= {-1}
    with pytest.raises(ValueError, match="label_key='colour' is not a feature"):
        sources.TfdsSource(name="vlm_shapes", label_key="colour", builder=shapes_builder)
    with pytest.raises(ValueError, match="split='dev' is not a split"):
        sources.TfdsSource(name="vlm_shapes", split="dev", builder=shapes_builder)


def test_check_image_reencodes_formats_tf_cannot_decode():
    data, reason = sources.check_image(image_bytes(10, 8, fmt="TIFF"))
    assert reason == "ok" and data[:4] == b"\x89PNG"
    assert sources.check_image(b"garbage") == (b"", "undecodable_image")
    jpeg = image_bytes(10, 8)
    assert sources.check_image(jpeg) == (jpeg, "ok")
    assert np.array_equal(sources.decode_text(b"\xff\xfe"), ("", "bad_text_encoding"))


def test_tfds_source_by_name_and_data_dir(shapes_builder, tfds_dir):
    name = f"vlm_shapes/{shapes_builder.builder_config.name}"
    source = sources.TfdsSource(name=name, data_dir=tfds_dir, split="test_novel",
                                text_key="captions", label_key="label")
    records = _records(source)
    assert len(records) == 10 and all(r["label"] >= 0 for r in records)
    with pytest.raises(ValueError, match="data.name='no_such_dataset'"):
        sources.TfdsSource(name="no_such_dataset", data_dir=tfds_dir)
