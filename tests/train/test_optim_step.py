"""Schedules, weight-decay mask, frozen params, extra state and EMA, gradient accumulation and
non-finite handling."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlmjax import sharding
from vlmjax.config import ConfigError
from vlmjax.train import optim, step as step_lib

PARAMS = {"tower": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
          "head": {"kernel": jnp.ones((2, 1))}, "log_temperature": jnp.zeros(())}


def optim_config(**kwargs):
    return ml_collections.ConfigDict({**dict(name="adamw", lr=0.1, schedule="constant",
                                             warmup_steps=0, clip_norm=0.0), **kwargs})


@pytest.mark.parametrize("schedule,checks", [
    ("cosine", {0: 0.0, 10: 1.0, 55: 0.5, 100: 0.0}),
    ("linear", {10: 1.0, 55: 0.5, 100: 0.0}),
    ("rsqrt", {10: 1.0, 20: 1 / np.sqrt(2)}),
    ("constant", {10: 1.0, 99: 1.0}),
])
def test_schedules_after_warmup(schedule, checks):
    cfg = optim.settings(optim_config(lr=1.0, schedule=schedule, warmup_steps=10,
                                      rsqrt_timescale=10))
    fn = optim.make_schedule(cfg, total_steps=100)
    np.testing.assert_allclose(fn(5), 0.5, rtol=1e-6)  # linear warmup
    for step, value in checks.items():
        np.testing.assert_allclose(fn(step), value, rtol=1e-5, atol=1e-7)


def test_step_schedule_decays_per_epoch_from_step_0_down_to_end_lr():
    """BLIP: lr = max(min_lr, lr * rate ** epoch), epochs counted from step 0 (the warmup lies in
    epoch 0)."""
    cfg = optim.settings(optim_config(lr=1.0, schedule="step", warmup_steps=10, decay_every=20,
                                      decay_rate=0.5, end_lr=0.2))
    fn = optim.make_schedule(cfg, total_steps=100)
    for step, value in {5: 0.5, 10: 1.0, 19: 1.0, 20: 0.5, 39: 0.5, 40: 0.25, 60: 0.2,
                        99: 0.2}.items():
        np.testing.assert_allclose(fn(step), value, rtol=1e-6)
    for bad in (dict(decay_every=0, decay_rate=0.5), dict(decay_every=5, decay_rate=1.5)):
        with pytest.raises(ConfigError, match="decay_every >= 1"):
            optim.settings(optim_config(schedule="step", **bad))


def test_unknown_optim_keys_and_values_are_errors():
    with pytest.raises(ConfigError, match="'weight_decay'"):
        optim.settings(optim_config(weight_decy=0.1))
    with pytest.raises(ConfigError, match="is not one of"):
        optim.settings(optim_config(name="lamb"))


def apply_once(cfg, grads=None):
    tx, _ = optim.make_optimizer(cfg, 10, PARAMS)
    grads = grads or jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return optax.apply_updates(PARAMS, updates)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_weight_decay_only_on_matrices_not_matching_no_decay(name):
    new = apply_once(optim_config(name=name, weight_decay=0.5, no_decay="^head/"))
    assert float(new["tower"]["kernel"][0, 0]) < 1.0  # decayed (zero gradient)
    assert float(new["tower"]["bias"][0]) == 1.0        # 1-D: never decayed
    assert float(new["head"]["kernel"][0, 0]) == 1.0    # excluded by regex
    assert float(new["log_temperature"]) == 0.0


def test_trainable_mask_from_regex_mask_and_freeze():
    by_regex = step_lib.trainable_mask(PARAMS, "^tower/")
    assert by_regex == {"tower": {"kernel": True, "bias": True}, "head": {"kernel": False},
                        "log_temperature": False}
    frozen_more = step_lib.trainable_mask(PARAMS, "^tower/", freeze="bias$")
    assert frozen_more["tower"] == {"kernel": True, "bias": False}
    explicit = jax.tree.map(lambda _: False, PARAMS) | {"log_temperature": True}
    assert step_lib.trainable_mask(PARAMS, explicit) == explicit
    assert all(jax.tree.leaves(step_lib.trainable_mask(PARAMS)))
    with pytest.raises(ConfigError, match="no parameter is trainable"):
        step_lib.trainable_mask(PARAMS, freeze=".")


def test_frozen_params_get_no_update_no_optimizer_state_and_no_gradient_norm():
    """optim.freeze='^tower/': the tower stays bitwise equal under a loss that pulls on it; the
    optimiser state has leaves only for the trainable params; grad_norm is theirs alone."""
    def loss_fn(params, extra, batch, rng):
        return sum(jnp.sum(x * 3.0) for x in jax.tree.leaves(params)), {}

    mask = step_lib.trainable_mask(PARAMS, freeze="^tower/")
    trainable, frozen = step_lib.split_params(PARAMS, mask)
    tx, schedule = optim.make_optimizer(optim_config(), 10, trainable)
    state = step_lib.init_state(PARAMS, tx, jax.random.PRNGKey(0), trainable=mask)
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule, trainable=mask))
    for _ in range(2):
        state, metrics = step(state, {})
    np.testing.assert_array_equal(state.params["tower"]["kernel"], PARAMS["tower"]["kernel"])
    np.testing.assert_array_equal(state.params["tower"]["bias"], PARAMS["tower"]["bias"])
    assert float(state.params["head"]["kernel"][0, 0]) != 1.0
    moment_sizes = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moment_sizes == [2, 2]  # mu and nu of head/kernel [2, 1]; none of the tower
    trainable_count = 2 + 1  # every gradient is 3: norm over head/kernel and log_temperature
    np.testing.assert_allclose(metrics["grad_norm"], 3.0 * np.sqrt(trainable_count), rtol=1e-6)
    merged = step_lib.merge_params(mask, trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)


def test_extra_state_and_ema_follow_the_step():
    """update_extra sees the updated params and the aux outputs; the EMA is
    d * ema + (1 - d) * params after each update, starting at the initial params."""
    def loss_fn(params, extra, batch, rng):
        return jnp.sum(params["w"] ** 2), {"w_sum": jnp.sum(params["w"]),
                                           "seen": extra["count"] + 0.0}

    def update_extra(extra, params, out):
        return {"count": extra["count"] + 1, "last_sum": out["w_sum"]}

    params = {"w": jnp.arange(3.0)}
    tx, decay = optax.sgd(0.1), 0.9
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(0), ema=True,
                                task_extra={"count": jnp.zeros([], jnp.int32),
                                            "last_sum": jnp.zeros([])})
    step = jax.jit(step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(0.1),
                                            update_extra=update_extra, ema_decay=decay))
    w, ema = np.arange(3.0), np.arange(3.0)
    for i in range(3):
        state, metrics = step(state, {})
        assert float(metrics["seen"]) == i  # the loss saw the extra state before the update
        sum_before = w.sum()
        w = w - 0.1 * 2 * w
        ema = decay * ema + (1 - decay) * w
        np.testing.assert_allclose(float(state.extra["task"]["last_sum"]), sum_before,
                                   rtol=1e-6)
    assert int(state.extra["task"]["count"]) == 3
    np.testing.assert_allclose(state.params["w"], w, rtol=1e-6)
    np.testing.assert_allclose(state.extra["ema"]["w"], ema, rtol=1e-6)
    mask = step_lib.trainable_mask(params)
    np.testing.assert_allclose(step_lib.ema_params(state, mask)["w"], ema, rtol=1e-6)


def test_ema_decay_must_be_below_one():
    with pytest.raises(ConfigError, match="optim.ema_decay must be in"):
        optim.settings(optim_config(ema_decay=1.0))


def mse_loss(params, extra, batch, rng):
    pred = batch["x"] @ params["w"]
    return jnp.mean((pred - batch["y"]) ** 2), {"pred_mean": jnp.mean(pred)}


def test_gradient_accumulation_equals_full_batch_for_per_example_losses():
    mesh = sharding.make_mesh({"data": -1})
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(16, 1)), jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)}
    tx = optax.sgd(0.1)
    results = []
    for accum in (1, 4):
        step = jax.jit(step_lib.make_train_step(mse_loss, tx, optax.constant_schedule(0.1),
                                                accum_steps=accum, mesh=mesh))
        state = step_lib.init_state(params, tx, jax.random.PRNGKey(0))
        with jax.set_mesh(mesh):
            state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        results.append((state.params["w"], metrics["loss"]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_nonfinite_step_is_skipped_and_counted():
    tx = optax.sgd(0.1)
    step = jax.jit(step_lib.make_train_step(mse_loss, tx, optax.constant_schedule(0.1)))
    params = {"w": jnp.ones((3, 1))}
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(0))
    bad = {"x": jnp.full((4, 3), jnp.nan), "y": jnp.zeros((4, 1))}
    state, metrics = step(state, bad)
    np.testing.assert_array_equal(state.params["w"], params["w"])
    assert int(state.nonfinite_steps) == 1 and int(state.step) == 1
    good = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 1))}
    state, _ = step(state, good)
    assert int(state.nonfinite_steps) == 1 and float(state.params["w"][0, 0]) < 1.0
