"""The trainer: one loop for every task.

It owns the mesh, sharded state initialisation, the jitted step, checkpoints and resumption,
logging and evaluation scheduling. A task (see `vlmjax/train/tasks/`) supplies the model, the
loss and the evaluators; nothing here knows what a contrastive loss is.

Top-level config keys read here are listed in `TRAINER_KEYS`; each task lists its own.
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlmjax import config as config_lib
from vlmjax import distributed, gfile, sharding
from vlmjax.train import checkpoint, input_shards, metrics as metrics_lib, optim, step as step_lib
from vlmjax.train import prefetch
from vlmjax.train.tasks import get_task

TRAINER_KEYS = {
    "task": "task name (see vlmjax/train/tasks)",
    "seed": "seed of parameter init, dropout and data order",
    "total_steps": "number of optimiser updates",
    "model": "task model config",
    "model_init": "pretrained weights to start from ('' = random init)",
    "loss": "task loss config",
    "data": "training data source (vlmjax.data.pipeline)",
    "input": "preprocessing, tokenizer and global_batch_size (vlmjax.data.pipeline)",
    "evals": "evaluators and their schedule",
    "optim": "optimiser config (vlmjax.train.optim)",
    "mesh": "mesh axis sizes: data, fsdp, tensor (-1 = the rest)",
    "sharding_rules": "logical axis -> mesh axis overrides",
    "log_every": "steps between progress lines",
    "checkpoint": "every, keep, keep_period, async",
    "nonfinite": "'skip' (count and skip the update) or 'stop' on non-finite loss/gradient",
    "peak_flops": "per-device peak FLOP/s for MFU (0 = measure a float32 matmul at start)",
    "data_shards": "training input streams the global batch is made of, split over the "
                   "processes (0 = the checkpoint's, else the process count); see "
                   "vlmjax/train/input_shards.py",
}
CHECKPOINT_KEYS = ("every", "keep", "keep_period", "async_save")


class ConfigMismatchError(ValueError):
    pass


class NonFiniteError(FloatingPointError):
    pass


def check_config(config: ml_collections.ConfigDict):
    config_lib.check_keys(config, TRAINER_KEYS, "config")
    config_lib.check_keys(config.get("checkpoint", {}), CHECKPOINT_KEYS, "checkpoint")
    if config.get("nonfinite", "skip") not in step_lib.NONFINITE_POLICIES:
        raise config_lib.ConfigError(f"config.nonfinite {config.nonfinite!r} is not one of "
                                     f"{step_lib.NONFINITE_POLICIES}")
    if int(config.get("data_shards", 0)) < 0:
        raise config_lib.ConfigError(f"config.data_shards must be >= 0 (0 = the default), got "
                                     f"{config.get('data_shards')}")
    if int(config.get("total_steps", 0)) < 1:
        raise config_lib.ConfigError(f"config.total_steps must be >= 1, got "
                                     f"{config.get('total_steps')}")


def _check_saved_config(workdir: str, config, allow_config_change: bool):
    """Refuse to resume a workdir with a different config unless told to."""
    path = gfile.join(workdir, "config.json")
    new = json.loads(config_lib.to_json(config))
    if gfile.exists(path):
        old = json.loads(gfile.read_text(path))
        if old != new and not allow_config_change:
            changed = sorted(k for k in set(config_lib.flat_keys(old)) | set(
                config_lib.flat_keys(new)) if _lookup(old, k) != _lookup(new, k))
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config (changed: "
                f"{', '.join(changed[:10])}); use another workdir or pass "
                "--allow_config_change to resume with the new config")
    if jax.process_count() > 1:  # every process has read it before process 0 rewrites it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vlmjax: config checked")
    if jax.process_index() == 0:
        gfile.write_text(path, json.dumps(new, indent=2, sort_keys=True))


def _lookup(tree, dotted):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if not isinstance(tree, dict) else "<dict>"


@dataclasses.dataclass
class TrainResult:
    metrics: dict           # the last evaluation's metrics
    state: step_lib.TrainState


def train(config: ml_collections.ConfigDict, workdir: str, *,
          allow_config_change: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) `config` in `workdir`; returns the last eval metrics and the state.
    `stop_after`: stop (with a checkpoint) after this many steps of this call, for tests."""
    check_config(config)
    gfile.makedirs(workdir)
    _check_saved_config(workdir, config, allow_config_change)
    mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
    rules = sharding.logical_rules(config.get("sharding_rules", None))
    task = get_task(config.task)(config, mesh)
    total_steps, batch_size = int(config.total_steps), int(config.input.global_batch_size)
    optim_settings = optim.settings(config.optim)
    rng = jax.random.PRNGKey(int(config.get("seed", 0)))
    init_rng, state_rng = jax.random.split(rng)

    # Abstract init: shapes, logical axes -> shardings, then a jitted init straight into them.
    boxed = jax.eval_shape(task.init_params, init_rng)
    param_shardings = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = nn.meta.unbox(boxed)
    tx, schedule = optim.make_optimizer(config.optim, total_steps, abstract_params)
    abstract_state = jax.eval_shape(
        lambda p: step_lib.init_state(p, tx, state_rng), abstract_params)
    state_shardings = _state_shardings(abstract_state, param_shardings, mesh, tx)

    ckpt_cfg = config.get("checkpoint", {})
    checkpointer = checkpoint.Checkpointer(
        workdir, every=ckpt_cfg.get("every", 1000), keep=ckpt_cfg.get("keep", 3),
        keep_period=ckpt_cfg.get("keep_period", 0), async_save=ckpt_cfg.get("async_save", True))
    latest = checkpointer.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_shardings)
        state, data_state = checkpointer.restore(latest, abstract)
        _log(f"resumed from {checkpointer.directory} at step {latest}")
    else:
        with jax.set_mesh(mesh):
            if config.get("model_init"):
                params = task.pretrained_params(config.model_init, abstract_params,
                                                param_shardings)
                _log(f"initialised params from {config.model_init}")
            else:
                params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)),
                                 out_shardings=param_shardings)(init_rng)
            state = jax.jit(lambda p: step_lib.init_state(p, tx, state_rng),
                            out_shardings=state_shardings)(params)
        data_state = {}

    start_step = int(jax.device_get(state.step))
    train_input = prefetch.DevicePrefetcher(  # the next batch goes to the devices while
        _train_input(task, config, data_state),  # the step runs (issue #7)
        lambda host_batch: sharding.host_batch_to_global(host_batch, mesh))
    train_step = jax.jit(
        step_lib.make_train_step(task.loss_fn, tx, schedule,
                                 accum_steps=int(optim_settings["accum_steps"]), mesh=mesh),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)

    writer = metrics_lib.MetricsWriter(workdir)
    peak = float(config.get("peak_flops", 0)) or _measured_peak_flops()
    progress = metrics_lib.Progress(total_steps, start_step, batch_size,
                                    task.flops_per_example(batch_size), peak * mesh.size)
    log_every = int(config.get("log_every", 50))
    policy = config.get("nonfinite", "skip")
    from vlmjax.evals.schedule import Schedule  # late: the evaluators import TensorFlow
    evaluators = Schedule(task.evaluators(config.get("evals", ml_collections.ConfigDict())))
    history, results, step = [], {}, start_step
    _log(f"training {config.task} for {total_steps} steps, batch {batch_size}, mesh "
         f"{dict(mesh.shape)} over {jax.process_count()} process(es), {train_input.num_shards} "
         f"data shard(s), {_param_count(abstract_params) / 1e6:.2f}M params")
    try:
        with distributed.StopSignal() as stop, jax.set_mesh(mesh):
            while step < total_steps:
                batch = next(train_input)
                state, step_metrics = train_step(state, batch)
                step += 1
                history.append(step_metrics)
                last = step == total_steps
                # Every process calls should_stop each step: it is where they agree on a
                # preemption step.
                stopping = stop.should_stop(step) or (stop_after is not None
                                                      and step - start_step >= stop_after)
                if step % log_every == 0 or last or stopping:
                    fetched = metrics_lib.mean_metrics(jax.device_get(history))
                    fetched.update({f"data/skipped/{k}": v
                                    for k, v in train_input.skip_counts.items()})
                    history = []
                    line, rates = progress.report(step, fetched)
                    if jax.process_index() == 0:
                        print(line, flush=True)
                    writer.write(step, {**{f"train/{k}": v for k, v in fetched.items()}, **rates})
                    if policy == "stop" and fetched["nonfinite_steps"] > 0:
                        raise NonFiniteError(
                            f"non-finite loss or gradient before step {step} (config.nonfinite="
                            f"'stop'); the last checkpoint in {checkpointer.directory} is intact")
                if evaluators.due(step, last):
                    results = evaluators.run(state.params, step, last)
                    _check_processes_agree(results)
                    writer.write(step, results)
                    _print_results(step, results)
                if step % checkpointer.every == 0 or last or stopping:
                    if policy == "stop" and int(jax.device_get(state.nonfinite_steps)) > 0:
                        raise NonFiniteError(f"non-finite loss or gradient before step {step}")
                    checkpointer.save(step, state, {
                        "num_shards": train_input.num_shards,
                        "shards": {str(k): v for k, v in train_input.get_state().items()}})
                if stopping:
                    break
    finally:
        checkpointer.close()  # waits for the async save in flight
        writer.close()
        train_input.close()
    return TrainResult(results, state)


