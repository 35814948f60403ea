"""optim.ema_decay keeps an EMA of the trainable params in the extra state; evals.use_ema
evaluates it beside the raw params."""
import jax
import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax.train import trainer


def test_use_ema_evaluates_the_ema_params_beside_the_raw_ones(tmp_path):
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path / 'tfds'}", "total_steps=2"])
    with config.unlocked():
        config.optim.ema_decay = 0.5
        config.optim.freeze = "^image_tower/"  # the EMA covers the trainable params only
        config.evals = {"test": {"type": "zero_shot", "data": {"split": "test"},
                                 "templates": "vlm_shapes", "batch_size": 64},
                        "use_ema": True}
    result = trainer.train(config, str(tmp_path / "run"))
    raw = {k for k in result.metrics if not k.startswith("ema/") and "seconds" not in k}
    assert raw and {f"ema/{k}" for k in raw} <= set(result.metrics)
    ema, params = result.state.extra["ema"], result.state.params
    assert jax.tree.leaves(ema["image_tower"]) == []  # frozen: no EMA kept
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema["text_tower"]),
                                                      jax.tree.leaves(params["text_tower"]))]
    assert any(moved)  # 2 steps at decay 0.5: the EMA lags the params


def test_use_ema_without_an_ema_is_an_error(tmp_path):
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    with config.unlocked():
        config.evals.use_ema = True
    with pytest.raises(config_lib.ConfigError, match="optim.ema_decay"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
