"""Every shipped config loads, and its :runlocal preset trains a few steps on CPU."""
import glob

import numpy as np
import pytest

from vlmjax import config as config_lib
from vlmjax.evals import registry
from vlmjax.train import trainer

# configs/clip/tiny.py trains as its negatives=2 variant (the same model and loss); its own
# negatives are checked without training (test_clip_tiny_inherits_the_tiny_recipes_negatives).
RUNLOCAL = ["configs/align/tiny.py", "configs/align/efficientnet.py",
            "configs/align/efficientnet.py:scan", "configs/siglip/vit_b16.py",
            "configs/clip/vit_b16.py", "configs/siglip/tiny.py:image=vit,text_depth=2,negatives=0",
            "configs/clip/tiny.py:negatives=2", "configs/clip/rn50.py",
            "configs/clip/cbow_tiny.py:negatives=2"]  # clip/tiny.py:image=resnet: rn50 trains it
# The tower each trains: image_arch / text_arch (defaults: vit / transformer).
TOWERS = {"configs/align/efficientnet.py": ("efficientnet", "bert"),
          "configs/clip/rn50.py": ("resnet", "transformer"),
          "configs/clip/cbow_tiny.py": ("cnn", "cbow")}


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*/*.py")))
def test_every_config_loads_and_passes_key_checks(path):
    if path.endswith(("finetune_from_hf.py", "qwen2_0_5b.py")):
        pytest.skip("needs a pretrained directory; tested in tests/convert")
    config = config_lib.load_config(path)
    trainer.check_config(config)
    registry.check_evals(config.evals, config.data)
    assert config.total_steps >= 1 and config.input.global_batch_size >= 1


@pytest.mark.parametrize("path", ["configs/siglip/tiny.py", "configs/clip/tiny.py",
                                  "configs/clip/cbow_tiny.py", "configs/clip/tiny.py:image=resnet",
                                  "configs/align/tiny.py", "configs/siglip/tiny.py:runlocal"])
def test_tiny_configs_evaluate_on_validation_and_test(path):
    """Recipes are chosen on validation and test is reported: both are evaluated."""
    evals = config_lib.load_config(path).evals
    assert {name: (e.type, e.data.split) for name, e in evals.items()} == {
        "validation": ("zero_shot", "validation"), "test": ("zero_shot", "test"),
        "test_novel": ("zero_shot", "test_novel"), "test_retrieval": ("retrieval", "test")}


@pytest.mark.parametrize("path", ["configs/siglip/vit_b16.py", "configs/clip/vit_b16.py"])
def test_real_scale_configs_evaluate_imagenet_and_coco(path):
    evals = config_lib.load_config(f"{path}:tfds_dir=/tfds").evals
    assert {name: (e.type, e.data.name, e.data.split, e.data.data_dir)
            for name, e in evals.items()} == {
        "imagenet": ("zero_shot", "imagenet2012", "validation", "/tfds"),
        "imagenet_v2": ("zero_shot", "imagenet_v2", "test", "/tfds"),
        "coco": ("retrieval", "coco_captions", "test", "/tfds")}
    assert evals.imagenet.templates == "imagenet" and evals.imagenet.class_names == "imagenet"
    assert (evals.coco.max_images, evals.coco.captions_per_image) == (5000, 5)


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
    image_tower = result.state.params["image_tower"]
    assert ("conv1" in image_tower) == (config.model.get("image_arch") == "cnn")
    arch = "resnet" if "image=resnet" in presets else TOWERS.get(path, (None,))[0]
    if arch:
        assert config.model.image_arch == arch
    if path in TOWERS:
        assert config.model.get("text_arch", "transformer") == TOWERS[path][1]
    if arch == "resnet":  # the attention pool, over a 1x1 map at 32 px
        assert image_tower["attn_pool"]["pos_embedding"].shape == (2, 8 * 32)
    if path == "configs/align/efficientnet.py":  # BERT's layers: one stacked layer_scan
        bert = result.state.params["text_tower"]["bert"]
        assert set(bert) & {"layer_scan", "layer_0"} == (
            {"layer_scan"} if "scan" in presets else {"layer_0"})
    if path == "configs/clip/cbow_tiny.py":  # embeddings only: no encoder, no pooling head
        assert set(result.state.params["text_tower"]) == {"token_embed"}
    if "negatives=0" in presets or "align" in path or "vit_b16" in path or "rn50" in path:
        assert "hard_negatives" not in config.input
    else:
        assert config.input.hard_negatives.count == 2


def test_clip_tiny_inherits_the_tiny_recipes_negatives():
    config = config_lib.load_config("configs/clip/tiny.py:runlocal")
    assert config.input.hard_negatives.count == 7 and config.loss.name == "clip"


@pytest.mark.parametrize("loss", ["siglip", "clip"])
def test_hard_negatives_term_in_the_task_loss(loss, tmp_path_factory):
    """With the positive caption itself as each valid 'negative' (k_i of them for image i), the
    task's loss grows by exactly sum_i k_i softplus(t x_i.y_i + b) / B (SigLIP), or by
    mean_i log(1 + k_i) (CLIP: k_i + 1 equal logits); masked negatives add nothing."""
    import jax
    import jax.numpy as jnp
    from vlmjax.sharding import make_mesh
    from vlmjax.train.tasks.contrastive import ContrastiveTask
    config = config_lib.load_config(f"configs/{loss}/tiny.py:runlocal,negatives=3")
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    overrides = [f"data.data_dir={data_dir}", "model.temperature_init=1.0"]
    if loss == "siglip":  # t = 1, b = 0: the extra terms are O(1), above float32 round-off
        overrides.append("model.bias_init=0.0")
    config_lib.apply_overrides(config, overrides)
    task = ContrastiveTask(config, make_mesh(config.mesh))
    params = task.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    size, length = config.input.image_size, config.input.max_text_len
    batch = {"image": jnp.asarray(rng.normal(size=(8, size, size, 3)), jnp.float32),
             "text": jnp.asarray(rng.integers(1, 100, (8, length)), jnp.int32),
             "text_mask": jnp.ones((8, length), bool)}
    valid = np.arange(3)[None, :] < np.array([3, 2, 1, 0, 3, 2, 1, 0])[:, None]
    plain, out = task.loss_fn(params, {}, batch, jax.random.PRNGKey(1))
    with_negatives = dict(batch, neg_text=jnp.repeat(batch["text"][:, None], 3, 1),
                          neg_text_mask=jnp.repeat(batch["text_mask"][:, None], 3, 1),
                          neg_valid=jnp.asarray(valid))
    loss_value, _ = task.loss_fn(params, {}, with_negatives, jax.random.PRNGKey(1))
    k = valid.sum(1)
    if loss == "siglip":
        zimg, ztxt, _ = task.model.apply({"params": params}, batch["image"], batch["text"],
                                         batch["text_mask"])
        diag = np.sum(np.asarray(zimg) * np.asarray(ztxt), axis=-1)
        extra = np.sum(k * np.log1p(np.exp(float(out["temperature"]) * diag
                                           + float(out["bias"])))) / 8
    else:
        extra = np.mean(np.log1p(k))
    np.testing.assert_allclose(float(loss_value) - float(plain), extra, rtol=1e-4)


def test_finetune_eval_preset_names_held_out_data():
    """configs/siglip/finetune_from_hf.py: eval= is a TFDS split or held-out shards; never the
    training shards."""
    import importlib.util

    import ml_collections
    spec = importlib.util.spec_from_file_location("finetune", "configs/siglip/finetune_from_hf.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    for data, held_out, expected in [("tfds:coco_captions", "validation", {"split": "validation"}),
                                     ("/d/train-{0..9}.tar", "/d/val-0.tar",
                                      {"paths": "/d/val-0.tar"})]:
        train, evals = finetune._data(data, held_out, 224, 512)
        registry.check_evals(ml_collections.ConfigDict(evals), ml_collections.ConfigDict(train))
        assert evals["held_out"]["type"] == "retrieval" and evals["held_out"]["data"] == expected
    assert finetune._data("/d/train-{0..9}.tar", "", 224, 512)[1] == {}  # no held-out data
    assert set(finetune._data("", "", 224, 512)[1]) == {"validation", "test", "test_novel",
                                                        "test_retrieval"}