def _log(message: str):
    if jax.process_index() == 0:
        print(message, flush=True)


def _train_input(task, config, saved: dict[int, dict]) -> input_shards.ShardedInput:
    """This process's data shards, at the positions the checkpoint's processes saved."""
    saved_states, saved_count = {}, None
    for process_state in saved.values():
        saved_count = int(process_state["num_shards"])
        saved_states.update({int(k): v for k, v in process_state["shards"].items()})
    num_shards, note = input_shards.choose_num_shards(
        int(config.get("data_shards", 0)), saved_count, jax.process_count())
    if note:
        _log(f"warning: {note}")
    if num_shards != saved_count:
        saved_states = {}
    elif saved_count is not None and len(saved_states) != saved_count:
        raise ValueError(f"the checkpoint holds the data positions of shards "
                         f"{sorted(saved_states)}, but {saved_count} were saved; was a process's "
                         "data file lost?")
    return input_shards.ShardedInput(
        lambda shard, count, state: task.train_input(state, shard, count), num_shards,
        jax.process_index(), jax.process_count(), saved_states)


def _check_processes_agree(results: dict):
    """Evaluations must give every process the same numbers (they all log, checkpoint, stop)."""
    if jax.process_count() == 1 or not results:
        return
    from jax.experimental import multihost_utils
    values = np.asarray([v for k, v in sorted(results.items()) if k != "eval/seconds"],
                        np.float32)  # what the collective carries (float64 would be cast)
    multihost_utils.assert_equal(values, "evaluation results differ between processes")


def _measured_peak_flops() -> float:
    """Per-device peak: measured float32 matmul rate of one device (CPU: the whole host)."""
    from vlmjax.train.flops import measure_matmul_flops
    per_host = measure_matmul_flops(1024)
    return per_host / max(len(jax.local_devices()), 1)


def _state_shardings(abstract_state, param_shardings, mesh, tx):
    """Optimiser moments mirror their params' shardings; everything else is replicated."""
    replicated = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, sh: sh, abstract_state.opt_state, param_shardings,
                                transform_non_params=lambda _: replicated)
    return step_lib.TrainState(step=replicated, params=param_shardings, opt_state=opt,
                               rng=replicated, nonfinite_steps=replicated)


def _param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _print_results(step: int, results: dict):
    if jax.process_index() == 0 and results:
        print(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())),
              flush=True)
