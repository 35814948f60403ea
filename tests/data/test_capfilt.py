"""CapFilt (vlmjax.data.capfilt) with a tiny BLIP trainer workdir (configs/blip/tiny.py:runlocal,
trained for 2 steps once per module) on shards of its vlm_shapes test split: what is kept at the
threshold's extremes and at a threshold in the middle (checked against the ITM head called
directly), reproducible nucleus sampling, the noise scores, bad samples and bad workdirs; and
the HF export of the run (`python -m vlmjax.convert export`)."""
from __future__ import annotations

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.data.conftest import image_bytes, truncated_jpeg
from vlmjax import config as config_lib
from vlmjax.data import capfilt, export, shapes, webdataset
from vlmjax.evals.data import EvalData
from vlmjax.train import trainer

MAX_NEW_TOKENS = 8
# Small runs: the untrained run captions with garbage up to MAX_NEW_TOKENS, which is all it takes.
SETTINGS = dict(prompt="", max_new_tokens=MAX_NEW_TOKENS, samples_per_shard=100)


@pytest.fixture(scope="module")
def blip_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("capfilt")
    config = config_lib.load_config("configs/blip/tiny.py:runlocal,image=vit,swaps=0")
    config.evals = {}
    # A patch-stem ViT (HF BLIP's) so that the run also exports to HF (test at the end).
    config_lib.apply_overrides(config, [f"data.data_dir={base}/tfds", "total_steps=2",
                                        "model.image.stem='patch'"])
    trainer.train(config, str(base / "blip"))
    builder = shapes.make_builder("64px", f"{base}/tfds", train_size=config.data.train_size,
                                  eval_size=config.data.eval_size,
                                  novel_size=config.data.novel_size)
    export.export(builder, str(base / "wds"), split="test", samples_per_shard=16)  # 32 images
    return types.SimpleNamespace(base=base, workdir=str(base / "blip"), config=config,
                                 shards=f"{base}/wds/test-*.tar",
                                 first_shard=f"{base}/wds/test-000000.tar")


@pytest.fixture(scope="module")
def model(blip_run):
    return capfilt.load_model(blip_run.workdir, batch_size=16)


def run(source, out, model, **settings):
    return capfilt.run(source, str(out), model, capfilt.Settings(**{**SETTINGS, **settings}),
                       log=lambda _: None)


def written(report) -> dict:
    """key -> (caption, json) of every written sample."""
    return {s.key: (s.files["txt"].decode(), json.loads(s.files["json"]))
            for path in report["shards"] for s in webdataset.iter_tar_samples(path)}


def input_keys(pattern) -> list[str]:
    return [s.key for p in webdataset.expand_paths(pattern) for s in webdataset.iter_tar_samples(p)]


def test_threshold_zero_keeps_every_caption_and_one_keeps_none(blip_run, model, tmp_path):
    report = run(blip_run.shards, tmp_path / "all", model, threshold=0.0)
    keys = input_keys(blip_run.shards)
    assert report["total"] == report["images"] == len(keys) == 32
    assert report["web"] == {"kept": 32, "dropped": 0}
    synthetic = report["synthetic"]
    assert synthetic["kept"] + synthetic["empty"] == 32
    assert synthetic["dropped"] == synthetic["empty"]
    out = written(report)
    assert report["written"] == len(out) == 32 + synthetic["kept"]
    assert {k for k in out if k.endswith("_web")} == {k + "_web" for k in keys}
    for key, (caption, metadata) in out.items():
        source = "web" if key.endswith("_web") else "synthetic"
        assert metadata["source"] == source and metadata["input_key"] + capfilt.KEY_SUFFIX[
            source] == key and metadata["noise"] == "clean" and caption
        assert 0.0 < metadata["itm_probability"] < 1.0
    assert json.load(open(tmp_path / "all" / "capfilt_report.json")) == json.loads(
        json.dumps(report))

    report = run(blip_run.shards, tmp_path / "none", model, threshold=1.0)
    assert report["web"]["kept"] == report["synthetic"]["kept"] == report["written"] == 0
    assert report["images_without_caption"] == 32 and report["shards"] == []
    with pytest.raises(ValueError, match="threshold"):
        capfilt.Settings(threshold=1.5).check()


