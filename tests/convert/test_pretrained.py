"""Converted directories (CLI import/export), sharded loading and the tokenizer settings."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.convert.reference import CLIP_BOS, CLIP_EOS, CLIP_LEN, SIGLIP_LEN, torch, transformers
from vlmjax.convert import load_pretrained, load_pretrained_tokenizer
from vlmjax.convert.cli import main as cli_main
from vlmjax.convert.params import flatten

TEXTS = ["a photo of a cat", "two big red dogs on the green house with a small blue car in a tree",
         "tree"]


def assert_same_params(a, b):
    flat_a, flat_b = flatten(a), flatten(b)
    assert set(flat_a) == set(flat_b)
    for name, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[name]), err_msg=name)


@pytest.fixture(scope="module")
def clip_converted(clip_hf, tmp_path_factory):
    """`python -m vlmjax.convert import --from hf` run as a user would."""
    out = str(tmp_path_factory.mktemp("converted") / "clip")
    result = subprocess.run([sys.executable, "-m", "vlmjax.convert", "import", "--from", "hf",
                             clip_hf[0], "--out", out], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
    return out


def test_converted_dir_holds_config_params_and_tokenizer(clip_converted, clip_hf):
    with open(os.path.join(clip_converted, "config.json")) as f:
        config = json.load(f)
    assert config["format"] == "vlmjax.convert/1"
    assert config["image"]["size"] == [30, 30]
    assert config["tokenizer"]["file"] == "tokenizer.json"
    assert {k: config["tokenizer"][k] for k in ("max_len", "add_bos", "eos", "text_mask",
                                                "pad_id", "bos_id", "eos_id")} == dict(
        max_len=CLIP_LEN, add_bos=True, eos="sticky", text_mask=True, pad_id=CLIP_EOS,
        bos_id=CLIP_BOS, eos_id=CLIP_EOS)
    assert os.path.exists(os.path.join(clip_converted, "tokenizer.json"))
    assert os.path.isdir(os.path.join(clip_converted, "params"))
    _, from_dir, model_config = load_pretrained(clip_converted)
    _, from_hf, hf_config = load_pretrained(clip_hf[0])
    assert model_config == hf_config
    assert_same_params(from_dir, from_hf)


def test_converted_dir_loads_into_a_sharded_mesh(clip_converted):
    mesh = jax.make_mesh((8,), ("x",))
    _, plain, _ = load_pretrained(clip_converted)

    def sharding(x):  # split the last axis over 8 devices where it divides, else replicate
        spec = [None] * (x.ndim - 1) + ["x"] if x.ndim and x.shape[-1] % 8 == 0 else []
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    shardings = jax.tree.map(sharding, plain)
    _, sharded, _ = load_pretrained(clip_converted, shardings=shardings)
    kernel = sharded["image_tower"]["encoder"]["block0"]["mlp"]["fc2"]["kernel"]  # [44, 32]
    assert kernel.sharding == shardings["image_tower"]["encoder"]["block0"]["mlp"]["fc2"]["kernel"]
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (44, 4)
    assert_same_params(sharded, plain)


def test_export_from_converted_dir_round_trips(clip_converted, clip_hf, tmp_path):
    out = str(tmp_path / "hf_out")
    cli_main(["export", "--to", "hf", clip_converted, out])
    reloaded = transformers.CLIPModel.from_pretrained(out).eval()
    for name, tensor in clip_hf[1].state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    # The tokenizer files come along, and the special ids are the tokenizer's.
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json")) as f:
        text_config = json.load(f)["text_config"]
    assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (CLIP_BOS, CLIP_EOS)


def test_clip_tokenizer_matches_the_hf_tokenizer(clip_hf, clip_converted):
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(clip_hf[0])
    want = reference(TEXTS, padding="max_length", max_length=CLIP_LEN, truncation=True)
    for src in (clip_hf[0], clip_converted):
        tokenizer, settings = load_pretrained_tokenizer(src)
        ids, mask = tokenizer.encode_batch(TEXTS, settings["max_len"], settings["add_bos"],
                                           settings["eos"])
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    assert ids[1, -1] == CLIP_EOS  # truncated text keeps its EOS ("sticky")


def test_siglip_tokenizer_matches_the_hf_tokenizer(siglip_hf):
    reference = transformers.SiglipTokenizer(
        vocab_file=os.path.join(siglip_hf[0], "spiece.model"), eos_token="</s>", pad_token="</s>",
        unk_token="<unk>", model_max_length=SIGLIP_LEN)
    want = reference(TEXTS, padding="max_length", max_length=SIGLIP_LEN, truncation=True)
    tokenizer, settings = load_pretrained_tokenizer(siglip_hf[0])
    assert settings["text_mask"] is False and settings["add_bos"] is False
    assert settings["pad_id"] == 1 and settings["max_len"] == SIGLIP_LEN
    ids, _ = tokenizer.encode_batch(TEXTS, settings["max_len"], settings["add_bos"],
                                    settings["eos"])
    np.testing.assert_array_equal(ids, want["input_ids"])


def test_resizing_on_import_and_on_load(clip_hf, clip_converted, tmp_path):
    from vlmjax.convert import import_pretrained

    config = import_pretrained(clip_hf[0], str(tmp_path / "tall"), image_size=(42, 30))
    assert config["image"]["size"] == [42, 30]
    _, tall, _ = load_pretrained(str(tmp_path / "tall"))
    _, also_tall, _ = load_pretrained(clip_converted, image_size=(42, 30))
    assert tall["image_tower"]["posemb"]["pos_embedding"].shape == (1, 1 + 7 * 5, 32)
    assert_same_params(tall, also_tall)


def test_export_of_scanned_params_writes_each_layer(clip_converted, clip_hf, tmp_path):
    """A scan_layers model's params (`blocks`, [depth, ...]) export as HF's per-layer tensors,
    the same files as the unrolled params give."""
    from vlmjax.convert.hf_export import export_hf
    from vlmjax.models import scan_layout
    _, params, model_config = load_pretrained(clip_converted)
    scanned = scan_layout.to_scanned(params)
    assert scan_layout.is_scanned(scanned)
    export_hf(scanned, {**model_config, "image": {**model_config["image"], "scan_layers": True}},
              str(tmp_path / "scanned"))
    reloaded = transformers.CLIPModel.from_pretrained(str(tmp_path / "scanned")).eval()
    for name, tensor in clip_hf[1].state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
