"""Schedules, weight-decay mask, freezing, gradient accumulation and non-finite handling."""
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


def test_freeze_by_regex_leaves_params_unchanged():
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    new = apply_once(optim_config(freeze="^tower/"), grads)
    np.testing.assert_array_equal(new["tower"]["kernel"], PARAMS["tower"]["kernel"])
    assert float(new["head"]["kernel"][0, 0]) != 1.0
    with pytest.raises(ConfigError, match="freezes every parameter"):
        optim.make_optimizer(optim_config(freeze="."), 10, PARAMS)


def mse_loss(params, batch, rng):
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