def test_kept_captions_are_those_the_itm_head_matches(blip_run, model, tmp_path):
    """ITM p(match) from the model directly, on images and texts the evaluators' data path
    prepares: the web captions kept at the median probability are exactly those above it."""
    input_config = blip_run.config.input
    data = EvalData(ml_collections.ConfigDict(dict(source="webdataset",
                                                   paths=blip_run.first_shard)),
                    input_config, blip_run.config.data)
    (batch, captions), = list(data.batches(16))
    captions = [texts[0] for texts in captions]
    ids, mask = data.tokenize(captions)
    blip, token_ids = model.eval_model.model, model.eval_model.token_ids
    logits = blip.apply({"params": model.params}, jnp.asarray(batch["image"]),
                        jnp.asarray(ids).at[:, 0].set(token_ids["enc"]), jnp.asarray(mask),
                        method=blip.itm_logits)
    probability = np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1], np.float64)
    keys = input_keys(blip_run.first_shard)
    threshold = float(np.median(probability))
    expected = {key + "_web" for key, p in zip(keys, probability) if p > threshold}
    assert 0 < len(expected) < 16

    report = run(blip_run.first_shard, tmp_path / "out", model, threshold=threshold)
    out = written(report)
    assert {k for k in out if k.endswith("_web")} == expected
    assert report["web"]["kept"] == len(expected)
    for key, p, caption in zip(keys, probability, captions):
        if key + "_web" in out:
            assert out[key + "_web"][0] == caption
            assert out[key + "_web"][1]["itm_probability"] == pytest.approx(p, abs=1e-5)
    synthetic = [(caption, meta) for key, (caption, meta) in out.items() if key.endswith("_syn")]
    assert all(meta["itm_probability"] > threshold for _, meta in synthetic)
    kept_images = {meta["input_key"] for _, meta in out.values()}
    assert report["images_without_caption"] == 16 - len(kept_images)


def test_nucleus_sampling_is_reproducible_and_tiny_top_p_is_greedy(blip_run, model, tmp_path):
    images = np.stack([model.load_image(s.files["png"])
                       for s in webdataset.iter_tar_samples(blip_run.first_shard)])
    caption = lambda **kw: model.eval_model.caption(  # noqa: E731
        model.params, images, prompt="", max_new_tokens=MAX_NEW_TOKENS, **kw)
    first = caption(top_p=0.9, rng=jax.random.PRNGKey(0))
    assert caption(top_p=0.9, rng=jax.random.PRNGKey(0)) == first
    assert caption(top_p=0.9, rng=jax.random.PRNGKey(1)) != first
    greedy = caption()
    assert greedy != first
    assert caption(top_p=1e-6, rng=jax.random.PRNGKey(1)) == greedy
    assert model.eval_model.answer(model.params, images, max_new_tokens=MAX_NEW_TOKENS) == greedy
    with pytest.raises(ValueError, match="needs an rng"):
        caption(top_p=0.9)

    def synthetic(seed, name):
        report = run(blip_run.first_shard, tmp_path / name, model, threshold=0.0, seed=seed)
        return {k: c for k, (c, _) in written(report).items() if k.endswith("_syn")}
    assert synthetic(0, "a") == synthetic(0, "b") != synthetic(1, "c")


def test_noise_scores_arithmetic():
    kinds = ["clean"] * 4 + ["swapped"] * 3 + ["gibberish", "size_string"]
    dropped = [True, False, False, False, True, True, False, True, False]
    scores = capfilt.noise_scores(kinds, dropped)
    assert scores["captions"] == 9 and scores["dropped"] == 4
    assert scores["swapped"] == {"captions": 3, "dropped": 2, "precision": 0.5, "recall": 2 / 3}
    assert scores["text_junk"] == {"captions": 2, "dropped": 1, "precision": 0.25,
                                   "recall": 0.5}
    assert scores["all_noise"] == {"captions": 5, "dropped": 3, "precision": 0.75,
                                   "recall": 0.6}
    assert scores["clean"] == {"captions": 4, "dropped": 1, "drop_rate": 0.25}
    assert scores["by_kind"]["gibberish"] == {"captions": 1, "dropped": 1}
    none = capfilt.noise_scores(["clean", "clean"], [False, False])
    assert none["swapped"] == {"captions": 0, "dropped": 0, "precision": None, "recall": None}


def test_cli_scores_the_filter_against_the_noise_field(blip_run, model, tmp_path, capsys):
    kinds = ("clean", "swapped", "gibberish")
    with webdataset.ShardWriter(str(tmp_path / "in"), prefix="noisy") as writer:
        for i, sample in enumerate(webdataset.iter_tar_samples(blip_run.first_shard)):
            metadata = {**json.loads(sample.files["json"]), "noise": kinds[i % 3]}
            writer.write(sample.key, {**sample.files, "json": json.dumps(metadata).encode()})
    # A threshold that drops about half of the web captions: their median probability.
    probabilities = [meta["itm_probability"] for key, (_, meta) in written(
        run(f"{tmp_path}/in/*.tar", tmp_path / "all", model, threshold=0.0)).items()
        if key.endswith("_web")]
    threshold = float(np.median(probabilities))
    report = capfilt.run(f"{tmp_path}/in/*.tar", str(tmp_path / "out"), model,
                         capfilt.Settings(**{**SETTINGS, "threshold": threshold}))
    kept = {meta["input_key"] for key, (_, meta) in written(report).items()
            if key.endswith("_web")}
    noise = {s.key: json.loads(s.files["json"])["noise"]
             for s in webdataset.iter_tar_samples(f"{tmp_path}/in/noisy-000000.tar")}
    assert 0 < len(kept) < 16
    assert report["noise"] == capfilt.noise_scores(list(noise.values()),
                                                   [key not in kept for key in noise])
    printed = capsys.readouterr().out
    swapped = report["noise"]["swapped"]
    assert (f"| swapped | {swapped['captions']} | {swapped['dropped']} | "
            f"{swapped['precision']:.4f} | {swapped['recall']:.4f} |") in printed
    assert f"| web | 16 | {len(kept)} | {16 - len(kept)} |" in printed


