"""Weight file variants (pytorch_model.bin, bfloat16, sharded safetensors) and clear errors for
bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest

from tests.convert.reference import torch
from vlmjax.convert import export_hf, load_pretrained, read_pretrained
from vlmjax.convert.hf_io import read_state_dict


def copy_config(hf_dir, tmp_path, name="variant", edit=None):
    directory = tmp_path / name
    directory.mkdir()
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    if edit:
        edit(config)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)
    return str(directory)


def test_pytorch_bin_bf16_and_sharded_safetensors_read_like_the_original(siglip_hf, tmp_path):
    from safetensors.torch import save_file

    hf_dir, model = siglip_hf
    original = read_pretrained(hf_dir).params
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    bin_dir = copy_config(hf_dir, tmp_path, "bin")
    torch.save(state, os.path.join(bin_dir, "pytorch_model.bin"))
    sharded_dir = copy_config(hf_dir, tmp_path, "sharded")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, os.path.join(sharded_dir, file))
    with open(os.path.join(sharded_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: file for file, keys in halves.items() for k in keys}}, f)
    for directory in (bin_dir, sharded_dir):
        params = read_pretrained(directory).params
        assert set(params) == set(original)
        for name, value in original.items():
            np.testing.assert_array_equal(params[name], value, err_msg=f"{directory}: {name}")

    bf16_dir = copy_config(hf_dir, tmp_path, "bf16")
    save_file({k: v.bfloat16() for k, v in state.items()},
              os.path.join(bf16_dir, "model.safetensors"))
    bf16 = read_state_dict(bf16_dir)
    for name, tensor in state.items():
        assert bf16[name].dtype == np.float32
        np.testing.assert_array_equal(bf16[name], tensor.bfloat16().float().numpy(), err_msg=name)


def test_not_a_model_and_unknown_model_type_say_what_is_valid(clip_hf, tmp_path):
    with pytest.raises(ValueError, match="HF model directory.*big_vision .npz"):
        load_pretrained(str(tmp_path))
    directory = copy_config(clip_hf[0], tmp_path, edit=lambda c: c.update(model_type="blip"))
    with pytest.raises(ValueError, match=r"model_type 'blip' is not supported.*'clip', 'siglip'"):
        load_pretrained(directory)


def test_missing_weights_file_names_the_expected_files(clip_hf, tmp_path):
    directory = copy_config(clip_hf[0], tmp_path)
    with pytest.raises(FileNotFoundError, match="no model weights.*model.safetensors"):
        load_pretrained(directory)


def test_shape_mismatch_names_the_parameter(clip_hf, tmp_path):
    def wider_mlp(config):
        config["vision_config"]["intermediate_size"] = 48

    directory = copy_config(clip_hf[0], tmp_path, edit=wider_mlp)
    shutil.copyfile(os.path.join(clip_hf[0], "model.safetensors"),
                    os.path.join(directory, "model.safetensors"))
    with pytest.raises(ValueError, match=r"image_tower/encoder/block0/mlp/fc1/kernel: model "
                                         r"\(32, 48\), converted \(32, 44\)"):
        load_pretrained(directory)


def test_missing_tensor_is_named(clip_hf, tmp_path):
    from safetensors.numpy import save_file

    directory = copy_config(clip_hf[0], tmp_path)
    state = read_state_dict(clip_hf[0])
    del state["vision_model.pre_layrnorm.weight"]
    save_file(state, os.path.join(directory, "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*vision_model.pre_layrnorm.weight"):
        load_pretrained(directory)


def test_export_refuses_a_model_no_hf_class_computes(clip_hf, tmp_path):
    _, params, config = load_pretrained(clip_hf[0])
    bidirectional = dict(config, text=dict(config["text"], causal=False))
    with pytest.raises(ValueError, match=r"as CLIP it has text.causal=False"):
        export_hf(params, bidirectional, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
