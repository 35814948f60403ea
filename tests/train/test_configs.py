"""Every shipped config loads, and its :runlocal preset trains a few steps on CPU."""
import glob

import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax.train import trainer

RUNLOCAL = ["configs/clip/tiny.py", "configs/align/tiny.py", "configs/siglip/vit_b16.py",
            "configs/clip/vit_b16.py", "configs/siglip/tiny.py:image=cnn"]


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*/*.py")))
def test_every_config_loads_and_passes_key_checks(path):
    if path.endswith("finetune_from_hf.py"):
        pytest.skip("needs a pretrained directory; tested in tests/convert")
    config = config_lib.load_config(path)
    trainer.check_config(config)
    assert config.total_steps >= 1 and config.input.global_batch_size >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNLOCAL)
def test_runlocal_preset_trains(path, tmp_path_factory):
    path, _, presets = path.partition(":")
    config = config_lib.load_config(f"{path}:runlocal" + (f",{presets}" if presets else ""))
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}"])
    result = trainer.train(config, str(tmp_path_factory.mktemp("workdir")))
    assert int(result.state.step) == config.total_steps
    assert np.isfinite(float(result.state.params["log_temperature"]))
    assert "zero_shot/test/top1" in result.metrics
    if presets == "image=cnn":
        assert "conv1" in result.state.params["image_tower"]
