"""Every registered task satisfies the task contract (vlmjax/train/tasks/base.py), and the valid
top-level config keys are the trainer's plus the task's."""
import jax.numpy as jnp
import pytest

from vlmjax import config as config_lib, sharding
from vlmjax.train import trainer
from vlmjax.train.tasks import TASKS, base, get_task

CONFIGS = {"contrastive": "configs/siglip/tiny.py:runlocal", "lm": "configs/lm/tiny.py:runlocal",
           "llava": "configs/llava/tiny.py:runlocal,shapes_dir={tmp},llava_dir={tmp}",
           "blip": "configs/blip/tiny.py:runlocal",
           "blip2": "configs/blip2/tiny.py:runlocal,stage=1,shapes_dir={tmp}",
           "fusion": "configs/fusion/tiny.py:runlocal,shapes_dir={tmp},mmc4_dir={tmp}"}


def load_task_config(name, tmp_path):
    """The task's tiny config with every data path under tmp_path (nothing is read there)."""
    config = config_lib.load_config(CONFIGS[name].format(tmp=tmp_path))
    if "data_dir" in config.data:
        config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    return config


def test_every_registered_task_has_a_config_here():
    assert set(CONFIGS) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_satisfies_the_protocol(name, tmp_path):
    config = load_task_config(name, tmp_path)
    task = get_task(name)(config, sharding.make_mesh({"data": -1}))
    assert isinstance(task, base.Task)
    assert not set(task.config_keys) & set(trainer.TRAINER_KEYS)  # a task adds, never edits
    assert all(isinstance(doc, str) and doc for doc in task.config_keys.values())
    assert task.compute_dtype in ("float32", "bfloat16")
    assert list(tmp_path.iterdir()) == []  # construction is pure: nothing built on disk


def test_contrastive_task_contract_values(tmp_path):
    config = config_lib.load_config("configs/clip/tiny.py:runlocal")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    task = get_task("contrastive")(config, sharding.make_mesh({"data": -1}))
    assert task.trainable is None and task.extra_state({"w": jnp.ones(2)}) == {}
    assert [m[0] for m in task.summary_metrics] == ["temperature", "bias"]


def test_an_object_missing_a_member_is_no_task():
    class NoLoss(base.TaskDefaults):  # everything optional, but no loss_fn/init_params/...
        pass
    assert not isinstance(NoLoss(), base.Task)


def test_unknown_top_level_key_names_it_and_the_valid_set(tmp_path):
    config = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    with config.unlocked():
        config.modle = {}
    with pytest.raises(config_lib.ConfigError, match=r"config.modle is not used.*'model'.*"
                                                     r"'total_steps'"):
        trainer.check_config(config)


def test_loss_impl_is_a_siglip_key_only(tmp_path):
    """CLIP's softmax loss has one implementation: an impl it would not read is an error."""
    mesh = sharding.make_mesh({"data": -1})
    clip = config_lib.load_config("configs/clip/tiny.py:runlocal")
    with clip.unlocked():
        clip.loss.impl = "dense"
    with pytest.raises(config_lib.ConfigError, match=r"loss.impl is not used.*\['name'\]"):
        get_task("contrastive")(clip, mesh)
    siglip = config_lib.load_config("configs/siglip/tiny.py:runlocal")
    config_lib.apply_overrides(siglip, ["loss.impl=dense"])
    assert get_task("contrastive")(siglip, mesh).impl == "dense"


def test_lm_task_contract_values(tmp_path):
    config = config_lib.load_config("configs/lm/tiny.py:runlocal")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    task = get_task("lm")(config, sharding.make_mesh({"data": -1}))
    assert task.trainable is None and task.extra_state({"w": jnp.ones(2)}) == {}
    assert task.summary_metrics == (("perplexity", "ppl"), ("num_tokens", "tok/s", "rate"))
    assert task.example_transform(True) == ["texts_as_documents|qa_documents"]
