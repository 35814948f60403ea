"""The blip task: its losses on 8 devices equal 1 device's, momentum state, config errors and the
tiny config end to end (train, resume exactly, evaluate)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.train import trainer
from vlmjax.train.tasks import get_task

from tests.train.test_llava_task import llava_dirs, part_workdirs  # noqa: F401  (fixtures)

TOKEN_IDS = dict(bos=1, eos=2, pad=0, enc=480, dec=481, mask=482)


def runlocal_config(preset="runlocal", evals=False):
    config = config_lib.load_config(f"configs/blip/tiny.py:{preset}")
    if not evals:
        config.evals = {}
    return config


def make_task(config, mesh):
    task = get_task("blip")(config, mesh)
    task.__dict__["token_ids"] = TOKEN_IDS  # no tokenizer (and so no data) needed here
    return task


def fake_batch(batch=16, length=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 400, (batch, length)).astype(np.int32)
    tokens[:, 0] = TOKEN_IDS["bos"]
    mask = np.arange(length)[None] < rng.integers(4, length, (batch, 1))
    return dict(image=rng.normal(size=(batch, 32, 32, 3)).astype(np.float32), text=tokens,
                text_mask=mask, image_id=(np.arange(batch) // 2).astype(np.int32))


def test_loss_on_8_devices_equals_one_device():
    """Every loss at once (ITC with momentum distillation and a queue, ITM, LM, MLM)."""
    config = runlocal_config("runlocal,momentum=0.995,queue=32,mlm=1.0")
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": -1})
    task_1, task_8 = make_task(config, one), make_task(config, eight)
    params = nn.meta.unbox(task_1.init_params(jax.random.PRNGKey(0)))
    extra = task_1.extra_state(params)
    batch, rng = fake_batch(), jax.random.PRNGKey(3)

    def run(task, mesh):
        with jax.set_mesh(mesh):
            placed = sharding.host_batch_to_global(batch, mesh)
            (loss, aux), grads = jax.jit(jax.value_and_grad(
                lambda p: task.loss_fn(p, extra, placed, rng), has_aux=True))(params)
        return float(loss), {k: float(v) for k, v in aux.items() if jnp.ndim(v) == 0}, grads

    loss_1, aux_1, grads_1 = run(task_1, one)
    loss_8, aux_8, grads_8 = run(task_8, eight)
    assert loss_8 == pytest.approx(loss_1, rel=1e-5)
    for key in ("loss_itc", "loss_itm", "loss_lm", "loss_mlm", "itm_accuracy"):
        assert aux_8[key] == pytest.approx(aux_1[key], rel=1e-5, abs=1e-6), key
    for path, g1, g8 in zip(*zip(*jax.tree_util.tree_flatten_with_path(grads_1)[0]),
                            jax.tree.leaves(grads_8)):
        np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # Every part learns from some loss: no parameter is left without gradient.
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads_1))


def test_momentum_state_moves_towards_params_and_queues_the_batch():
    config = runlocal_config("runlocal,momentum=0.9,queue=32")
    task = make_task(config, sharding.make_mesh({"data": -1}))
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    extra = task.extra_state(params)
    assert set(extra["momentum"]) == {"vision", "vision_proj", "text_shared", "text_proj"}
    assert (np.asarray(extra["id_queue"]) == -1).all()
    _, aux = jax.jit(task.loss_fn)(params, extra, fake_batch(), jax.random.PRNGKey(1))
    moved = jax.tree.map(lambda p: p + 1.0, params)
    new = task.update_extra(extra, moved, aux)
    np.testing.assert_allclose(new["momentum"]["vision_proj"]["kernel"],
                               extra["momentum"]["vision_proj"]["kernel"] + 0.1, atol=1e-6)
    np.testing.assert_array_equal(new["id_queue"][:16], np.arange(16) // 2)
    np.testing.assert_allclose(new["image_queue"][:16], aux["image_feat_m"], atol=1e-6)
    assert int(new["queue_ptr"]) == 16


@pytest.mark.parametrize("overrides, message", [
    (["loss.queue_size=32"], "needs momentum distillation"),
    (["loss.momentum=0.9", "loss.queue_size=24"], "multiple of"),
    (["loss.itc=0", "loss.itm=0", "loss.lm=0"], "nothing would train"),
    (["loss.lm=1.0", "model.parts=('encoder',)"], "needs the text decoder"),
    (["input.add_bos=False"], "add_bos=True"),
    (["loss.itn=1.0"], "itn"),
])
def test_config_errors_name_the_key(overrides, message):
    config = runlocal_config()
    with pytest.raises(ConfigError, match=message):
        config_lib.apply_overrides(config, overrides)
        get_task("blip")(config, sharding.make_mesh({"data": -1}))


@pytest.mark.slow
def test_runlocal_trains_resumes_exactly_and_evaluates(tmp_path_factory):
    """configs/blip/base_14m.py:runlocal (the tiny model with BLIP's momentum distillation,
    queue and per-epoch step decay): 4 steps straight equal 2 steps, a restart, and 2 more,
    momentum state included; the evaluators report."""
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    overrides = [f"data.data_dir={data_dir}"]

    def base_runlocal(evals):
        config = config_lib.load_config("configs/blip/base_14m.py:runlocal")
        assert (config.loss.momentum, config.optim.schedule) == (0.995, "step")
        if not evals:
            config.evals = {}
        config_lib.apply_overrides(config, overrides)
        return config

    straight = base_runlocal(evals=True)
    result = trainer.train(straight, str(tmp_path_factory.mktemp("blip_straight")))
    metrics = result.metrics
    for key in ("itm/itm_test/accuracy", "retrieval/retrieval_test/i2t_r1",
                "retrieval/retrieval_test/i2t_r1_rerank", "captioning/captioning_test/cider_d",
                "captioning/captioning_test/colour_acc"):
        assert key in metrics, sorted(metrics)
    assert 0.0 <= metrics["itm/itm_test/accuracy"] <= 1.0
    assert np.isfinite(result.train_metrics["loss_itm"])

    resumed_dir = str(tmp_path_factory.mktemp("blip_resumed"))
    split = base_runlocal(evals=False)
    trainer.train(split, resumed_dir, stop_after=2)
    resumed = trainer.train(split, resumed_dir)
    assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints")))[-1] == "4"
    for a, b in zip(jax.tree.leaves((result.state.params, result.state.extra)),
                    jax.tree.leaves((resumed.state.params, resumed.state.extra))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_word_swapped_captions_are_extra_itm_negatives():
    """input.hard_negatives: each valid (image i, swapped caption i) is one more ITM negative and
    one more ITC negative of image i. With the caption itself as its 'swap', the ITM loss is the
    mean over 3B mined pairs and the valid swaps, each swap costing the positive's NLL of 'no
    match'."""
    config = runlocal_config()
    config.input.hard_negatives = dict(count=1, vocabulary="vlm_shapes")
    task = make_task(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    transform = task.example_transform(training=True)
    assert transform[0] == "image_id" and any("key='neg_text'" in op for op in transform)
    assert not any("neg_text" in op for op in task.example_transform(training=False))
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    batch, rng = fake_batch(), jax.random.PRNGKey(3)
    valid = np.arange(16)[:, None] % 3 != 0
    swapped = dict(batch, neg_text=batch["text"][:, None],
                   neg_text_mask=batch["text_mask"][:, None], neg_valid=valid)
    losses = jax.jit(lambda b: {k: v for k, v in task.loss_fn(params, {}, b, rng)[1].items()
                                if k.startswith("loss_")})
    plain_losses, swap_losses = losses(batch), losses(swapped)
    # ITC: the caption against itself as its swap adds log(1 + k_i), mean over images.
    assert float(swap_losses["loss_itc"] - plain_losses["loss_itc"]) == pytest.approx(
        np.mean(np.log1p(valid[:, 0].astype(float))), rel=1e-4)
    plain, with_swaps = float(plain_losses["loss_itm"]), float(swap_losses["loss_itm"])
    enc = jnp.asarray(batch["text"]).at[:, 0].set(TOKEN_IDS["enc"])
    logits = task.model.apply({"params": params}, jnp.asarray(batch["image"]), enc,
                              jnp.asarray(batch["text_mask"]), method=task.model.itm_logits)
    nll_no_match = np.asarray(jax.nn.logsumexp(logits, -1) - logits[:, 0])
    expected = (plain * 48 + nll_no_match[valid[:, 0]].sum()) / (48 + valid.sum())
    assert with_swaps == pytest.approx(expected, rel=1e-5)


def test_cnn_image_tower_starts_from_a_siglip_workdir(part_workdirs):  # noqa: F811
    """image=cnn,vision_init=WORKDIR: the contrastive run's CNN image tower is BLIP's `vision`
    (the rest keeps the random init of config.seed)."""
    config = runlocal_config(f"runlocal,image=cnn,vision_init={part_workdirs['vision']}")
    mesh = sharding.make_mesh({"data": -1})
    task = make_task(config, mesh)
    from vlmjax.train import checkpoint
    abstract, shardings = checkpoint.task_param_shardings(task, config, mesh)
    with jax.set_mesh(mesh):
        params = task.pretrained_params(config.model_init, abstract, shardings)
    tower = part_workdirs["vision_params"]["image_tower"]
    for got, want in zip(jax.tree.leaves(params["vision"]), jax.tree.leaves(tower), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    random = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(
        jax.random.split(jax.random.PRNGKey(0))[0])
    np.testing.assert_array_equal(np.asarray(params["itm_head"]["kernel"]),
                                  np.asarray(random["itm_head"]["kernel"]))


def test_fine_map_gives_four_times_the_image_tokens_and_the_same_itc_features():
    """fine_map=True: the CNN's last stage without its final pool (8 px cells), the same
    parameters; the max token, BLIP's ITC feature, is unchanged."""
    mesh = sharding.make_mesh({"data": -1})
    coarse = make_task(runlocal_config("runlocal,image=cnn"), mesh).model
    fine = make_task(runlocal_config("runlocal,image=cnn,fine_map=True"), mesh).model
    images = jnp.asarray(fake_batch()["image"][:2])
    params = nn.meta.unbox(coarse.init(jax.random.PRNGKey(0), images, method=coarse.encode_image))
    tokens = {name: model.apply(params, images, method=model.image_features)
              for name, model in (("coarse", coarse), ("fine", fine))}
    assert tokens["coarse"].shape[1] == 1 + 16 and tokens["fine"].shape[1] == 1 + 64
    np.testing.assert_allclose(np.asarray(tokens["fine"][:, 0]),
                               np.asarray(tokens["coarse"][:, 0]), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(fine.apply(params, images, method=fine.encode_image)),
        np.asarray(coarse.apply(params, images, method=coarse.encode_image)), rtol=1e-5)
    with pytest.raises(ConfigError, match="fine_map=True is the CNN's"):
        runlocal_config("runlocal,image=vit,fine_map=True")


def test_itc_logit_scale_is_one_over_the_clamped_temperature():
    from vlmjax.evals.blip_model import BlipEvalModel
    mesh = sharding.make_mesh({"data": -1})
    model = make_task(runlocal_config("runlocal,image=cnn"), mesh).model
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                      method=model.encode_image))["params"]
    eval_model = BlipEvalModel(model, None, mesh, TOKEN_IDS)
    for temp, scale in ((0.05, 20.0), (1e-5, 1000.0)):  # below 0.001: clamped, as in the loss
        assert eval_model.itc_logit_scale({**params, "temp": jnp.float32(temp)}) == (
            pytest.approx(scale, rel=1e-5))
