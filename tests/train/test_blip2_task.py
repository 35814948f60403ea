"""The blip2 task: stage 1's losses on 8 devices equal 1 device's and leave the frozen tower
without gradient; stage 1 then stage 2 through the real trainer (stage 2 starts from stage 1's
tower and Q-Former and an lm workdir's LLM, and trains the projector alone); config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.train import trainer
from vlmjax.train.tasks import get_task
from vlmjax.train.tasks.blip2 import Blip2Stage1Task, Blip2Stage2Task

from tests.train.test_blip_task import TOKEN_IDS as BLIP_TOKEN_IDS, fake_batch
from tests.train.test_llava_task import (  # noqa: F401  (fixtures)
    adam_mu, assert_same, llava_dirs, moved, part_workdirs)

# BLIP's ids (fake_batch starts each caption with its bos), with BLIP-2's ITM reading [CLS].
TOKEN_IDS = {**BLIP_TOKEN_IDS, "enc": BLIP_TOKEN_IDS["bos"]}


def blip2_config(stage, llava_dirs=("/nonexistent", "/nonexistent"), evals=False, **presets):
    """The tiny config's :runlocal; `evals`: its `test` entries only (validation's are the same
    code on other images)."""
    data_dir, llava_dir = llava_dirs
    extra = "".join(f",{k}={v}" for k, v in presets.items())
    config = config_lib.load_config(f"configs/blip2/tiny.py:runlocal,stage={stage},"
                                    f"shapes_dir={data_dir},llava_dir={llava_dir}{extra}")
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(
            {k: v for k, v in config.evals.items() if evals and "test" in k})
    return config


def test_stage1_loss_on_8_devices_equals_one_device_and_the_tower_gets_no_gradient():
    config = blip2_config(1)
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": -1})
    tasks = []
    for mesh in (one, eight):
        task = get_task("blip2")(config, mesh)
        assert isinstance(task, Blip2Stage1Task)
        task.__dict__["token_ids"] = TOKEN_IDS  # no tokenizer (and so no data) needed here
        tasks.append(task)
    params = nn.meta.unbox(tasks[0].init_params(jax.random.PRNGKey(0)))
    batch, rng = fake_batch(), jax.random.PRNGKey(3)

    def run(task, mesh):
        with jax.set_mesh(mesh):
            placed = sharding.host_batch_to_global(batch, mesh)
            (loss, aux), grads = jax.jit(jax.value_and_grad(
                lambda p: task.loss_fn(p, {}, placed, rng), has_aux=True))(params)
        return float(loss), {k: float(v) for k, v in aux.items()}, grads

    loss_1, aux_1, grads_1 = run(tasks[0], one)
    loss_8, aux_8, grads_8 = run(tasks[1], eight)
    assert loss_8 == pytest.approx(loss_1, rel=1e-5)
    for key in ("loss_itc", "loss_itm", "loss_lm", "itm_accuracy"):
        assert aux_8[key] == pytest.approx(aux_1[key], rel=1e-5, abs=1e-6), key
    for path, g1, g8 in zip(*zip(*jax.tree_util.tree_flatten_with_path(grads_1)[0]),
                            jax.tree.leaves(grads_8)):
        np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # The frozen tower: no gradient at all; every other part learns from some loss.
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads_1["vision"]))
    rest = {k: v for k, v in grads_1.items() if k != "vision"}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(rest))
    assert aux_1["loss_itc"] > 0 and aux_1["loss_lm"] > 0


@pytest.mark.slow
def test_stage1_then_stage2_through_the_trainer(llava_dirs, part_workdirs, tmp_path):
    """Stage 1 (stage1_vitg's recipe at runlocal size) from a SigLIP workdir's CNN: the tower
    stays bit-identical and has no optimiser state; stage 2 from the stage-1 run and an lm workdir: tower, ln_vision and Q-Former are
    stage 1's, the LLM the lm run's, and only the projector moves; retrieval and VQA report."""
    # Stage 1 is configs/blip2/stage1_vitg.py:runlocal (the paper's recipe on the tiny model):
    # the published config's optimiser, loss and schedule keys run through the trainer.
    first_config = config_lib.load_config("configs/blip2/stage1_vitg.py:runlocal")
    tiny = blip2_config(1, llava_dirs, evals=True, vision_init=part_workdirs["vision"], steps=2)
    for key in ("data", "input", "evals", "model_init", "total_steps"):
        first_config[key] = tiny[key]
    first = trainer.train(first_config, str(tmp_path / "stage1"))
    tower = part_workdirs["vision_params"]["image_tower"]
    assert_same(first.state.params["vision"], tower)
    mu = adam_mu(first.state.opt_state)
    assert jax.tree.leaves(mu["vision"]) == []
    assert "retrieval/retrieval_test/i2t_r1_rerank" in first.metrics
    assert 0.0 <= first.metrics["itm/itm_test/accuracy"] <= 1.0

    second_config = blip2_config(2, llava_dirs, evals=True, stage1=str(tmp_path / "stage1"),
                                 llm_init=part_workdirs["llm"], steps=2)
    task = get_task("blip2")(second_config, sharding.make_mesh({"data": -1}))
    assert isinstance(task, Blip2Stage2Task) and task.num_image_tokens == 4  # the queries
    second = trainer.train(second_config, str(tmp_path / "stage2"))
    params = second.state.params
    assert_same(params["vision"], tower)
    assert_same(params["llm"], part_workdirs["llm_params"])
    stage1_qformer = first.state.params["projector"]["qformer"]
    assert set(params["projector"]) == {"ln_vision", "qformer", "language_projection"}
    # The Q-Former moved from stage 1's, which it started from (same layout, no text parts).
    assert set(params["projector"]["qformer"]) < set(stage1_qformer)
    assert "token_embed" in stage1_qformer and "token_embed" not in params["projector"]["qformer"]
    start = {k: stage1_qformer[k] for k in params["projector"]["qformer"]}
    assert moved(start, params["projector"]["qformer"])
    mu = adam_mu(second.state.opt_state)
    assert jax.tree.leaves(mu["vision"]) == jax.tree.leaves(mu["llm"]) == []
    for key in ("vqa/test_vqa/exact_match", "captioning/test_captions/colour_acc"):
        assert key in second.metrics, sorted(second.metrics)


@pytest.mark.parametrize("overrides,message", [
    (["stage=3"], r"config.stage must be 1 .* or 2"),
    (["loss.itc=0.0", "loss.itm=0.0", "loss.lm=0.0"], r"every weight .* is 0"),
    (["input.max_text_len=64"], r"max_text_len=64 exceeds model.qformer.max_len=32"),
    (["model.qformer.text_input=False"], r"text_input must be True"),
])
def test_config_errors_name_the_key(overrides, message):
    config = blip2_config(1)
    with pytest.raises((ConfigError, ValueError), match=message):
        config_lib.apply_overrides(config, overrides)
        task = get_task("blip2")(config, sharding.make_mesh({"data": -1}))
        task.init_params(jax.random.PRNGKey(0))


def test_stage2_needs_the_qformer_projector(llava_dirs):
    config = blip2_config(2, llava_dirs)
    config.model.projector = "mlp2x_gelu"
    with pytest.raises(ConfigError, match=r"stage 2 needs model.projector='qformer'"):
        get_task("blip2")(config, sharding.make_mesh({"data": -1}))


def test_stage1_vitg_is_the_papers_recipe():
    config = config_lib.load_config("configs/blip2/stage1_vitg.py")
    assert (config.total_steps, config.input.global_batch_size) == (250_000, 1680)
    assert (config.optim.lr, config.optim.schedule, config.optim.warmup_steps) == (
        1e-4, "cosine", 2000)
    assert (config.optim.weight_decay, config.optim.b2) == (0.05, 0.98)
    q = config.model.qformer
    assert (q.num_query_tokens, q.width, q.depth, q.cross_attention_freq) == (32, 768, 12, 2)
    v = config.model.vision
    assert (v.width, v.depth, v.patch_size, config.input.image_size) == (1408, 39, 14, 224)


def test_frozen_tower_in_bfloat16_is_close_to_float32():
    """model.vision_dtype: the frozen tower computes in bfloat16, the Q-Former in float32."""
    config = blip2_config(1)
    config.model.vision_dtype = "bfloat16"
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = get_task("blip2")(config, mesh)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    images = jnp.asarray(fake_batch(4)["image"])
    model = task.model
    half = model.apply({"params": params}, images, method=model.image_features)
    full = model.clone(vision_dtype=None).apply({"params": params}, images,
                                                method=model.image_features)
    assert half.dtype == full.dtype == jnp.float32
    assert not np.array_equal(np.asarray(half), np.asarray(full))  # bf16 really ran
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05 * float(jnp.abs(full).max()))
