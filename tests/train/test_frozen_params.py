"""LiT: with the image tower frozen, the step computes no image-tower gradient and keeps no
optimiser state for it; XLA's own counts show the saving."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from vlmjax import config as config_lib, sharding
from vlmjax.train import optim, step as step_lib
from vlmjax.train.tasks.contrastive import ContrastiveTask

# Transformer towers, so the frozen image tower's backward pass is a real share of the step.
PRESETS = "runlocal,image=vit,text_depth=1,negatives=0"


def compiled_step(task, tx, schedule, mask, state, batch):
    step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule, mesh=task.mesh,
                                            trainable=mask))
    return step.lower(state, batch).compile()


def test_frozen_image_tower_is_unchanged_has_no_state_and_costs_less(tmp_path):
    config = config_lib.load_config(f"configs/siglip/tiny.py:{PRESETS}")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    with config.unlocked():
        config.optim.freeze = "^image_tower/"  # LiT
        config.evals = ml_collections.ConfigDict()  # the step only
    mesh = sharding.make_mesh({"data": -1})
    task = ContrastiveTask(config, mesh)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    size, length, batch_size = config.input.image_size, config.input.max_text_len, 16
    batch = jax.device_put({
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "text": rng.integers(1, 100, (batch_size, length)).astype(np.int32),
        "text_mask": np.ones((batch_size, length), bool)}, sharding.batch_sharding(mesh))

    costs, states = {}, {}
    for name, freeze in (("frozen", config.optim.freeze), ("unfrozen", "")):
        mask = step_lib.trainable_mask(params, task.trainable, freeze)
        trainable, _ = step_lib.split_params(params, mask)
        tx, schedule = optim.make_optimizer(config.optim, 10, trainable)
        state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
        with jax.set_mesh(mesh):
            compiled = compiled_step(task, tx, schedule, mask, state, batch)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            costs[name] = (cost["flops"], compiled.memory_analysis().temp_size_in_bytes)
            for _ in range(2):
                state, metrics = compiled(state, batch)
        states[name] = state
        assert np.isfinite(float(metrics["loss"]))
    print(f"\nLiT step (tiny ViT config, batch {batch_size}, 8 CPU devices): "
          f"FLOPs per device frozen {costs['frozen'][0]:.4g} vs unfrozen "
          f"{costs['unfrozen'][0]:.4g}"
          f"; temp memory frozen {costs['frozen'][1]} B vs unfrozen {costs['unfrozen'][1]} B")

    frozen = states["frozen"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(params["image_tower"]):
        np.testing.assert_array_equal(
            np.asarray(leaf), np.asarray(_at(frozen.params["image_tower"], path)))
    text_moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(params["text_tower"]), jax.tree.leaves(frozen.params["text_tower"]))]
    assert any(text_moved)
    # Adam's mu and nu: one leaf each per trainable param, none for the image tower.
    trainable_leaves = len(jax.tree.leaves(params)) - len(jax.tree.leaves(params["image_tower"]))
    for name, expected in (("frozen", trainable_leaves),
                           ("unfrozen", len(jax.tree.leaves(params)))):
        adam = _adam_state(states[name].opt_state)
        assert len(jax.tree.leaves(adam.mu)) == len(jax.tree.leaves(adam.nu)) == expected
    assert jax.tree.leaves(_adam_state(frozen.opt_state).mu["image_tower"]) == []
    # No image-tower backward pass: the image tower's weight gradients and the backward
    # through it are gone. At this size the image tower is about half the forward FLOPs.
    assert costs["frozen"][0] < 0.85 * costs["unfrozen"][0]
    assert costs["frozen"][1] < costs["unfrozen"][1]


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _adam_state(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))
