"""Numerical parity with transformers' CLIPModel / SiglipModel: import, and export round trip.

Run with `-s` to see the measured max abs differences (lines starting with PARITY).
"""
import json
import os
import shutil

import numpy as np
import pytest

from tests.convert.reference import (CLIP_EOS, hf_outputs, max_abs_diffs, torch, transformers,
                                     vlmjax_outputs)
from vlmjax.convert import export_hf, load_pretrained

TOLERANCE = 1e-5


def assert_parity(label, ours, reference):
    diffs = max_abs_diffs(ours, reference)
    print(f"\nPARITY {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for key, diff in diffs.items():
        assert diff < TOLERANCE, f"{label}: {key} differs by {diff:.3g}"
    # Guard against a vacuous pass (e.g. constant embeddings): outputs vary across the batch.
    assert np.std(reference["logits"]) > 1e-3


@pytest.fixture(scope="module")
def clip_imported(clip_hf):
    return load_pretrained(clip_hf[0])


@pytest.fixture(scope="module")
def siglip_imported(siglip_hf):
    return load_pretrained(siglip_hf[0])


def test_clip_import_matches_transformers(clip_hf, clip_imported, images, clip_tokens):
    model, params, config = clip_imported
    ids, mask = clip_tokens
    assert config["image"]["pool"] == "cls" and config["image"]["pre_norm"]
    assert config["text"]["pool"] == "eos" and config["text"]["eos_id"] == CLIP_EOS
    assert_parity("clip import", vlmjax_outputs(model, params, images, ids, mask),
                  hf_outputs(clip_hf[1], images, ids, mask))


def test_siglip_import_matches_transformers(siglip_hf, siglip_imported, images, siglip_tokens):
    model, params, config = siglip_imported
    assert config["image"]["pool"] == "map" and not config["image_projection"]
    assert config["bias_init"] == pytest.approx(-3.7)
    assert_parity("siglip import", vlmjax_outputs(model, params, images, siglip_tokens),
                  hf_outputs(siglip_hf[1], images, siglip_tokens))


def test_clip_legacy_eos_config_pools_at_argmax(clip_hf, images, clip_tokens, tmp_path):
    """Configs from before transformers#24773 say eos_token_id=2 and pool at argmax(ids)."""
    directory = str(tmp_path / "legacy")
    shutil.copytree(clip_hf[0], directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["eos_token_id"] = 2
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    reference = transformers.CLIPModel.from_pretrained(directory).eval()
    model, params, model_config = load_pretrained(directory)
    assert model_config["text"]["eos_id"] == CLIP_EOS  # the highest id in the vocabulary
    ids, _ = clip_tokens  # no mask: pooling at the wrong token would see the padding
    assert_parity("clip legacy eos", vlmjax_outputs(model, params, images, ids),
                  hf_outputs(reference, images, ids))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_export_round_trip_through_from_pretrained(family, request, images, tmp_path):
    hf_dir, reference = request.getfixturevalue(f"{family}_hf")
    model, params, model_config = request.getfixturevalue(f"{family}_imported")
    ids = request.getfixturevalue(f"{family}_tokens")
    ids, mask = ids if family == "clip" else (ids, None)
    out = str(tmp_path / "exported")
    assert export_hf(params, model_config, out) == family
    model_cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    reloaded = model_cls.from_pretrained(out).eval()
    # Every tensor comes back bit-exact, and the reloaded model computes the same outputs.
    original, exported = reference.state_dict(), reloaded.state_dict()
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    assert_parity(f"{family} export->from_pretrained",
                  hf_outputs(reloaded, images, ids, mask), hf_outputs(reference, images, ids, mask))
    assert_parity(f"{family} export->from_pretrained vs vlmjax",
                  vlmjax_outputs(model, params, images, ids, mask),
                  hf_outputs(reloaded, images, ids, mask))
