"""Exact gradient accumulation (optim.accum='exact', GradCache) for contrastive losses: one
optimiser step over 4 micro-batches equals the full-batch step (CLIP softmax, SigLIP ppermute
ring; 1 and 8 devices; frozen towers), where naive accumulation does not; its compiled memory
follows the micro-batch."""
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from vlmjax import config as config_lib, sharding
from vlmjax.config import ConfigError
from vlmjax.train import optim, step as step_lib
from vlmjax.train.tasks import get_task
from vlmjax.train.tasks.base import ExactAccumTask
from vlmjax.train.tasks.contrastive import ContrastiveTask

BATCH = 32  # 4 micro-batches of 8: one row per device per micro-batch on 8 devices
ACCUM = 4
LR = 1.0    # SGD at lr 1: a parameter's change is its gradient, compared as such
# CLIP on transformer towers; SigLIP on the CNN recipe with hard negatives (an [B, K, D]
# embedding beside the [B, D] ones).
PRESETS = {"clip": "runlocal,image=vit,text_depth=1,negatives=0",
           "siglip": "runlocal,negatives=2"}


def contrastive_task(loss, mesh, tmp_path):
    path = {"clip": "configs/clip/tiny.py", "siglip": "configs/siglip/tiny.py"}[loss]
    config = config_lib.load_config(f"{path}:{PRESETS[loss]}")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    with config.unlocked():
        config.evals = ml_collections.ConfigDict()  # the step only
    return ContrastiveTask(config, mesh)


def random_batch(config, mesh, batch_size=BATCH):
    rng = np.random.default_rng(0)
    size, length = config.input.image_size, config.input.max_text_len
    batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
             "text": rng.integers(1, 100, (batch_size, length)).astype(np.int32),
             "text_mask": np.arange(length)[None, :] < rng.integers(3, length, (batch_size, 1))}
    if "hard_negatives" in config.input:
        count = config.input.hard_negatives.count
        batch["neg_text"] = rng.integers(1, 100, (batch_size, count, length)).astype(np.int32)
        batch["neg_text_mask"] = np.broadcast_to(batch["text_mask"][:, None],
                                                 (batch_size, count, length))
        batch["neg_valid"] = rng.random((batch_size, count)) < 0.8
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def one_step(task, params, batch, *, accum_steps, accum, freeze=""):
    """(params after one SGD step, metrics)."""
    mask = step_lib.trainable_mask(params, task.trainable, freeze)
    tx = optax.sgd(LR)
    step = jax.jit(step_lib.make_train_step(
        task.loss_fn, tx, optax.constant_schedule(LR), accum_steps=accum_steps, accum=accum,
        task=task, mesh=task.mesh, trainable=mask))
    state = step_lib.init_state(params, tx, jax.random.PRNGKey(1), trainable=mask)
    with jax.set_mesh(task.mesh):
        state, metrics = step(state, batch)
    return state.params, metrics


