"""A tiny trained workdir shared by the evaluation tests: 3 steps of the tiny SigLIP config with
its transformer towers laid out as HF's SiglipModel (so that the workdir is also a pretrained
source for vlmjax.convert.load_pretrained)."""
import pytest

from vlmjax import config as config_lib


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """(workdir, the trainer's final evaluation metrics)."""
    from vlmjax.train import trainer
    data_dir = tmp_path_factory.getbasetemp() / "runlocal_tfds"  # shared with test_configs
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = config_lib.load_config(
        "configs/siglip/tiny.py:runlocal,image=vit,text_depth=2,negatives=0")
    config.model.image_projection = False  # SigLIP: embed_dim is the image width
    config.model.text_projection_bias = True
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "total_steps=3"])
    result = trainer.train(config, workdir)
    return workdir, result.metrics