def test_bad_samples_are_skipped_and_counted(blip_run, model, tmp_path):
    good = list(webdataset.iter_tar_samples(blip_run.first_shard))[:2]
    with webdataset.ShardWriter(str(tmp_path / "in")) as writer:
        for sample in good:
            writer.write(sample.key, sample.files)
        caption = b"a red circle in the middle"
        writer.write("not_an_image", {"png": b"not an image", "txt": caption})
        writer.write("truncated", {"jpg": truncated_jpeg(), "txt": caption})
        writer.write("empty_text", {"png": image_bytes(64, 64, fmt="PNG"), "txt": b"  \n"})
        writer.write("no_text", {"png": image_bytes(64, 64, fmt="PNG")})
        writer.write("no_image", {"txt": caption})
        writer.write("bad_json", {"png": image_bytes(64, 64, fmt="PNG"), "txt": caption,
                                  "json": b"{not json"})
    report = run(f"{tmp_path}/in/*.tar", tmp_path / "out", model, threshold=0.0)
    assert report["skipped_bad_data"] == {
        "undecodable_image": 1, "corrupt_image": 1, "empty_text": 1, "missing_text": 1,
        "missing_image": 1, "bad_json": 1}
    assert report["total"] == 8 and report["images"] == 2
    assert {meta["input_key"] for _, meta in written(report).values()} == {s.key for s in good}


def test_workdir_errors_name_it(blip_run, tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        capfilt.load_model(missing)
    with pytest.raises(ValueError, match="not a trainer workdir"):
        capfilt.load_model(str(tmp_path))
    contrastive = tmp_path / "siglip"
    os.makedirs(contrastive / "checkpoints")
    (contrastive / "config.json").write_text(json.dumps({"task": "contrastive"}))
    with pytest.raises(ValueError, match=r"siglip is a 'contrastive' run, not a 'blip' one"):
        capfilt.load_model(str(contrastive))
    moved = tmp_path / "moved"  # a BLIP run whose vlm_shapes data (and tokenizer) is gone
    shutil.copytree(blip_run.workdir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["data_dir"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError,
                       match=r"moved/checkpoints/2: the run.s tokenizer .*gone.* does not exist"):
        capfilt.load_model(str(moved / "checkpoints" / "2"))
    assert capfilt.main([blip_run.shards, str(tmp_path / "out"), "--model", missing]) == 2
    assert f"--model {missing} does not exist" in capsys.readouterr().err
    assert capfilt.main([f"{tmp_path}/none-*.tar", str(tmp_path / "out"), "--model",
                         blip_run.workdir]) == 2
    assert "matched no shard files" in capsys.readouterr().err


def test_the_blip_run_exports_to_both_hf_classes_that_compute_the_same(blip_run, tmp_path,
                                                                       capsys):
    """`python -m vlmjax.convert export --to hf WORKDIR OUT` of a two-part run: one HF class per
    part, each equal to the run's model (ITM, ITC, caption logits), with the run's token ids."""
    pytest.importorskip("torch")
    from tests.convert import test_hf_blip as hf_test
    from vlmjax.convert import blip_workdir, cli
    out = tmp_path / "hf"
    cli.main(["export", "--to", "hf", blip_run.workdir, str(out)])
    assert "has no tokenizer files" in capsys.readouterr().err
    run = blip_workdir.load_blip_workdir(blip_run.workdir)
    model, params = run.task.model, jax.device_get(run.params)
    ids = run.task.token_ids
    for name, check in (("retrieval", hf_test.check_retrieval),
                        ("captioning", hf_test.check_captioning)):
        directory = out / hf_test.CLASSES[name]
        reference = hf_test.load_reference(str(directory), name)
        check(reference, model, params, 1, f"blip workdir export {name}")
        text = json.loads((directory / "config.json").read_text())["text_config"]
        assert (text["bos_token_id"], text["sep_token_id"], text["pad_token_id"]) == (
            ids["dec"], ids["eos"], ids["pad"])