def max_relative_diffs(params, new, reference):
    """Per tensor: max |update - reference update| / max |reference update|, the scale floored
    at 1e-3 of the largest reference update (the gradient of e.g. an attention key's bias is 0
    up to float32 noise, which no relative test can match)."""
    updates = jax.tree.map(lambda n, p: np.asarray(n) - np.asarray(p), new, params)
    references = jax.tree.map(lambda r, p: np.asarray(r) - np.asarray(p), reference, params)
    floor = 1e-3 * max(np.abs(r).max() for r in jax.tree.leaves(references))
    return jax.tree.map(lambda u, r: np.abs(u - r).max() / max(np.abs(r).max(), floor),
                        updates, references)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_exact_accumulation_equals_the_full_batch_step_and_naive_does_not(loss, devices,
                                                                         tmp_path):
    mesh = sharding.make_mesh({"data": devices}, jax.devices()[:devices])
    task = contrastive_task(loss, mesh, tmp_path)
    assert isinstance(task, ExactAccumTask)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    batch = random_batch(task.config, mesh)

    full, full_metrics = one_step(task, params, batch, accum_steps=1, accum="naive")
    exact, exact_metrics = one_step(task, params, batch, accum_steps=ACCUM, accum="auto")
    naive, naive_metrics = one_step(task, params, batch, accum_steps=ACCUM, accum="naive")

    exact_diffs = max_relative_diffs(params, exact, full)
    worst = max(jax.tree.leaves(exact_diffs))
    assert worst < 1e-4, jax.tree_util.tree_leaves_with_path(exact_diffs)
    np.testing.assert_allclose(exact_metrics["loss"], full_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(exact_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(exact_metrics["temperature"], full_metrics["temperature"])
    # Naive accumulation is another loss: each micro-batch only sees its own negatives.
    naive_worst = max(jax.tree.leaves(max_relative_diffs(params, naive, full)))
    assert naive_worst > 1e-2
    assert abs(float(naive_metrics["loss"]) - float(full_metrics["loss"])) > 1e-3
    losses = {name: float(m["loss"]) for name, m in (
        ("full", full_metrics), ("exact", exact_metrics), ("naive", naive_metrics))}
    print(f"\n{loss} on {devices} device(s): max relative update error vs full batch: exact "
          f"{worst:.2e}, naive {naive_worst:.2e}; losses {losses}")


def test_exact_accumulation_with_a_frozen_tower_equals_the_full_batch_step(tmp_path):
    """LiT: the frozen image tower gets no gradient and stays put; the rest is exact."""
    mesh = sharding.make_mesh({"data": -1})
    task = contrastive_task("siglip", mesh, tmp_path)
    params = nn.meta.unbox(task.init_params(jax.random.PRNGKey(0)))
    batch = random_batch(task.config, mesh)
    freeze = "^image_tower/"
    full, _ = one_step(task, params, batch, accum_steps=1, accum="naive", freeze=freeze)
    exact, _ = one_step(task, params, batch, accum_steps=ACCUM, accum="exact", freeze=freeze)
    for before, after in zip(jax.tree.leaves(params["image_tower"]),
                             jax.tree.leaves(exact["image_tower"])):
        np.testing.assert_array_equal(before, after)
    assert max(jax.tree.leaves(max_relative_diffs(params, exact, full))) < 1e-4
    text_kernel = lambda p: np.asarray(p["text_proj"]["dense"]["kernel"])  # noqa: E731
    assert np.abs(text_kernel(exact) - text_kernel(params)).max() > 1e-3  # the text side trains


def test_exact_on_a_task_without_the_hooks_is_a_config_error(tmp_path):
    config = config_lib.load_config("configs/lm/tiny.py:runlocal")
    if "data_dir" in config.data:
        config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}"])
    task = get_task("lm")(config, sharding.make_mesh({"data": -1}))
    assert not isinstance(task, ExactAccumTask)
    assert step_lib.resolve_accum("auto", task) == "naive"  # the default keeps LM working
    tx = optax.sgd(LR)
    with pytest.raises(ConfigError, match=r"optim.accum='exact' needs a task with the exact-"
                                          r"accumulation hooks .*task LMTask has none: use "
                                          r"optim.accum='naive'"):
        step_lib.make_train_step(task.loss_fn, tx, optax.constant_schedule(LR), accum_steps=2,
                                 accum="exact", task=task, mesh=task.mesh)


def test_optim_accum_is_checked():
    assert optim.settings(ml_collections.ConfigDict())["accum"] == "auto"
    with pytest.raises(ConfigError, match=r"optim.accum 'exakt' is not one of \('auto', "
                                          r"'exact', 'naive'\)"):
        optim.settings(ml_collections.ConfigDict({"accum": "exakt"}))


def compiled_temp_bytes(task, params, batch_shapes, accum_steps):
    tx = optax.adamw(1e-3)
    step = jax.jit(step_lib.make_train_step(
        task.loss_fn, tx, optax.constant_schedule(1e-3), accum_steps=accum_steps,
        accum="exact", task=task, mesh=task.mesh))
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, jax.random.PRNGKey(1)), params)
    with jax.set_mesh(task.mesh):
        compiled = step.lower(state, batch_shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_exact_accumulation_memory_follows_the_micro_batch(tmp_path):
    """Tiny ViT towers on 64 px images in 4 px patches (256 tokens): activations dominate the
    step's temporary memory, which at accum 4 is well below the full-batch step's. Measured
    (1 CPU device, batch 64): see benchmarks/accum_memory.py for the table."""
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    config = config_lib.load_config("configs/siglip/tiny.py:image=vit,text_depth=1,negatives=0,"
                                    "batch=64")
    config_lib.apply_overrides(config, [f"data.data_dir={tmp_path}", "model.image.patch_size=4",
                                        "model.image.depth=1"])
    with config.unlocked():
        config.evals = ml_collections.ConfigDict()
    task = ContrastiveTask(config, mesh)
    params = jax.eval_shape(lambda r: nn.meta.unbox(task.init_params(r)), jax.random.PRNGKey(0))
    size, length, batch_size = config.input.image_size, config.input.max_text_len, 64
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), np.float32),
        "text": jax.ShapeDtypeStruct((batch_size, length), np.int32),
        "text_mask": jax.ShapeDtypeStruct((batch_size, length), np.bool_)}
    temp = {accum: compiled_temp_bytes(task, params, batch_shapes, accum) for accum in (1, 4)}
    print(f"\ncompiled temp memory, batch {batch_size}: accum 1 {temp[1] / 2**20:.1f} MiB, "
          f"exact accum 4 {temp[4] / 2**20:.1f} MiB")
    assert temp[4] < 0.5 * temp[1]


@pytest.mark.slow
@pytest.mark.parametrize("accum,path", [("auto", "exact"), ("naive", "naive")])
def test_the_trainer_takes_the_exact_path_for_a_contrastive_task(accum, path, monkeypatch,
                                                                  tmp_path_factory):
    """trainer.train hands optim.accum and the task to make_train_step: with accum_steps 2 a
    contrastive run goes through the GradCache path by default, and not with accum='naive'."""
    from vlmjax.train import trainer
    calls = {"exact": 0, "kwargs": None}
    make_train_step, exact_grads = step_lib.make_train_step, step_lib._exact_accum_grads

    def recording_make_train_step(*args, **kwargs):
        calls["kwargs"] = kwargs
        return make_train_step(*args, **kwargs)

    def counting_exact_grads(*args, **kwargs):  # traced once per compilation of the step
        calls["exact"] += 1
        return exact_grads(*args, **kwargs)

    monkeypatch.setattr(step_lib, "make_train_step", recording_make_train_step)
    monkeypatch.setattr(step_lib, "_exact_accum_grads", counting_exact_grads)
    config = config_lib.load_config("configs/clip/tiny.py:runlocal,negatives=0")
    data_dir = str(tmp_path_factory.getbasetemp() / "runlocal_tfds")
    config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "total_steps=2"])
    with config.unlocked():
        config.optim.update(accum_steps=2, accum=accum)
        config.evals = ml_collections.ConfigDict()
    result = trainer.train(config, str(tmp_path_factory.mktemp("workdir")))
    assert int(result.state.step) == 2
    kwargs = calls["kwargs"]
    assert kwargs["accum_steps"] == 2 and kwargs["accum"] == accum
    assert isinstance(kwargs["task"], ContrastiveTask)
    assert step_lib.resolve_accum(kwargs["accum"], kwargs["task"]) == path
    assert (calls["exact"] > 0) == (path == "exact")
