"""Config presets, overrides with suggestions, and unknown-key checks."""
import pytest

from vlmjax import config as config_lib


def test_preset_args_parse_literals_and_reject_unknown():
    args = config_lib.parse_preset_args("runlocal,res=64,name=vit", runlocal=False, res=224,
                                        name="x")
    assert args.runlocal is True and args.res == 64 and args.name == "vit"
    with pytest.raises(config_lib.ConfigError, match="did you mean 'runlocal'"):
        config_lib.parse_preset_args("runlocl", runlocal=False)


def test_load_config_with_presets_and_overrides():
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    assert config.total_steps == 6
    config_lib.apply_overrides(config, ["optim.lr=0.5", "loss.impl=dense", "total_steps=9"])
    assert config.optim.lr == 0.5 and config.loss.impl == "dense" and config.total_steps == 9
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optim.lr'"):
        config_lib.apply_overrides(config, ["optim.lrr=1"])
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config("configs/nope.py")


def test_tiny_text_depth_preset_picks_the_pooling_and_rejects_bad_values():
    assert config_lib.load_config("configs/siglip/tiny.py").model.text.pool == "map"
    deep = config_lib.load_config("configs/siglip/tiny.py:text_depth=2").model.text
    assert deep.depth == 2 and deep.pool == "last"
    for bad in ("-1", "1.5", "True"):
        with pytest.raises(ValueError, match="text_depth"):
            config_lib.load_config(f"configs/siglip/tiny.py:text_depth={bad}")


def test_check_keys_names_unused_key_and_nearest():
    with pytest.raises(config_lib.ConfigError, match=r"optim.warmup is not used.*'warmup_steps'"):
        config_lib.check_keys({"warmup": 3}, ["warmup_steps", "lr"], "optim")
